"""Metric curves: loss, accuracy, cumulative time and the pattern measures over epochs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import panel as pn
import param
from bokeh.models import ColumnDataSource, HoverTool, Range1d
from panel.viewable import Viewer

from ..theme import RUN_COLORS
from ._plots import EpochOverlays, column, fit_range, make_figure

_LAYER_COLORS = ("#2563EB", "#F59E0B", "#10B981", "#EF4444", "#8B5CF6", "#06B6D4", "#EC4899", "#84CC16")


class CurvesView(Viewer):
    """Per-epoch curves of a run with fork points, steering events and the current epoch marked.

    Figures: loss (train and validation), accuracy (train and validation), cumulative training
    time, ``cluster_score`` per conv layer and ``rgb_mono_fraction`` of the layers that see RGB
    input. Dotted vertical lines mark steering events (orange) and fork points (purple, dashed);
    the hatched band marks epochs inherited from the parent run; the blue line is the epoch shown.

    Args (params):
        metrics: rows with epoch, loss, accuracy, val_loss, val_accuracy, cumulative_time_s.
        layers: ``layers`` rows (epoch, layer, kind, cluster_score, rgb_mono_fraction).
        marks: dicts with epoch, kind (fork|event|rejected), label.
        epoch: the current epoch.

    Example:
        >>> curves = CurvesView(metrics=bundle.metrics, layers=bundle.layers, marks=bundle.marks)
        >>> curves.epoch = 3
    """

    metrics = param.DataFrame(default=None, allow_None=True)
    layers = param.DataFrame(default=None, allow_None=True)
    marks = param.List(default=[])
    inherited_upto = param.Integer(default=None, allow_None=True)
    epoch = param.Integer(default=None, allow_None=True)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.overlays = EpochOverlays()
        self._src = ColumnDataSource({k: [] for k in ("epoch", "loss", "accuracy", "val_loss",
                                                        "val_accuracy", "cumulative_time_s", "lr")})
        self._patterns = ColumnDataSource({"xs": [], "ys": [], "layer": [], "color": []})
        self._patterns_pts = ColumnDataSource({"x": [], "y": [], "layer": [], "color": []})
        self._rgb = ColumnDataSource({"xs": [], "ys": [], "layer": [], "color": []})
        self._rgb_pts = ColumnDataSource({"x": [], "y": [], "layer": [], "color": []})
        self.x_range = Range1d(-0.5, 1.5)
        self._loss_y, self._time_y = Range1d(0, 1), Range1d(0, 1)
        f_loss = make_figure("Loss", "cross-entropy", x_range=self.x_range, y_range=self._loss_y)
        f_acc = make_figure("Accuracy", "accuracy", x_range=self.x_range, y_range=Range1d(0, 1.02))
        f_time = make_figure("Cumulative training time", "seconds", x_range=self.x_range, y_range=self._time_y)
        f_clu = make_figure("Cluster score per conv layer", "0 diverse … 1 one cluster",
                            x_range=self.x_range, y_range=Range1d(-0.02, 1.02))
        f_rgb = make_figure("RGB mono fraction (layers on RGB input)", "fraction of filters",
                            x_range=self.x_range, y_range=Range1d(-0.02, 1.02))
        for f in (f_loss, f_acc, f_time, f_clu, f_rgb):
            self.overlays.attach(f)
        c_train, c_val = RUN_COLORS[0], RUN_COLORS[1]
        r1 = f_loss.line("epoch", "loss", source=self._src, color=c_train, line_width=2, legend_label="train")
        f_loss.scatter("epoch", "loss", source=self._src, color=c_train, size=5)
        r2 = f_loss.line("epoch", "val_loss", source=self._src, color=c_val, line_width=2, legend_label="validation")
        f_loss.scatter("epoch", "val_loss", source=self._src, color=c_val, size=5)
        f_loss.add_tools(HoverTool(renderers=[r1, r2], mode="vline", tooltips=[
            ("epoch", "@epoch"), ("loss", "@loss{0.000}"), ("val loss", "@val_loss{0.000}")]))
        a1 = f_acc.line("epoch", "accuracy", source=self._src, color=c_train, line_width=2, legend_label="train")
        f_acc.scatter("epoch", "accuracy", source=self._src, color=c_train, size=5)
        a2 = f_acc.line("epoch", "val_accuracy", source=self._src, color=c_val, line_width=2,
                        legend_label="validation")
        f_acc.scatter("epoch", "val_accuracy", source=self._src, color=c_val, size=5)
        f_acc.add_tools(HoverTool(renderers=[a1, a2], mode="vline", tooltips=[
            ("epoch", "@epoch"), ("accuracy", "@accuracy{0.000}"), ("val accuracy", "@val_accuracy{0.000}")]))
        t1 = f_time.line("epoch", "cumulative_time_s", source=self._src, color=RUN_COLORS[2], line_width=2)
        f_time.scatter("epoch", "cumulative_time_s", source=self._src, color=RUN_COLORS[2], size=5)
        f_time.add_tools(HoverTool(renderers=[t1], mode="vline", tooltips=[
            ("epoch", "@epoch"), ("time", "@cumulative_time_s{0.0} s")]))
        for fig, lines, pts in ((f_clu, self._patterns, self._patterns_pts), (f_rgb, self._rgb, self._rgb_pts)):
            fig.multi_line("xs", "ys", source=lines, color="color", line_width=2, legend_field="layer")
            s = fig.scatter("x", "y", source=pts, color="color", size=5)
            fig.add_tools(HoverTool(renderers=[s], tooltips=[("layer", "@layer"), ("epoch", "@x"),
                                                             ("value", "@y{0.000}")]))
        for f in (f_loss, f_acc, f_clu, f_rgb):
            f.legend.location = "top_right" if f is not f_acc else "bottom_right"
            f.legend.label_text_font_size = "10.5px"
            f.legend.background_fill_alpha = 0.6
            f.legend.click_policy = "hide"
            f.legend.padding = 4
        self.figures = {"loss": f_loss, "accuracy": f_acc, "time": f_time, "cluster": f_clu, "rgb": f_rgb}
        self._layout = pn.GridBox(
            *(pn.pane.Bokeh(f, sizing_mode="stretch_width") for f in (f_loss, f_acc, f_time, f_clu, f_rgb)),
            ncols=2, sizing_mode="stretch_width", css_classes=["rv-curves"],
        )
        self.param.watch(self._on_data, ["metrics", "layers", "marks", "inherited_upto"])
        self.param.watch(self._on_epoch, ["epoch"])
        self._on_data()
        self._on_epoch()

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout

    def _on_data(self, *_: Any) -> None:
        m = self.metrics if self.metrics is not None else pd.DataFrame({"epoch": []})
        m = m.sort_values("epoch") if "epoch" in m and len(m) else m
        ep = column(m, "epoch")
        self._src.data = {
            "epoch": ep,
            "loss": column(m, "loss"),
            "accuracy": column(m, "accuracy"),
            "val_loss": column(m, "val_loss"),
            "val_accuracy": column(m, "val_accuracy"),
            "cumulative_time_s": column(m, "cumulative_time_s"),
            "lr": column(m, "lr"),
        }
        if len(ep):
            lo, hi = float(np.nanmin(ep)), float(np.nanmax(ep))
            self.x_range.start, self.x_range.end = lo - 0.5, max(hi, lo + 1) + 0.5
        fit_range(self._loss_y, self._src.data["loss"], self._src.data["val_loss"])
        fit_range(self._time_y, self._src.data["cumulative_time_s"], include_zero=True)
        lay = self.layers if self.layers is not None else pd.DataFrame()
        for col, lines, pts in (("cluster_score", self._patterns, self._patterns_pts),
                                ("rgb_mono_fraction", self._rgb, self._rgb_pts)):
            xs, ys, names, colors = [], [], [], []
            px, py, pl, pc = [], [], [], []
            if len(lay) and col in lay and "layer" in lay:
                conv = lay[lay["kind"] == "conv"] if "kind" in lay else lay
                order = list(dict.fromkeys(conv.sort_values("layer_index")["layer"])) if "layer_index" in conv \
                    else list(dict.fromkeys(conv["layer"]))
                for i, name in enumerate(order):
                    g = conv[conv["layer"] == name].sort_values("epoch")
                    y = column(g, col)
                    if not np.isfinite(y).any():
                        continue
                    x = column(g, "epoch")
                    color = _LAYER_COLORS[i % len(_LAYER_COLORS)]
                    xs.append(x)
                    ys.append(y)
                    names.append(name)
                    colors.append(color)
                    ok = np.isfinite(y)
                    px.extend(x[ok].tolist())
                    py.extend(y[ok].tolist())
                    pl.extend([name] * int(ok.sum()))
                    pc.extend([color] * int(ok.sum()))
            lines.data = {"xs": xs, "ys": ys, "layer": names, "color": colors}
            pts.data = {"x": px, "y": py, "layer": pl, "color": pc}
        first = float(ep[0]) if len(ep) else None
        self.overlays.set_marks(self.marks, self.inherited_upto, None if first is None else int(first))

    def _on_epoch(self, *_: Any) -> None:
        self.overlays.set_epoch(self.epoch)
