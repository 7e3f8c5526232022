"""The event log: every steering command of a run's history, applied or rejected, with its message."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import panel as pn
import param
from panel.viewable import Viewer

from ._component import HTMLView

_CSS = """
.rv-events { max-height: 420px; overflow:auto; }
.rv-events tr.rv-inh td { color: var(--rv-muted); }
.rv-events tr.rv-now td { background: var(--rv-selected); }
.rv-events code { font-family: var(--rv-mono); font-size: 11.5px; }
"""

_DRAW = r"""
const rows = data.rows || [];
if (!rows.length) { el.innerHTML = `<div class="rv-empty rv-no-events">${E(data.empty || 'No steering events.')}</div>`; return; }
const o = ['<div class="rv-events"><table class="rv-table"><thead><tr><th>epoch</th><th>batch</th><th>command</th><th>status</th><th>message</th><th>latency</th></tr></thead><tbody>'];
for (const r of rows) {
  const color = r.status === 'applied' ? '#16a34a' : (r.status === 'rejected' ? '#dc2626' : '#64748b');
  o.push(`<tr class="${r.inherited ? 'rv-inh' : ''} ${r.epoch === data.epoch ? 'rv-now' : ''}" title="${E(r.at)}${r.inherited ? ' · inherited from ' + E(r.run_id) : ''}">
    <td>${E(r.epoch)}</td><td>${E(r.batch)}</td><td><code>${E(r.kind)} ${E(r.args)}</code></td>
    <td><span class="rv-badge" style="background:${color}">${E(r.status)}</span></td><td>${E(r.message)}</td><td>${E(r.latency)}</td></tr>`);
}
o.push('</tbody></table></div>');
el.innerHTML = o.join('');
"""


class EventTable(HTMLView):
    _draw = _DRAW
    _stylesheets = [*HTMLView._stylesheets, _CSS]


def _args_text(raw: Any) -> str:
    if raw is None or (isinstance(raw, float) and pd.isna(raw)):
        return ""
    try:
        obj = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return str(raw)
    if isinstance(obj, dict):
        return " ".join(f"{k}={v}" for k, v in obj.items())
    return str(obj)


class EventLog(Viewer):
    """A table of steering events: epoch, batch, command, applied/rejected, message, latency.

    Events inherited from an ancestor run (before the fork point) are greyed; events at the
    shown epoch are highlighted.

    Example:
        >>> log = EventLog(events=bundle.events, epoch=3)
    """

    events = param.DataFrame(default=None, allow_None=True, doc="events rows (+ optional inherited).")
    epoch = param.Integer(default=None, allow_None=True)
    empty_message = param.String(default="No steering events in this run's history.")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._rows_cache: tuple[Any, list[dict[str, Any]]] | None = None
        self._log = EventTable(sizing_mode="stretch_width", css_classes=["rv-event-log"])
        self.param.watch(self._refresh, ["events", "epoch", "empty_message"])
        self._refresh()

    def __panel__(self) -> pn.viewable.Viewable:
        return self._log

    def rows(self) -> list[dict[str, Any]]:
        """The rows shown, oldest first."""
        ev = self.events
        if ev is None or not len(ev):
            return []
        if self._rows_cache is not None and self._rows_cache[0] is ev:
            return self._rows_cache[1]
        out = []
        for r in ev.to_dict("records"):
            lat = r.get("latency_ms")
            out.append({
                "run_id": r.get("run_id"),
                "epoch": None if pd.isna(r.get("epoch")) else int(r["epoch"]),
                "batch": None if pd.isna(r.get("batch")) else int(r["batch"]),
                "kind": r.get("kind"),
                "args": _args_text(r.get("args")),
                "status": r.get("status"),
                "message": r.get("message") or "",
                "at": str(r.get("at")),
                "latency": "" if lat is None or pd.isna(lat) else f"{float(lat):.0f} ms",
                "inherited": bool(r.get("inherited", False)),
            })
        self._rows_cache = (ev, out)
        return out

    def _refresh(self, *_: Any) -> None:
        self._log.data = {"rows": self.rows(), "epoch": self.epoch, "empty": self.empty_message}
