"""Filter detail: one filter's weights, its activation on every probe, and its history over epochs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import panel as pn
import param
from bokeh.models import ColumnDataSource, HoverTool, Range1d
from panel.viewable import Viewer

from ..data import NetworkFrame
from ..render import (
    activation_rgb,
    display_images,
    kernel_channels_rgb,
    kernel_rgb,
    png_data_uri,
    sprite,
)
from ..theme import MEASURE_COLORS
from ._component import HTMLView
from ._plots import EpochOverlays, column, make_figure

_CSS = """
.rv-fd { display:flex; flex-direction:column; gap:10px; }
.rv-fd-head { font-size:14px; font-weight:700; }
.rv-fd-head .rv-muted { font-weight:400; font-size:12px; }
.rv-fd-sec { font-size:11.5px; color:var(--rv-muted); text-transform:uppercase; letter-spacing:.04em; margin-top:2px; }
.rv-fd-weights { display:flex; gap:10px; align-items:flex-end; flex-wrap:wrap; }
.rv-fd-weights img { image-rendering:pixelated; border-radius:4px; border:1px solid var(--rv-border); }
.rv-fd-grid { display:grid; gap:4px; }
.rv-fd-cell { display:flex; flex-direction:column; align-items:center; gap:1px; font-size:9.5px; color:var(--rv-muted); }
.rv-fd-cell .rv-p { background-repeat:no-repeat; image-rendering:pixelated; border-radius:2px; }
.rv-fd-cell.rv-cur { outline:2px solid var(--rv-accent); border-radius:3px; }
.rv-fd-chan { background-repeat:no-repeat; image-rendering:pixelated; border-radius:2px; }
"""

_DRAW = r"""
if (!data.head) { el.innerHTML = `<div class="rv-empty rv-fd-empty">${E(data.message || 'Click a filter tile to see its details.')}</div>`; return; }
const o = [`<div class="rv-fd" data-filter="${E(data.id)}"><div class="rv-fd-head">${E(data.head)} <span class="rv-muted">${E(data.sub)}</span></div>`];
if (data.message) o.push(`<div class="rv-info">${E(data.message)}</div>`);
if (data.weights) {
  o.push(`<div class="rv-fd-sec">weights</div><div class="rv-fd-weights">`);
  if (data.weights.rgb) o.push(`<div class="rv-fd-cell"><img src="${data.weights.rgb}" width="84" height="84" alt="weights">RGB</div>`);
  const C = data.weights.channels;
  if (C) {
    const t = C.tile;
    o.push(`<div><div class="rv-fd-grid" style="grid-template-columns:repeat(${C.cols}, ${t}px);--s:url('${U(C.uri)}')">`);
    for (let i = 0; i < C.n; i++) o.push(`<div class="rv-fd-chan" title="${E(C.names[i])}" style="background-image:var(--s);${cut(C.sprite, i, t, t)}"></div>`);
    o.push(`</div><div class="rv-muted" style="font-size:10.5px;margin-top:2px">${E(C.caption)}</div></div>`);
  }
  o.push('</div>');
}
if (data.acts) {
  const A = data.acts; const t = 40;
  o.push(`<div class="rv-fd-sec">activation on every probe</div><div class="rv-fd-grid rv-fd-acts" style="grid-template-columns:repeat(${A.cols}, ${t}px);--a:url('${U(A.uri)}');--p:url('${U(A.probes)}')">`);
  for (let i = 0; i < A.n; i++) {
    o.push(`<div class="rv-fd-cell ${i === A.current ? 'rv-cur' : ''}" title="probe ${i}: ${E(A.names[i])} · max ${E(A.max[i])}">
      <div class="rv-p" style="background-image:var(--a);${cut(A.sprite, i, t, t)}"></div>
      <div class="rv-p" style="background-image:var(--p);${cut(A.probe_sprite, i, t / 2, t / 2)}"></div></div>`);
  }
  o.push('</div>');
}
o.push('<div class="rv-fd-sec">history over epochs</div></div>');
el.innerHTML = o.join('');
"""


class FilterDetailPane(HTMLView):
    _draw = _DRAW
    _stylesheets = [*HTMLView._stylesheets, _CSS]


HISTORY_MEASURES = ("grad_l1", "act_mean", "weight_change_l1", "weight_l2")


class FilterDetail(Viewer):
    """Details of the selected filter at the shown epoch.

    Its weights (an RGB picture for a first-layer filter; one blue–red map per input channel
    deeper), its activation map on every probe (with the probe beneath), and the history of its
    measures over the epochs, found by uid so that deleted and added filters keep their own line.

    Args (params):
        frame: the `NetworkFrame` shown.
        selected: ``(layer, uid)``.
        history: ``filters`` rows of the run's full history (for the measures over epochs).
        kernel_loader: ``(layer) -> (F, kh, kw, c)`` kernel of that layer at the frame's epoch,
            for layers whose kernel the frame does not hold.
        probe: the probe shown in the network view (outlined).

    Example:
        >>> detail = FilterDetail(frame=frame, selected=("conv2", 5), history=bundle.filters)
    """

    frame = param.ClassSelector(class_=NetworkFrame, allow_None=True)
    selected = param.Tuple(default=None, allow_None=True, length=2)
    history = param.DataFrame(default=None, allow_None=True)
    kernel_loader = param.Callable(default=None, allow_None=True)
    probe = param.Integer(default=0, bounds=(0, None))

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._html = FilterDetailPane(sizing_mode="stretch_width", css_classes=["rv-filter-detail"])
        self._hist = ColumnDataSource({"epoch": [], **{m: [] for m in HISTORY_MEASURES},
                                       **{f"{m}_n": [] for m in HISTORY_MEASURES}})
        self.overlays = EpochOverlays()
        self._xr = Range1d(-0.5, 1.5)
        self.figure: Any = None  # built when a filter with a history is first shown (a faster first page)
        # (toggle a Column around the plot: toggling a Bokeh pane's own visibility fails in Panel 1.9)
        self._fig_pane = pn.Column(sizing_mode="stretch_width", visible=False)
        self._layout = pn.Column(self._html, self._fig_pane, sizing_mode="stretch_width",
                                 css_classes=["rv-filter-detail-view"])
        self.param.watch(self._refresh, ["frame", "selected", "history", "probe"])
        self._refresh()

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout

    def _build_figure(self) -> None:
        fig = make_figure("", "relative to its max", height=200, x_range=self._xr, y_range=Range1d(-0.03, 1.08))
        self.overlays.attach(fig)
        colors = {**MEASURE_COLORS, "weight_l2": "#64748B"}
        rs = []
        for m in HISTORY_MEASURES:
            rs.append(fig.line("epoch", f"{m}_n", source=self._hist, color=colors[m], line_width=2, legend_label=m))
            fig.scatter("epoch", f"{m}_n", source=self._hist, color=colors[m], size=4)
        fig.add_tools(HoverTool(renderers=rs[:1], mode="vline", tooltips=[("epoch", "@epoch")] + [
            (m, f"@{m}{{0.0000}}") for m in HISTORY_MEASURES]))
        fig.legend.label_text_font_size = "10px"
        fig.legend.location = "top_left"
        fig.legend.click_policy = "hide"
        fig.legend.background_fill_alpha = 0.6
        self.figure = fig
        self._fig_pane.objects = [pn.pane.Bokeh(fig, sizing_mode="stretch_width")]

    def render_data(self) -> dict[str, Any]:
        """The JSON the browser draws."""
        f, sel = self.frame, self.selected
        if f is None or sel is None:
            return {"message": "Click a filter tile (or a circle in the embedding) to see its details."}
        layer, uid = sel
        lf = f.layer(layer)
        if lf is None:
            return {"message": f"Layer {layer} is not in this record."}
        i = lf.position(uid)
        out: dict[str, Any] = {"id": f"{layer}:{uid}", "head": f"{layer} · filter uid {uid}"}
        if i is None:
            out["sub"] = f"at {f.label}"
            out["message"] = (f"Filter uid {uid} does not exist at {f.label} (it was deleted, or added "
                              "later); its history is below.")
            return out
        flags = [f"index {i}", f.label]
        if lf.frozen[i]:
            flags.append("frozen")
        if lf.added is not None and lf.added[i]:
            flags.append("added at this epoch")
        out["sub"] = " · ".join(flags)
        kernel = lf.kernel
        if kernel is None and self.kernel_loader is not None:
            try:
                kernel = self.kernel_loader(layer)
            except Exception:  # noqa: BLE001 - the rest of the detail still shows
                kernel = None
        if kernel is not None and i < len(kernel):
            k = np.asarray(kernel[i], np.float32)
            w: dict[str, Any] = {}
            if k.shape[-1] == 3 and lf.index == 0:
                rgb = kernel_rgb(k[None])[0]
                w["rgb"] = png_data_uri(np.kron(rgb, np.ones((4, 4, 1), np.uint8)))
            chans = kernel_channels_rgb(k)
            c = len(chans)
            names = (["R", "G", "B"] if c == 3 and lf.index == 0 else [f"input channel {j}" for j in range(c)])
            cols = min(c, 8)
            tile = 26 if c > 3 else 40
            sp = sprite(chans)
            w["channels"] = {"uri": sp.uri, "sprite": sp.css(), "n": c, "cols": cols, "tile": tile, "names": names,
                             "caption": f"{c} input channel(s), blue negative … red positive"}
            out["weights"] = w
        acts = lf.activations
        if acts is not None and len(acts):
            maps = np.asarray(acts[:, i], np.float32)
            scale = float(np.nanmax(np.abs(maps))) if maps.size else 0.0
            tiles = activation_rgb(maps, np.full(len(maps), scale, np.float32))
            probes = np.asarray(f.probe_images)
            if probes.ndim == 3:
                probes = probes[..., None]
            if probes.shape[-1] == 1:
                probes = np.repeat(probes, 3, axis=-1)
            labels = f.probe_labels
            sp_a, sp_p = sprite(tiles), sprite(display_images(probes))
            out["acts"] = {
                "uri": sp_a.uri, "probes": sp_p.uri, "sprite": sp_a.css(), "probe_sprite": sp_p.css(),
                "n": int(len(maps)), "cols": min(8, len(maps)), "current": int(self.probe),
                "names": [f.class_name(int(k)) for k in labels],
                "max": [f"{float(np.max(m)):.3g}" for m in maps],
            }
        return out

    def _refresh(self, *_: Any) -> None:
        self._html.data = self.render_data()
        h = self.history
        sel = self.selected
        if h is None or sel is None or not len(h):
            self._hist.data = {k: [] for k in self._hist.data}
            self._fig_pane.visible = False
            return
        g = h[(h["layer"] == sel[0]) & (h["filter_uid"] == int(sel[1]))].sort_values("epoch")
        data: dict[str, Any] = {"epoch": column(g, "epoch")}
        for m in HISTORY_MEASURES:
            v = column(g, m)
            mx = np.nanmax(np.abs(v)) if np.isfinite(v).any() else 0.0
            data[m] = v
            data[f"{m}_n"] = v / mx if mx > 0 else v * 0
        self._hist.data = data
        ep = data["epoch"]
        if len(ep):
            self._xr.start, self._xr.end = float(np.nanmin(ep)) - 0.5, max(float(np.nanmax(ep)), float(np.nanmin(ep)) + 1) + 0.5
        self.overlays.set_epoch(self.frame.epoch if self.frame is not None else None)
        if len(g) and self.figure is None:
            self._build_figure()
        self._fig_pane.visible = bool(len(g))


def history_of(history: pd.DataFrame | None, layer: str, uid: int) -> pd.DataFrame:
    """The rows of one filter (by uid) in a ``filters`` table, ascending by epoch.

    Example:
        >>> history_of(bundle.filters, "conv1", 3).epoch.tolist()
        [0, 1, 2, 3]
    """
    if history is None or not len(history):
        return pd.DataFrame()
    return history[(history["layer"] == layer) & (history["filter_uid"] == int(uid))].sort_values("epoch")

