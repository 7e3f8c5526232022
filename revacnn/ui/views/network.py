"""The network view: the probe, one column of filter tiles per conv layer, then class probabilities."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import panel as pn
import param
from panel.viewable import Viewer

from ..data import MEASURES, LayerFrame, NetworkFrame
from ..render import activation_rgb, display_images, kernel_rgb, png_data_uri, sprite
from ..theme import MEASURE_COLORS, MEASURE_LABELS
from ._component import HTMLView, RenderCache, signature
from .doctor import KIND_COLORS

_SPRITES = RenderCache(512)

_CSS = """
.rv-net { display:flex; flex-wrap:wrap; gap:18px; align-items:flex-start; overflow-x:auto; padding:4px 2px 8px 2px; }
.rv-col { flex: 0 0 auto; display:flex; flex-direction:column; gap:6px; }
.rv-col-title { font-size:12.5px; font-weight:600; color:var(--rv-fg); white-space:nowrap; }
.rv-col-sub { font-size:11px; color:var(--rv-muted); white-space:nowrap; }
.rv-probe-img { width:128px; height:128px; image-rendering:pixelated; border-radius:6px;
  border:1px solid var(--rv-border); }
.rv-grid { display:grid; gap:3px; position:relative; }
.rv-grid > canvas.rv-canvas { position:absolute; left:0; top:0; pointer-events:none; image-rendering:pixelated; }
.rv-grid > .rv-tile { background:transparent; }
.rv-tile { position:relative; cursor:pointer; border-radius:3px; background:var(--rv-tile-bg);
  outline:1px solid transparent; padding:0; }
