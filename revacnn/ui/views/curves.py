"""Metric curves: loss, accuracy, cumulative time and the pattern measures over epochs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import panel as pn
import param
from bokeh.models import ColumnDataSource, HoverTool, Range1d
from panel.viewable import Viewer

from ..theme import DELETED, EVENT, RUN_COLORS
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


def event_x(epoch: int, batch: int, n_batches: int | None) -> float:
    """Where an event at (epoch, batch) sits on the fractional-epoch axis of the batch curves.

    Example:
        >>> event_x(3, 5, 10)
        2.5
    """
    if not n_batches:
        return float(epoch)
    return float(epoch) - 1.0 + min(max(batch, 0), n_batches) / n_batches


class BatchCurvesView(Viewer):
    """Batch-level loss and accuracy of a running training (the live page), with steering events.

    The live snapshot's batch history is a line on a fractional-epoch axis; the recorded epochs'
    train and validation values are points; applied (orange) and rejected (red) events are
    vertical marks. New batches are streamed to the browser, not re-sent.

    Args (params):
        batches: ``(N, 5)`` rows ``(epoch, batch, loss, accuracy, time)`` of the live snapshot.
        n_batches: batches per epoch.
        metrics: per-epoch rows (epoch, loss, accuracy, val_loss, val_accuracy).
        events: the run's steering events.

    Example:
        >>> view = BatchCurvesView(batches=st.batches, n_batches=10, metrics=st.metrics)
    """

    batches = param.Array(default=None, allow_None=True)
    n_batches = param.Integer(default=None, allow_None=True)
    metrics = param.DataFrame(default=None, allow_None=True)
    events = param.DataFrame(default=None, allow_None=True)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._batches = ColumnDataSource({"x": [], "loss": [], "acc": [], "epoch": [], "batch": []})
        self._epochs = ColumnDataSource({"x": [], "loss": [], "acc": [], "val_loss": [], "val_acc": []})
        self._events = ColumnDataSource({"x": [], "color": [], "kind": [], "status": [], "message": []})
        self.figures = []
        c_train, c_val = RUN_COLORS[0], RUN_COLORS[1]
        for key, val, title, y in (("loss", "val_loss", "Loss (batches)", "cross-entropy"),
                                   ("acc", "val_acc", "Accuracy (batches)", "accuracy")):
            f = make_figure(title, y, x_range=self.figures[0].x_range if self.figures else None)
            f.vspan(x="x", source=self._events, line_color="color", line_width=2, line_alpha=0.7)
            f.line(x="x", y=key, source=self._batches, color=c_train, legend_label="train (batches)")
            f.scatter(x="x", y=key, source=self._epochs, color=c_train, size=7, legend_label="train (epoch)")
            f.scatter(x="x", y=val, source=self._epochs, color=c_val, size=7, marker="square",
                      legend_label="validation")
            f.line(x="x", y=val, source=self._epochs, color=c_val, line_dash="dashed")
            f.legend.location = "top_right" if key == "loss" else "bottom_right"
            f.legend.label_text_font_size = "10.5px"
            f.legend.background_fill_alpha = 0.6
            self.figures.append(f)
        marks = self.figures[0].scatter(x="x", y=0, source=self._events, marker="inverted_triangle", size=0)
        self.figures[0].add_tools(HoverTool(renderers=[marks], tooltips=[("event", "@kind"),
                                                                         ("", "@status: @message")]))
        self._layout = pn.GridBox(*(pn.pane.Bokeh(f, sizing_mode="stretch_width") for f in self.figures),
                                  ncols=2, sizing_mode="stretch_width", css_classes=["rv-batch-curves"])
        self._rows: np.ndarray | None = None
        self._metrics_key: Any = None
        self._events_key: Any = None
        self.param.watch(self._on_batches, ["batches", "n_batches"])
        self.param.watch(self._on_metrics, ["metrics"])
        self.param.watch(self._on_events, ["events", "n_batches"])
        self._on_batches()
        self._on_metrics()
        self._on_events()

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout

    @staticmethod
    def _columns(b: np.ndarray, nb: int) -> dict[str, list[Any]]:
        return {"x": (b[:, 0] - 1 + b[:, 1] / nb).tolist(), "loss": b[:, 2].tolist(), "acc": b[:, 3].tolist(),
                "epoch": b[:, 0].astype(int).tolist(), "batch": b[:, 1].astype(int).tolist()}

    def reset(self) -> None:
        """Forget the previous run's curves (another run was attached)."""
        for src in (self._batches, self._epochs, self._events):
            src.data = {k: [] for k in src.data}
        self._rows = None
        self._metrics_key = None
        self._events_key = None

    def _on_batches(self, *_: Any) -> None:
        b, nb = self.batches, self.n_batches
        if b is None or not len(b) or not nb:
            return
        b = np.asarray(b, np.float64).reshape(-1, 5)
        rows = self._rows
        if rows is not None and len(rows) and len(b) > len(rows) and np.array_equal(b[: len(rows)], rows):
            self._batches.stream(self._columns(b[len(rows):], nb))  # the history only grows within a run
        elif rows is None or not np.array_equal(b, rows):
            self._batches.data = self._columns(b, nb)
        self._rows = b

    def _on_metrics(self, *_: Any) -> None:
        m = self.metrics
        if m is None or not len(m):
            return
        key = (len(m), tuple(m.iloc[-1].astype(str)))
        if key == self._metrics_key:
            return
        self._metrics_key = key
        self._epochs.data = {"x": column(m, "epoch").tolist(), "loss": column(m, "loss").tolist(),
                             "acc": column(m, "accuracy").tolist(), "val_loss": column(m, "val_loss").tolist(),
                             "val_acc": column(m, "val_accuracy").tolist()}

    def _on_events(self, *_: Any) -> None:
        ev = self.events
        key = ((0, None) if ev is None or not len(ev) else (len(ev), ev["event_id"].iloc[-1]), self.n_batches)
        if key == self._events_key:
            return
        self._events_key = key
        if ev is None or not len(ev):
            self._events.data = {k: [] for k in self._events.data}
            return
        ev = ev.dropna(subset=["epoch"])
        self._events.data = {
            "x": [event_x(int(e), int(b) if not pd.isna(b) else 0, self.n_batches)
                  for e, b in zip(ev["epoch"], ev["batch"], strict=False)],
            "color": [EVENT if s == "applied" else DELETED for s in ev["status"]],
            "kind": ev["kind"].astype(str).tolist(), "status": ev["status"].astype(str).tolist(),
            "message": ev["message"].astype(str).tolist(),
        }
