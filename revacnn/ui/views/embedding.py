"""The embedding view: filters at their t-SNE positions, drawn as small pictures with grad_l1 circles."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import panel as pn
import param
from bokeh.models import ColumnDataSource, HoverTool, Range1d, TapTool
from panel.viewable import Viewer

from ..data import MEASURES, LayerFrame, NetworkFrame
from ..render import activation_rgb, kernel_rgb, rgba_uint32
from ..theme import FROZEN, MEASURE_COLORS, MEASURE_LABELS
from ._plots import make_figure

#: Above this many points the "all epochs of all runs" cloud is drawn with Datashader.
DATASHADE_ABOVE = 100_000

_LAYER_COLORS = ("#2563EB", "#F59E0B", "#10B981", "#EF4444", "#8B5CF6", "#06B6D4", "#EC4899", "#84CC16")

#: Inner size of the embedding plot in pixels (fixed, so that t-SNE distances keep their aspect).
FRAME = (860, 540)

MODES = {"node": "one layer (node level)", "layer": "all layers (layer level)",
         "cloud": "all epochs of all runs"}


def _pictures(lf: LayerFrame, probe: int) -> list[np.ndarray] | None:
    """One small RGB picture per filter: weights for a layer on the input, activations deeper."""
    if lf.index == 0 and lf.kernel is not None:
        return list(kernel_rgb(lf.kernel))
    if lf.activations is not None and len(lf.activations):
        p = min(probe, len(lf.activations) - 1)
        return list(activation_rgb(lf.activations[p], lf.activation_scale()))
    return None


def datashade_cloud(df: pd.DataFrame, x: str, y: str, *, width: int = 640, height: int = 460,
                    by: str = "layer") -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Render many points with Datashader, one colour per ``by`` category.

    Returns:
        ``(image, (x0, y0, x1, y1))``: an ``(height, width)`` uint32 RGBA image for Bokeh's
        ``image_rgba`` and its extent in data coordinates.

    Example:
        >>> img, extent = datashade_cloud(df, "layer_tsne_x", "layer_tsne_y")
    """
    import datashader as ds
    import datashader.transfer_functions as tf

    d = df[[x, y, by]].dropna()
    d = d.assign(**{by: d[by].astype(str).astype("category")})
    x0, x1 = float(d[x].min()), float(d[x].max())
    y0, y1 = float(d[y].min()), float(d[y].max())
    if x1 <= x0:
        x1 = x0 + 1
    if y1 <= y0:
        y1 = y0 + 1
    cvs = ds.Canvas(plot_width=width, plot_height=height, x_range=(x0, x1), y_range=(y0, y1))
    agg = cvs.points(d, x, y, ds.count_cat(by))
    cats = list(d[by].cat.categories)
    key = {c: _LAYER_COLORS[i % len(_LAYER_COLORS)] for i, c in enumerate(cats)}
    img = tf.shade(agg, color_key=key, how="eq_hist", min_alpha=60)
    return np.asarray(img.data, dtype=np.uint32), (x0, y0, x1, y1)