.rv-tile:hover { outline:2px solid var(--rv-accent); z-index:2; }
.rv-tile .rv-img { background-repeat:no-repeat; image-rendering:pixelated; border-radius:3px 3px 0 0; }
.rv-tile .rv-bar { height:4px; background:rgba(127,127,127,.25); border-radius:0 0 3px 3px; overflow:hidden; }
.rv-tile .rv-bar > i { display:block; height:100%; }
.rv-tile.rv-frozen { outline:2px solid var(--rv-frozen); }
.rv-tile.rv-added { outline:2px solid var(--rv-added); }
.rv-tile.rv-selected { outline:3px solid var(--rv-accent); z-index:3; }
.rv-tile .rv-flag { position:absolute; top:-6px; right:-6px; font-size:10px; line-height:13px; width:13px;
  height:13px; text-align:center; border-radius:50%; color:#fff; font-weight:700; pointer-events:none; }
.rv-flag.rv-f-frozen { background:var(--rv-frozen); }
.rv-flag.rv-f-added { background:var(--rv-added); }
.rv-tile.rv-deleted { background:transparent; outline:1px dashed var(--rv-deleted); cursor:default;
  display:flex; align-items:center; justify-content:center; color:var(--rv-deleted); font-weight:700; }
.rv-tile .rv-doc-dot { position:absolute; top:-4px; left:-4px; width:9px; height:9px; border-radius:50%;
  border:1.5px solid var(--rv-card, #fff); pointer-events:none; z-index:4; }
.rv-tile.rv-doc-flagged { outline-style:solid; outline-width:2px; }
.rv-layer-doc { font-size:11px; color:#fff; border-radius:999px; padding:0 7px; margin-left:3px; }
.rv-layer-frozen { font-size:11px; color:#fff; background:var(--rv-frozen); border-radius:999px; padding:0 7px; }
.rv-layer-error { max-width:240px; font-size:12px; }
.rv-layer.rv-touched { outline:2px dashed var(--rv-added); outline-offset:4px; border-radius:4px; }
.rv-layer-touched { font-size:11px; color:#fff; background:var(--rv-added); border-radius:999px; padding:0 7px;
  margin-left:3px; }
.rv-touched-other { font-size:11.5px; color:var(--rv-muted); margin:0 0 6px 2px; }
.rv-touched-layer { font-weight:600; color:var(--rv-fg); border-bottom:2px dashed var(--rv-added); }
.rv-probs { min-width:170px; }
.rv-prob { display:grid; grid-template-columns: 92px 1fr 38px; gap:6px; align-items:center; font-size:11.5px;
  margin:2px 0; }
.rv-prob .rv-name { white-space:nowrap; overflow:hidden; text-overflow:ellipsis; }
.rv-prob .rv-track { height:9px; background:rgba(127,127,127,.18); border-radius:5px; overflow:hidden; }
.rv-prob .rv-track > i { display:block; height:100%; background:var(--rv-muted); border-radius:5px; }
.rv-prob.rv-pred .rv-track > i { background:var(--rv-accent); }
.rv-prob.rv-true .rv-name { font-weight:700; }
.rv-prob .rv-val { text-align:right; font-variant-numeric: tabular-nums; color:var(--rv-muted); }
.rv-legend { display:flex; gap:14px; flex-wrap:wrap; font-size:11.5px; color:var(--rv-muted); margin-top:6px; }
.rv-legend i { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:4px; vertical-align:-1px; }
.rv-verdict { font-size:12px; margin-top:6px; }
.rv-compact { gap:10px; flex-wrap:wrap; }
.rv-compact .rv-probe-img { width:72px; height:72px; }
.rv-compact .rv-probs { min-width:120px; }
.rv-compact .rv-prob { grid-template-columns: 64px 1fr 30px; font-size:10.5px; }
.rv-ok { color:#16a34a; font-weight:600; } .rv-bad { color:#dc2626; font-weight:600; }
"""

_DRAW = r"""
// A layer's tiles are drawn on one canvas behind the grid's (transparent) tile elements: tile i of
// the sprite S at column i % cols, row i / cols, each cell t px plus a `bar` px measure bar, 3 px
// apart. The grid's data-sprite is the picture asked for, data-drawn the one on the canvas.
function paint(g, S, n, cols, t, bar) {
  const url = U(S.uri), c = g.querySelector(':scope > canvas.rv-canvas');
  g.dataset.sprite = url;
  const rows = Math.ceil(n / cols), W = Math.max(1, cols * (t + 3) - 3), H = Math.max(1, rows * (t + bar + 3) - 3);
  const dpr = window.devicePixelRatio || 1;
  if (c.width !== Math.round(W * dpr) || c.height !== Math.round(H * dpr)) {
    c.width = Math.round(W * dpr); c.height = Math.round(H * dpr);
    c.style.width = `${W}px`; c.style.height = `${H}px`;
  }
  const img = IMG(url);
  const draw = () => {
    if (g.dataset.sprite !== url) return;  // a newer picture was asked for meanwhile
    const ctx = c.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.clearRect(0, 0, W, H);
    const cw = S.w + 2 * S.pad;
    for (let i = 0; i < n && i < S.n; i++) {
      ctx.drawImage(img, i * cw + S.pad, S.pad, S.w, S.h, (i % cols) * (t + 3), Math.floor(i / cols) * (t + bar + 3), t, t);
    }
    g.dataset.drawn = url;
  };
  if (img.complete && img.naturalWidth) draw(); else img.decode().then(draw, () => {});
}
const fmt = (v) => (v === null || v === undefined || !isFinite(v)) ? '–' : Number(v).toPrecision(4).replace(/\.?0+(e|$)/, '$1');
if (!data || !data.layers) { el.innerHTML = ''; el._struct = null; return; }
el._data = data;
if (!el._tips) {  // tooltips are built on hover, from the latest data (cheaper than 1000 titles per draw)
  el._tips = true;
  el.addEventListener('mouseover', (ev) => {
    const t = ev.target.closest('.rv-tile[data-i]');
    if (!t) return;
    const d = el._data, L = d.layers[+t.dataset.j], i = +t.dataset.i;
    if (!L || !L.uids) return;
    const tip = [`${L.name} · filter ${i} (uid ${L.uids[i]})`];
    if (t.dataset.kind === 'weights') tip.push('weights as an RGB picture');
    for (const [m, vals] of Object.entries(L.measures || {})) tip.push(`${m}: ${fmt(vals[i])}`);
    if (L.amax) tip.push(`max activation on this probe: ${fmt(L.amax[i])}`);
    if (L.frozen[i]) tip.push('frozen');
    if (L.added[i]) tip.push('added at this epoch');
    if (L.badges && L.badges[i]) tip.push(`doctor: ${L.badges[i].kind}`);
    t.title = tip.join('\n');
  });
}
const struct = JSON.stringify([data.message ? 1 : 0, !!data.probe_img, data.compact, data.selected_set,
  data.layers.map((L) => [L.name, L.n, L.cols, L.tile, L.layer_frozen, L.error, L.uids, L.frozen, L.added, L.deleted, !!L.weights, L.layer_badges, L.touched]),
  data.touched_other, !!data.has_findings,
  (data.probs || []).map((p) => [p.name, p.true])]);
if (el._struct === struct) {
  performance.mark('rv-net swap');
  // Same network, another epoch or probe: swap the pictures and numbers in place.
  const net = el.querySelector('.rv-net');
  net.dataset.epoch = data.epoch ?? ''; net.dataset.probe = data.probe ?? ''; net.dataset.key = data.key ?? '';
  net.dataset.complete = data.complete ? '1' : '0';
  const msg = el.querySelector('.rv-net-message'); if (msg) msg.textContent = data.message;
  const img = el.querySelector('.rv-probe-img'); if (img) img.src = data.probe_img;
  const pt = el.querySelector('.rv-probe-col .rv-col-title'); if (pt) pt.textContent = data.probe_title;
  const pl = el.querySelector('.rv-probe-col .rv-col-sub'); if (pl) pl.textContent = data.label;
  const cols = el.querySelectorAll('.rv-layer');
  data.layers.forEach((L, j) => {
    if (L.error) return;
    const g = cols[j].querySelector('.rv-grid-acts');
    paint(g, L.sprite, L.n, L.cols, L.tile, 4); g.dataset.sig = L.sig;
    g.querySelectorAll('.rv-bar > i').forEach((b, i) => {
      b.style.width = `${Math.max(0, Math.min(100, 100 * (L.bar[i] ?? 0))).toFixed(1)}%`;
      b.style.background = data.measure_color;
    });
    // the doctor's per-filter findings change from epoch to epoch: only the tiles whose badge changed
    const tiles = g.querySelectorAll(':scope > .rv-tile[data-i]');
    for (let i = 0; i < L.n; i++) {
      const bd = L.badges ? L.badges[i] : null, t = tiles[i], key = bd ? `${bd.kind}|${bd.color}` : '';
      if ((t.dataset.badge || '') === key) continue;
      t.dataset.badge = key;
      t.classList.toggle('rv-doc-flagged', !!bd);
      t.style.outlineColor = bd ? bd.color : '';
      let dot = t.querySelector('.rv-doc-dot');
      if (!bd) { if (dot) dot.remove(); continue; }
      if (!dot) { dot = document.createElement('span'); dot.className = 'rv-doc-dot'; t.appendChild(dot); }
      dot.dataset.kind = bd.kind; dot.style.background = bd.color;
    }
    if (L.weights) {
      const w = cols[j].querySelector('.rv-grid-weights');
      paint(w, L.weights, L.n, L.cols, L.tile, 0); w.dataset.sig = L.wsig;
    }
  });
  const rows = el.querySelectorAll('.rv-prob');
  (data.probs || []).forEach((p, k) => {
    rows[k].querySelector('.rv-track > i').style.width = `${(100 * p.p).toFixed(1)}%`;
    rows[k].querySelector('.rv-val').textContent = `${(100 * p.p).toFixed(0)}%`;
    rows[k].classList.toggle('rv-pred', !!p.pred);
  });
  const v = el.querySelector('.rv-verdict');
  if (v) { v.textContent = data.verdict; v.className = `rv-verdict ${data.verdict_ok ? 'rv-ok' : 'rv-bad'}`; }
  const lg = el.querySelector('.rv-legend .rv-legend-measure');
  if (lg) lg.innerHTML = `<i style="background:${data.measure_color}"></i>bar: ${E(data.measure_label)} (relative to the layer's max)`;
  return;
}
el._struct = struct;
performance.mark('rv-net build');
const parts = [];
if (data.message) parts.push(`<div class="${data.layers.length ? 'rv-alert' : 'rv-empty'} rv-net-message">${E(data.message)}</div>`);
if (data.touched_other && data.touched_other.length) {
  parts.push(`<div class="rv-touched-other">also changed by filter surgery at this epoch: ${data.touched_other.map((t) =>
    `<span class="rv-touched-layer" data-layer="${E(t.name)}" title="${E(t.label)}">${E(t.name)}</span>`).join(', ')}</div>`);
}
parts.push(`<div class="rv-net ${data.compact ? 'rv-compact' : ''}" data-epoch="${E(data.epoch)}" data-probe="${E(data.probe)}" data-key="${E(data.key)}" data-complete="${data.complete ? 1 : 0}">`);
if (data.probe_img) {
  parts.push(`<div class="rv-col rv-probe-col"><div class="rv-col-title">${E(data.probe_title)}</div>
    <img class="rv-probe-img" src="${data.probe_img}" alt="probe">
    <div class="rv-col-sub">${E(data.label)}</div></div>`);
}
data.layers.forEach((L, j) => {
  parts.push(`<div class="rv-col rv-layer${L.touched ? ' rv-touched' : ''}" data-layer="${E(L.name)}"${L.touched ? ` data-touched="${E(L.touched)}"` : ''}>`);
  parts.push(`<div class="rv-col-title">${E(L.name)} <span class="rv-col-sub">${L.n} filters</span>
     ${L.layer_frozen ? '<span class="rv-layer-frozen">frozen</span>' : ''}${L.touched ? `<span class="rv-layer-touched" title="changed by ${E(L.touched)} at this epoch">✂ ${E(L.touched)}</span>` : ''}${(L.layer_badges || []).map((b) =>
       `<span class="rv-layer-doc" data-kind="${E(b.kind)}" style="background:${b.color}" title="doctor: ${E(b.kind)}">${E(b.kind)}</span>`).join('')}</div>`);
  if (L.error) { parts.push(`<div class="rv-alert rv-layer-error">${E(L.error)}</div></div>`); return; }
  const grids = [['acts', L.sprite, L.sig]];
  if (L.weights) grids.push(['weights', L.weights, L.wsig]);
  for (const [kind, S, sig] of grids) {
    if (kind === 'weights') parts.push(`<div class="rv-col-sub">weights (RGB)</div>`);
    const t = L.tile;
    parts.push(`<div class="rv-grid rv-grid-${kind}" data-sig="${sig}" data-j="${j}" style="grid-template-columns:repeat(${L.cols}, ${t}px);"><canvas class="rv-canvas"></canvas>`);
    for (let i = 0; i < L.n; i++) {
      const cls = ['rv-tile'];
      if (L.frozen[i]) cls.push('rv-frozen');
      if (L.added[i]) cls.push('rv-added');
      if ((data.selected_set || []).includes(`${L.name}:${L.uids[i]}`)) cls.push('rv-selected');
      const bd = kind === 'acts' && L.badges ? L.badges[i] : null;
      if (bd) cls.push('rv-doc-flagged');
      const w = Math.max(0, Math.min(100, 100 * (L.bar[i] ?? 0)));
      const dot = bd ? `<span class="rv-doc-dot" data-kind="${E(bd.kind)}" style="background:${bd.color}"></span>` : '';
      const flag = L.frozen[i] && !L.layer_frozen ? '<span class="rv-flag rv-f-frozen">❄</span>'
                 : (L.added[i] ? '<span class="rv-flag rv-f-added">+</span>' : '');
      parts.push(`<div class="${cls.join(' ')}"${bd ? ` style="outline-color:${bd.color}" data-badge="${E(bd.kind)}|${bd.color}"` : ''} tabindex="0" data-j="${j}" data-i="${i}" data-kind="${kind}" data-click="${E(L.name)}:${L.uids[i]}">
        <div class="rv-img" style="width:${t}px;height:${t}px"></div>
        ${kind === 'acts' ? `<div class="rv-bar"><i style="width:${w.toFixed(1)}%;background:${data.measure_color}"></i></div>` : ''}${flag}${dot}</div>`);
    }
    if (kind === 'acts') for (const uid of L.deleted) {
      parts.push(`<div class="rv-tile rv-deleted" style="width:${t}px;height:${t + 4}px" title="filter uid ${uid} was deleted here">✕</div>`);
    }
    parts.push('</div>');
  }
  parts.push('</div>');
});
if (data.probs && data.probs.length) {
  parts.push(`<div class="rv-col rv-probs"><div class="rv-col-title">class probabilities</div>`);
  for (const p of data.probs) {
    parts.push(`<div class="rv-prob ${p.pred ? 'rv-pred' : ''} ${p.true ? 'rv-true' : ''}">
      <span class="rv-name" title="${E(p.name)}">${p.true ? '✓ ' : ''}${E(p.name)}</span>
      <span class="rv-track"><i style="width:${(100 * p.p).toFixed(1)}%"></i></span>
      <span class="rv-val">${(100 * p.p).toFixed(0)}%</span></div>`);
  }
  if (data.verdict) parts.push(`<div class="rv-verdict ${data.verdict_ok ? 'rv-ok' : 'rv-bad'}">${E(data.verdict)}</div>`);
  parts.push('</div>');
}
parts.push('</div>');
if (data.layers.length) {
  parts.push(`<div class="rv-legend"><span class="rv-legend-measure"><i style="background:${data.measure_color}"></i>bar: ${E(data.measure_label)} (relative to the layer's max)</span>
    <span><i style="background:var(--rv-frozen)"></i>frozen</span><span><i style="background:var(--rv-added)"></i>added this epoch</span>
    <span><i style="border:1px dashed var(--rv-deleted)"></i>deleted</span>${data.layers.some((L) => L.touched) ? '<span><i style="border:2px dashed var(--rv-added)"></i>layer changed by filter surgery at this epoch</span>' : ''}${data.has_findings ? '<span><i style="border-radius:50%;background:#dc2626"></i>doctor finding (see the Doctor panel)</span>' : ''}<span>tile: activation map of the probe (click for details)</span></div>`);
}
el.innerHTML = parts.join('');
el.querySelectorAll('.rv-grid[data-j]').forEach((g) => {
  const L = data.layers[+g.dataset.j], acts = g.classList.contains('rv-grid-acts');
  paint(g, acts ? L.sprite : L.weights, L.n, L.cols, L.tile, acts ? 4 : 0);
});
"""


class NetworkCanvas(HTMLView):
    _draw = _DRAW
    _stylesheets = [*HTMLView._stylesheets, _CSS]


_REV = [0]


def _next_rev() -> int:
    """A new number for every drawing: param compares a new dict with the old one item by item, and a
    differing first item ends that comparison at once."""
    _REV[0] += 1
    return _REV[0]


def _grid_shape(n: int, width: int) -> tuple[int, int]:
    cols = max(1, math.ceil(math.sqrt(max(n, 1))))
    tile = int(max(12, min(64, (width - 3 * (cols - 1)) // cols)))
    return cols, tile


def _sig(sp: Any) -> str:
    """A short checksum of a sprite's picture.

    The end of a PNG holds the CRC-32 of its compressed pixels, so the last characters of the
    data URI (plus its length) identify the picture without hashing the whole string.
    """
    return f"{signature(sp.uri[-96:])}{len(sp.uri):x}"


def _json_floats(values: np.ndarray) -> list[float | None]:
    v = np.asarray(values, np.float64)
    return [None if x != x or x in (np.inf, -np.inf) else x for x in np.round(v, 6).tolist()]


def _bar(values: np.ndarray | None, n: int) -> list[float]:
    if values is None or len(values) != n:
        return [0.0] * n
    v = np.nan_to_num(np.asarray(values, np.float64), nan=0.0)
    v = np.abs(v)
    m = float(v.max()) if n else 0.0
    return [round(float(x) / m, 4) if m > 0 else 0.0 for x in v]


def probe_image_uri(frame: NetworkFrame, probe: int) -> str:
    """The probe image as a PNG data URI (greyscale probes drawn in grey).

    Example:
        >>> probe_image_uri(frame, 0).startswith("data:image/png")
        True
    """
    def make() -> str:
        img = np.asarray(frame.probe_images[probe])
        if img.ndim == 2:
            img = img[..., None]
        if img.shape[-1] == 1:
            img = np.repeat(img, 3, axis=-1)
        return png_data_uri(display_images(img[None])[0])

    return _SPRITES.get_or(("probe", id(frame.probe_images), frame.probe_images.shape, probe), make)


def layer_sprites(frame: NetworkFrame, lf: LayerFrame, probe: int, tile: int | None = None) -> Any:
    """The `Sprite` of one layer's activation tiles for one probe (cached per frame and probe).

    Maps at least twice as large as the ``tile`` they are drawn in are averaged down in whole
    blocks first (a 32 x 32 map shown in 12 px tiles is sent as 16 x 16): the picture looks the
    same and the page gets a quarter of the bytes (256 filters per layer: ~4x less to send and decode).

    Example:
        >>> layer_sprites(frame, frame.layers[0], 0).n
        16
    """
    assert lf.activations is not None
    maps = lf.activations[probe]
    k = max(1, min(maps.shape[-2], maps.shape[-1]) // tile) if tile else 1

    def make() -> Any:
        a = maps
        if k > 1:
            f, h, w = a.shape[0], a.shape[-2] // k, a.shape[-1] // k
            a = np.asarray(a[:, : h * k, : w * k], np.float32).reshape(f, h, k, w, k).mean(axis=(2, 4))
        return sprite(activation_rgb(a, lf.activation_scale()))

    return _SPRITES.get_or(("acts", frame.key, lf.name, probe, k), make)


def prerender(frame: NetworkFrame, probe: int = 0, width_per_layer: int = 300) -> None:
    """Render (and cache) what `NetworkView` will draw for ``frame`` and ``probe``, off the event loop.

    The live feed calls it in the poller thread for each new snapshot, so that a session's
    redraw only looks the sprites up and a click waiting on the same event loop is not delayed.

    Example:
        >>> prerender(frame, probe=0)
    """
    for lf in frame.layers:
        if lf.activations is None or lf.error is not None or not frame.n_probes:
            continue
        _, tile = _grid_shape(lf.n_filters, width_per_layer)
        layer_sprites(frame, lf, min(probe, frame.n_probes - 1), tile)
        if lf.kernel is not None and lf.index == 0:
            weight_sprite(frame, lf)


def weight_sprite(frame: NetworkFrame, lf: LayerFrame) -> Any:
    """The `Sprite` of a layer's kernels drawn as RGB pictures (cached per frame)."""
    assert lf.kernel is not None
    return _SPRITES.get_or(("weights", frame.key, lf.name), lambda: sprite(kernel_rgb(lf.kernel)))


class NetworkView(Viewer):
    """ReVACNN's network view over a `NetworkFrame`: every filter's activation map for one probe.

    Columns: the probe image, then one per conv layer (a tile per filter with a bar for the chosen
    measure; frozen, added and deleted filters marked; the first layer's weights as RGB pictures),
    then the probe's class probabilities. Clicking a tile sets `selected` to ``(layer, uid)``.

    The view only draws what it is given: set `frame` from an epoch record
    (`ReplayData.frame`) or from the live snapshot (`frame_from_live`).

    Example:
        >>> view = NetworkView(frame=data.frame(bundle, 3), probe=0, measure="grad_l1")
        >>> view.param.watch(lambda e: print(e.new), "selected")
    """

    frame = param.ClassSelector(class_=NetworkFrame, allow_None=True, doc="What to draw.")
    probe = param.Integer(default=0, bounds=(0, None), doc="Index of the probe image shown.")
    measure = param.Selector(default="grad_l1", objects=list(MEASURES), doc="Per-filter measure of the bars.")
    show_weights = param.Boolean(default=True, doc="Also draw the first layer's weights as RGB pictures.")
    selected = param.Tuple(default=None, allow_None=True, length=2, doc="(layer, uid) of the clicked filter.")
    selection = param.List(default=[], item_type=str,
                           doc="'layer:uid' of more filters to highlight (the live page's steering selection).")
    findings = param.List(default=[], item_type=dict,
                          doc="doctor findings to badge: dicts with 'layer', 'uid' ('' or None: the "
                              "layer) and 'kind' (e.g. `DoctorPanel.rows()`).")
    touched = param.Dict(default={}, doc="layer -> label of the filter surgery that changed it at this "
                                         "frame's epoch (`RunBundle.touched`): those layers are marked.")
    clicks = param.Integer(default=0, doc="Counts tile clicks (a click on the selected tile counts too).")
    width_per_layer = param.Integer(default=300, bounds=(80, 800), doc="Pixel budget of a layer column.")
    compact = param.Boolean(default=False, doc="Smaller probe image and probability column (side by side).")
    empty_message = param.String(default="Choose a run to see its network.")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._canvas = NetworkCanvas(sizing_mode="stretch_width", css_classes=["rv-network"])
        self._canvas.param.watch(self._on_click, "clicked")
        self.param.watch(self._refresh, ["frame", "probe", "measure", "show_weights", "selected",
                                         "selection", "width_per_layer", "empty_message", "compact", "findings",
                                         "touched"])
        self._refresh()

    def __panel__(self) -> pn.viewable.Viewable:
        return self._canvas

    def _on_click(self, event: param.parameterized.Event) -> None:
        value = self._canvas.clicked_value
        if ":" not in value:
            return
        layer, uid = value.rsplit(":", 1)
        try:
            self.selected = (layer, int(uid))
        except ValueError:
            return
        self.clicks += 1

    def render_data(self) -> dict[str, Any]:
        """The JSON the browser draws (also handy for tests: no browser needed)."""
        f = self.frame
        if f is None:
            return {"layers": [], "message": self.empty_message}
        P = f.n_probes
        probe = min(self.probe, P - 1) if P else 0
        out: dict[str, Any] = {
            "rev": _next_rev(),
            "epoch": f.epoch,
            "complete": not f.partial,
            "label": f.label,
            "probe": probe,
            "message": f.message,
            "measure": self.measure,
            "measure_color": MEASURE_COLORS[self.measure],
            "measure_label": MEASURE_LABELS[self.measure],
            "compact": self.compact,
            "selected": f"{self.selected[0]}:{self.selected[1]}" if self.selected else None,
            "selected_set": sorted(set(self.selection)
                                   | ({f"{self.selected[0]}:{self.selected[1]}"} if self.selected else set())),
            "layers": [],
            "probs": [],
        }
        if P:
            label = int(f.probe_labels[probe]) if len(f.probe_labels) > probe else -1
            out["probe_img"] = probe_image_uri(f, probe)
            out["probe_title"] = f"probe {probe} · {f.class_name(label)}"
        sigs = []
        by_uid: dict[tuple[str, int], dict[str, str]] = {}
        by_layer: dict[str, list[dict[str, str]]] = {}
        for d in self.findings:
            kind = str(d.get("kind"))
            badge = {"kind": kind, "color": KIND_COLORS.get(kind, "#64748b")}
            uid = d.get("uid")
            if uid is None or uid == "" or (isinstance(uid, float) and math.isnan(uid)):
                if badge not in by_layer.setdefault(str(d.get("layer")), []):
                    by_layer[str(d.get("layer"))].append(badge)
            else:
                by_uid.setdefault((str(d.get("layer")), int(uid)), badge)
        out["has_findings"] = bool(by_uid or by_layer)
        shown = {lf.name for lf in f.layers}
        out["touched_other"] = [{"name": k, "label": v} for k, v in self.touched.items() if k not in shown]
        for lf in f.layers:
            n = lf.n_filters
            cols, tile = _grid_shape(n, self.width_per_layer)
            entry: dict[str, Any] = {
                "name": lf.name, "n": n, "cols": cols, "tile": tile,
                "layer_frozen": bool(lf.layer_frozen),
                "uids": [int(u) for u in lf.uids],
                "frozen": [bool(x) for x in lf.frozen],
                "added": [bool(x) for x in (lf.added if lf.added is not None else np.zeros(n, bool))],
                "deleted": [int(u) for u in lf.deleted],
                "error": lf.error,
                "badges": [by_uid.get((lf.name, int(u))) for u in lf.uids] if by_uid else None,
                "layer_badges": by_layer.get(lf.name, []),
                "touched": self.touched.get(lf.name),
            }
            if lf.error is None and (lf.activations is None or not P):
                entry["error"] = f"{lf.name}: no activation maps in this record."
            if entry["error"] is None:
                sp = layer_sprites(f, lf, probe, tile)
                entry["sprite"] = sp.css()
                entry["sig"] = _sig(sp)
                sigs.append(entry["sig"])
                values = lf.measures.get(self.measure)
                entry["bar"] = _bar(values, n)
                entry["measures"] = {
                    m: _json_floats(lf.measures[m]) for m in MEASURES if m in lf.measures and len(lf.measures[m]) == n
                }
                if lf.activations is not None:
                    entry["amax"] = np.round(lf.abs_max()[probe].astype(np.float64), 5).tolist()
                if self.show_weights and lf.kernel is not None and lf.index == 0:
                    ws = weight_sprite(f, lf)
                    entry["weights"] = ws.css()
                    entry["wsig"] = _sig(ws)
            out["layers"].append(entry)
        if f.probabilities is not None and P and probe < len(f.probabilities):
            p = np.asarray(f.probabilities[probe], np.float64)
            pred = int(np.argmax(p)) if p.size else -1
            label = int(f.probe_labels[probe]) if len(f.probe_labels) > probe else -1
            probs = [
                {"name": f.class_name(k), "p": round(float(p[k]), 4), "pred": k == pred, "true": k == label}
                for k in range(len(p))
            ]
            if self.compact and len(probs) > 5:  # side by side: the five likeliest and the true class
                keep = set(np.argsort(-p)[:5].tolist()) | {label}
                probs = [q for k, q in enumerate(probs) if k in keep]
            out["probs"] = probs
            ok = pred == label
            out["verdict"] = (f"predicted {f.class_name(pred)} — "
                              + ("correct" if ok else f"wrong (true: {f.class_name(label)})"))
            out["verdict_ok"] = ok
        out["key"] = signature(f"{f.key}|{probe}|{'|'.join(sigs)}")
        return out

    def _refresh(self, *_: Any) -> None:
        self._canvas.data = self.render_data()

