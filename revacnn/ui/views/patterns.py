"""Pattern indicators: per conv layer, the cluster score and the RGB mono fraction at the shown epoch."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import panel as pn
import param
from panel.viewable import Viewer

from ._component import HTMLView

_CSS = """
.rv-pats { display:flex; gap:10px; flex-wrap:wrap; }
.rv-pat { border:1px solid var(--rv-border); border-radius:8px; padding:8px 10px; min-width:170px;
  background:var(--rv-panel); font-size:12px; }
.rv-pat-head { font-weight:700; display:flex; justify-content:space-between; gap:6px; }
.rv-pat-row { margin-top:6px; }
.rv-pat-row .rv-lbl { display:flex; justify-content:space-between; color:var(--rv-muted); font-size:11px; }
.rv-pat-row .rv-lbl b { color:var(--rv-fg); font-variant-numeric: tabular-nums; }
.rv-gauge { height:7px; border-radius:4px; background:rgba(127,127,127,.2); overflow:hidden; margin-top:2px; }
.rv-gauge > i { display:block; height:100%; border-radius:4px; }
.rv-pat-note { font-size:11px; margin-top:3px; }
.rv-up { color:#dc2626; } .rv-down { color:#16a34a; } .rv-flat { color:var(--rv-muted); }
"""

_DRAW = r"""
const cards = data.cards || [];
if (!cards.length) { el.innerHTML = `<div class="rv-empty">${E(data.empty || 'No pattern measures for this epoch.')}</div>`; return; }
const o = ['<div class="rv-pats">'];
for (const c of cards) {
  o.push(`<div class="rv-pat" data-layer="${E(c.layer)}"><div class="rv-pat-head"><span>${E(c.layer)}</span><span class="rv-muted">${E(c.tag)}</span></div>`);
  for (const m of c.rows) {
    o.push(`<div class="rv-pat-row" title="${E(m.help)}"><div class="rv-lbl"><span>${E(m.name)}</span>
      <span><b>${E(m.text)}</b> <span class="${m.trend_cls}">${E(m.trend)}</span></span></div>
      <div class="rv-gauge"><i style="width:${(100 * m.value).toFixed(1)}%;background:${m.color}"></i></div>
      <div class="rv-pat-note" style="color:${m.color}">${E(m.note)}</div></div>`);
  }
  o.push('</div>');
}
o.push('</div>');
el.innerHTML = o.join('');
"""


class PatternCards(HTMLView):
    _draw = _DRAW
    _stylesheets = [*HTMLView._stylesheets, _CSS]


def cluster_note(score: float) -> tuple[str, str]:
    """A short reading of a cluster score and its colour.

    Example:
        >>> cluster_note(0.05)[0]
        'diverse filters'
    """
    if score < 0.15:
        return "diverse filters", "#16a34a"
    if score < 0.4:
        return "a few clusters", "#d97706"
    return "crowded into one or two clusters", "#dc2626"


def mono_note(fraction: float) -> tuple[str, str]:
    """A short reading of an RGB mono fraction and its colour.

    Example:
        >>> mono_note(0.8)[1]
        '#dc2626'
    """
    if fraction < 0.25:
        return "filters mix colour channels", "#16a34a"
    if fraction < 0.5:
        return "some single-channel filters", "#d97706"
    return "mostly single-channel filters (ReVACNN: low accuracy)", "#dc2626"


def _trend(now: float, before: float | None) -> tuple[str, str]:
    if before is None or not math.isfinite(before) or not math.isfinite(now):
        return "", "rv-flat"
    d = now - before
    if abs(d) < 0.005:
        return "→", "rv-flat"
    return (f"▲ {d:+.2f}", "rv-up") if d > 0 else (f"▼ {d:+.2f}", "rv-down")


def _num(row: dict[str, Any] | None, key: str) -> float | None:
    if row is None:
        return None
    v = row.get(key)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class PatternIndicators(Viewer):
    """Cards per conv layer: cluster score and (for layers on RGB input) RGB mono fraction.

    Both are in [0, 1]; arrows show the change since the previous epoch. Definitions are in
    `revacnn.analysis.patterns` (a cluster score near 1/k means about k tight clusters).

    Example:
        >>> PatternIndicators(layers=bundle.layers, epoch=3)
    """

    layers = param.DataFrame(default=None, allow_None=True)
    epoch = param.Integer(default=None, allow_None=True)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._cache: tuple[Any, tuple[list[int], dict[int, list[dict[str, Any]]]]] | None = None
        self._cards = PatternCards(sizing_mode="stretch_width", css_classes=["rv-patterns"])
        self.param.watch(self._refresh, ["layers", "epoch"])
        self._refresh()

    def __panel__(self) -> pn.viewable.Viewable:
        return self._cards

    def _index(self) -> tuple[list[int], dict[int, list[dict[str, Any]]]]:
        lay = self.layers
        if self._cache is not None and self._cache[0] is lay:
            return self._cache[1]
        by_epoch: dict[int, list[dict[str, Any]]] = {}
        if lay is not None and len(lay) and "cluster_score" in lay:
            conv = lay[lay["kind"] == "conv"] if "kind" in lay else lay
            if "layer_index" in conv:
                conv = conv.sort_values(["epoch", "layer_index"])
            for r in conv.to_dict("records"):
                by_epoch.setdefault(int(r["epoch"]), []).append(r)
        result = (sorted(by_epoch), by_epoch)
        self._cache = (lay, result)
        return result

    def cards(self) -> list[dict[str, Any]]:
        """The cards shown at `epoch`."""
        if self.epoch is None:
            return []
        epochs, by_epoch = self._index()
        now = by_epoch.get(int(self.epoch), [])
        earlier = [e for e in epochs if e < self.epoch]
        prev = {r["layer"]: r for r in by_epoch.get(earlier[-1], [])} if earlier else {}
        out = []
        for r in now:
            p = prev.get(r["layer"])
            rows = []
            cs = r.get("cluster_score")
            if cs is not None and not pd.isna(cs):
                note, color = cluster_note(float(cs))
                t, tc = _trend(float(cs), _num(p, "cluster_score"))
                rows.append({"name": "cluster score", "value": max(0.0, min(1.0, float(cs))),
                             "text": f"{float(cs):.2f}", "note": note, "color": color, "trend": t,
                             "trend_cls": tc, "help": "≈ 1/k for k tight clusters of filter directions; "
                             "0 = diverse, 1 = all filters alike"})
            mono = r.get("rgb_mono_fraction")
            if mono is not None and not pd.isna(mono):
                note, color = mono_note(float(mono))
                t, tc = _trend(float(mono), _num(p, "rgb_mono_fraction"))
                rows.append({"name": "RGB mono fraction", "value": max(0.0, min(1.0, float(mono))),
                             "text": f"{100 * float(mono):.0f}%", "note": note, "color": color,
                             "trend": t, "trend_cls": tc,
                             "help": "share of filters whose weights sit mostly in one colour channel"})
            n = int(r.get("n_filters") or 0)
            nf = int(r.get("n_frozen_filters") or 0)
            tag = "frozen" if r.get("frozen") else (f"{nf}/{n} frozen" if nf else f"{n} filters")
            out.append({"layer": r["layer"], "tag": tag, "rows": rows})
        return out

    def _refresh(self, *_: Any) -> None:
        self._cards.data = {"cards": self.cards()}