class EmbeddingView(Viewer):
    """Filters at their t-SNE positions: node level (one layer), layer level, or the whole cloud.

    Each filter is drawn as a small picture (its RGB weights in the first layer, its activation
    map for the chosen probe deeper) inside a circle whose size shows the chosen measure —
    ``grad_l1`` by default, ReVACNN's "degree of convergence": small circles have stopped
    moving. Hover for uid and measures; click to select; trails show each filter's last
    positions. "All epochs of all runs" shows every recorded filter position, with Datashader
    when there are more than `DATASHADE_ABOVE` points.

    Example:
        >>> view = EmbeddingView(frame=frame, history=bundle.filters, layer="conv1")
        >>> view.mode = "layer"
    """

    frame = param.ClassSelector(class_=NetworkFrame, allow_None=True)
    history = param.DataFrame(default=None, allow_None=True, doc="filters rows, for trails.")
    cloud = param.Callable(default=None, allow_None=True, doc="() -> DataFrame of every filter row.")
    mode = param.Selector(default="node", objects=list(MODES))
    layer = param.String(default=None, allow_None=True)
    probe = param.Integer(default=0, bounds=(0, None))
    measure = param.Selector(default="grad_l1", objects=list(MEASURES))
    trails = param.Boolean(default=True)
    trail_length = param.Integer(default=4, bounds=(1, 50))
    selected = param.Tuple(default=None, allow_None=True, length=2)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._img = ColumnDataSource({"image": [], "x": [], "y": [], "dw": [], "dh": []})
        self._circ = ColumnDataSource({k: [] for k in ("x", "y", "r", "layer", "index", "uid", "frozen", "line",
                                                        "fill", *MEASURES)})
        self._trail = ColumnDataSource({"xs": [], "ys": [], "color": []})
        self._cloud_pts = ColumnDataSource({"x": [], "y": [], "color": [], "run_id": [], "epoch": [],
                                            "layer": [], "uid": []})
        self._shaded = ColumnDataSource({"image": [], "x": [], "y": [], "dw": [], "dh": []})
        self._trail_cache: tuple[Any, dict[tuple[str, int], tuple[np.ndarray, ...]]] | None = None
        self.x_range, self.y_range = Range1d(-1, 1), Range1d(-1, 1)
        fig = make_figure("", "t-SNE y", x_label="t-SNE x", x_range=self.x_range, y_range=self.y_range,
                          height=FRAME[1] + 60, width=FRAME[0] + 70, sizing_mode="fixed")
        fig.min_border_left, fig.min_border_right, fig.min_border_top, fig.min_border_bottom = 60, 10, 10, 50
        fig.grid.visible = False
        fig.image_rgba("image", "x", "y", "dw", "dh", source=self._shaded)
        cloud = fig.scatter("x", "y", source=self._cloud_pts, color="color", size=3, alpha=0.35)
        fig.multi_line("xs", "ys", source=self._trail, color="color", line_alpha=0.45, line_width=1.5)
        circles = fig.circle("x", "y", radius="r", source=self._circ, fill_color="fill", fill_alpha=0.13,
                             line_color="line", line_width=1.5)
        fig.image_rgba("image", "x", "y", "dw", "dh", source=self._img)
        hover_lines = [("layer", "@layer"), ("filter", "@index (uid @uid)"), ("frozen", "@frozen")]
        hover_lines += [(m, f"@{m}{{0.0000}}") for m in MEASURES]
        fig.add_tools(HoverTool(renderers=[circles], tooltips=hover_lines))
        fig.add_tools(TapTool(renderers=[circles]))
        self._cloud_hover = HoverTool(renderers=[cloud], tooltips=[
            ("run", "@run_id"), ("epoch", "@epoch"), ("layer", "@layer"), ("uid", "@uid")])
        fig.add_tools(self._cloud_hover)
        self._circ.selected.on_change("indices", self._on_tap)
        self.figure = fig
        self._title = pn.pane.HTML("", css_classes=["rv-embedding-title"], sizing_mode="stretch_width",
                                   styles={"font-size": "12.5px"})
        self._mode_w = pn.widgets.RadioButtonGroup(
            options={v: k for k, v in MODES.items()}, value=self.mode, color="light",
            css_classes=["rv-embedding-mode"])
        self._layer_w = pn.widgets.Select(label="", options=[], width=120, css_classes=["rv-embedding-layer"])
        self._trails_w = pn.widgets.Checkbox(label="trails (last epochs)", value=self.trails)
        self._mode_w.link(self, value="mode")
        self._trails_w.link(self, value="trails")
        self._layer_w.param.watch(lambda e: setattr(self, "layer", e.new), "value")
        self._layout = pn.Column(
            pn.Row(self._mode_w, self._layer_w, self._trails_w, align="center"),
            self._title,
            pn.pane.Bokeh(fig, width=FRAME[0] + 70, height=FRAME[1] + 60),
            sizing_mode="stretch_width", css_classes=["rv-embedding"],
        )
        self.param.watch(self._refresh, ["frame", "history", "mode", "layer", "probe", "measure",
                                         "trails", "trail_length", "cloud"])
        self._refresh()

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout

    def _on_tap(self, attr: str, old: Any, new: list[int]) -> None:
        if not new:
            return
        d = self._circ.data
        i = new[0]
        if i < len(d["uid"]):
            self.selected = (str(d["layer"][i]), int(d["uid"][i]))

    def _set_title(self, text: str) -> None:
        self._title.object = text

    def _clear(self) -> None:
        self._img.data = {"image": [], "x": [], "y": [], "dw": [], "dh": []}
        self._circ.data = {k: [] for k in self._circ.data}
        self._trail.data = {"xs": [], "ys": [], "color": []}
        self._cloud_pts.data = {k: [] for k in self._cloud_pts.data}
        self._shaded.data = {"image": [], "x": [], "y": [], "dw": [], "dh": []}

    def _refresh(self, *_: Any) -> None:
        f = self.frame
        names = [lf.name for lf in f.layers] if f is not None else []
        if self._layer_w.options != names:
            self._layer_w.options = names
        if names and self.layer not in names:
            self.layer = names[0]
            return
        if self._layer_w.value != self.layer and self.layer in names:
            self._layer_w.value = self.layer
        self._layer_w.visible = self.mode != "layer"
        self._clear()
        if self.mode == "cloud":
            self._draw_cloud()
            return
        if f is None or not f.layers:
            self._set_title(f"<i>{(f.message if f is not None else None) or 'Nothing to show yet.'}</i>")
            return
        layers = [f.layer(self.layer)] if self.mode == "node" else list(f.layers)
        layers = [lf for lf in layers if lf is not None]
        self._draw_filters(f, layers, level=self.mode)

    def _fit(self, xs: np.ndarray, ys: np.ndarray, pad: float) -> None:
        """Show all points with equal scales on both axes (the frame has a fixed size)."""
        ok = np.isfinite(xs) & np.isfinite(ys)
        if not ok.any():
            return
        x0, x1 = float(xs[ok].min()) - pad, float(xs[ok].max()) + pad
        y0, y1 = float(ys[ok].min()) - pad, float(ys[ok].max()) + pad
        aspect = FRAME[0] / FRAME[1]
        w, h = x1 - x0, y1 - y0
        if w / max(h, 1e-9) < aspect:
            extra = (h * aspect - w) / 2
            x0, x1 = x0 - extra, x1 + extra
        else:
            extra = (w / aspect - h) / 2
            y0, y1 = y0 - extra, y1 + extra
        self.x_range.start, self.x_range.end = x0, x1
        self.y_range.start, self.y_range.end = y0, y1

    def _positions(self, lf: LayerFrame, level: str) -> np.ndarray | None:
        pos = lf.embedding if level == "node" else lf.layer_embedding
        if pos is None or len(pos) != lf.n_filters:
            return None
        return np.asarray(pos, np.float64)

    def _draw_filters(self, f: NetworkFrame, layers: list[LayerFrame], level: str) -> None:
        allpos = [p for p in (self._positions(lf, level) for lf in layers) if p is not None]
        allpos = [p[np.isfinite(p).all(axis=1)] for p in allpos]
        allpos = [p for p in allpos if len(p)]
        if not allpos:
            what = f"layer {layers[0].name}" if level == "node" and layers else "these layers"
            self._set_title(f"<i>No t-SNE embedding of {what} at {f.label} "
                            "(it was not computed, or it failed for this epoch).</i>")
            return
        pts = np.concatenate(allpos)
        span = max(float(np.ptp(pts[:, 0])), float(np.ptp(pts[:, 1])), 1e-6)
        n_total = sum(lf.n_filters for lf in layers)
        size = span * (0.1 if n_total <= 40 else 0.07 if n_total <= 120 else 0.045)
        img: dict[str, list[Any]] = {"image": [], "x": [], "y": [], "dw": [], "dh": []}
        circ: dict[str, list[Any]] = {k: [] for k in self._circ.data}
        for lf in layers:
            pos = self._positions(lf, level)
            if pos is None:
                continue
            pics = _pictures(lf, self.probe)
            values = lf.measures.get(self.measure)
            vmax = float(np.nanmax(np.abs(values))) if values is not None and len(values) else 0.0
            layer_color = _LAYER_COLORS[lf.index % len(_LAYER_COLORS)] if level == "layer" \
                else MEASURE_COLORS[self.measure]
            for i in range(lf.n_filters):
                x, y = pos[i]
                if not (np.isfinite(x) and np.isfinite(y)):
                    continue
                v = float(values[i]) if values is not None and i < len(values) and np.isfinite(values[i]) else 0.0
                rel = abs(v) / vmax if vmax > 0 else 0.0
                if pics is not None:
                    img["image"].append(rgba_uint32(pics[i]))
                    img["x"].append(x - size / 2)
                    img["y"].append(y - size / 2)
                    img["dw"].append(size)
                    img["dh"].append(size)
                circ["x"].append(x)
                circ["y"].append(y)
                circ["r"].append(size * (0.6 + 0.6 * np.sqrt(rel)))
                circ["layer"].append(lf.name)
                circ["index"].append(i)
                circ["uid"].append(int(lf.uids[i]))
                circ["frozen"].append("yes" if lf.frozen[i] else "no")
                circ["line"].append(FROZEN if lf.frozen[i] else layer_color)
                circ["fill"].append(layer_color)
                for m in MEASURES:
                    mv = lf.measures.get(m)
                    circ[m].append(float(mv[i]) if mv is not None and i < len(mv) else float("nan"))
        self._img.data = img
        self._circ.data = circ
        cx, cy = np.asarray(circ["x"], np.float64), np.asarray(circ["y"], np.float64)
        self._fit(cx, cy, size * 1.6)
        if self.trails and self.history is not None and len(self.history) and f.epoch is not None:
            self._draw_trails(f, layers, level)
        where = f"layer {layers[0].name}" if level == "node" else "all conv layers"
        self._set_title(
            f"<b>{where}</b> · {f.label} · {len(circ['x'])} filters · circle size: "
            f"{MEASURE_LABELS[self.measure]} (larger = still changing) · "
            + ("pictures: weights (first layer) and activation maps of the chosen probe"
               if level == "layer" or (layers and layers[0].index > 0)
               else "pictures: the filters' RGB weights")
        )

    def _trail_index(self) -> dict[tuple[str, int], tuple[np.ndarray, ...]]:
        """Per (layer, uid): epochs and node/layer-level positions, built once per history."""
        h = self.history
        if self._trail_cache is not None and self._trail_cache[0] is h:
            return self._trail_cache[1]
        index: dict[tuple[str, int], tuple[np.ndarray, ...]] = {}
        if h is not None and len(h) and "tsne_x" in h:
            cols = ["epoch", "tsne_x", "tsne_y"]
            cols += ["layer_tsne_x", "layer_tsne_y"] if "layer_tsne_x" in h else []
            for (layer, uid), g in h.sort_values("epoch").groupby(["layer", "filter_uid"], sort=False):
                arr = g[cols].to_numpy(np.float64)
                index[(str(layer), int(uid))] = tuple(arr[:, j] for j in range(arr.shape[1]))
        self._trail_cache = (h, index)
        return index

    def _draw_trails(self, f: NetworkFrame, layers: list[LayerFrame], level: str) -> None:
        index = self._trail_index()
        col = 1 if level == "node" else 3
        lo, hi = f.epoch - self.trail_length, f.epoch
        xs, ys, colors = [], [], []
        for lf in layers:
            color = _LAYER_COLORS[lf.index % len(_LAYER_COLORS)] if level == "layer" else "#94a3b8"
            for uid in lf.uids:
                t = index.get((lf.name, int(uid)))
                if t is None or len(t) <= col + 1:
                    continue
                ep = t[0]
                a, b = np.searchsorted(ep, lo, "left"), np.searchsorted(ep, hi, "right")
                if b - a < 2:
                    continue
                x, y = t[col][a:b], t[col + 1][a:b]
                ok = np.isfinite(x) & np.isfinite(y)
                if ok.sum() < 2:
                    continue
                xs.append(x[ok])
                ys.append(y[ok])
                colors.append(color)
        self._trail.data = {"xs": xs, "ys": ys, "color": colors}

    def _draw_cloud(self) -> None:
        if self.cloud is None:
            self._set_title("<i>The cloud of every recorded filter is not available here.</i>")
            return
        try:
            df = self.cloud()
        except Exception as exc:  # noqa: BLE001 - show, never raise into the page
            self._set_title(f"<i>Could not read the filters: {exc}</i>")
            return
        x, y = ("layer_tsne_x", "layer_tsne_y")
        d = df.dropna(subset=[x, y]) if len(df) else df
        if not len(d):
            self._set_title("<i>No filter positions recorded yet.</i>")
            return
        n = len(d)
        if n > DATASHADE_ABOVE:
            img, (x0, y0, x1, y1) = datashade_cloud(d, x, y)
            self._shaded.data = {"image": [img], "x": [x0], "y": [y0], "dw": [x1 - x0], "dh": [y1 - y0]}
            how = "Datashader"
        else:
            layers = list(dict.fromkeys(d["layer"]))
            cmap = {name: _LAYER_COLORS[i % len(_LAYER_COLORS)] for i, name in enumerate(layers)}
            self._cloud_pts.data = {
                "x": d[x].to_numpy(), "y": d[y].to_numpy(), "color": [cmap[v] for v in d["layer"]],
                "run_id": d["run_id"].astype(str).to_numpy(), "epoch": d["epoch"].to_numpy(),
                "layer": d["layer"].astype(str).to_numpy(), "uid": d["filter_uid"].to_numpy(),
            }
            how = "points"
        self._fit(d[x].to_numpy(np.float64), d[y].to_numpy(np.float64), 1.0)
        self._set_title(
            f"<b>every filter of every epoch of every run</b> · layer-level t-SNE · {n:,} points "
            f"({how}; colour = layer)"
        )
