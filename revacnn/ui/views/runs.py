"""The run picker: sessions and their fork trees (name, status, epochs, best validation accuracy)."""

from __future__ import annotations

from typing import Any

import panel as pn
import param
from panel.viewable import Viewer

from ..theme import STATUS_COLORS
from ._component import HTMLView

_CSS = """
.rv-tree { display:flex; flex-direction:column; gap:2px; font-size:12.5px; }
.rv-session { margin-top:8px; padding:6px 8px; border-radius:6px; background:var(--rv-panel);
  border:1px solid var(--rv-border); font-size:11.5px; color:var(--rv-muted); }
.rv-session b { color:var(--rv-fg); font-size:12px; }
.rv-run { display:grid; grid-template-columns: 1fr auto; gap:2px 8px; padding:6px 8px; border-radius:6px;
  cursor:pointer; border:1px solid transparent; }
.rv-run:hover { background:var(--rv-hover); }
.rv-run.rv-active { background:var(--rv-selected); border-color:var(--rv-accent); }
.rv-run .rv-name { font-weight:600; overflow:hidden; text-overflow:ellipsis; white-space:nowrap; }
.rv-run .rv-branch { color:var(--rv-fork); font-weight:700; margin-right:3px; }
.rv-run .rv-meta { grid-column: 1 / 3; color:var(--rv-muted); font-size:11px; display:flex; gap:10px; flex-wrap:wrap; }
.rv-run .rv-acc { font-variant-numeric: tabular-nums; font-weight:600; }
.rv-run .rv-id { font-family: var(--rv-mono); font-size:10px; color:var(--rv-muted); }
"""

_DRAW = r"""
const rows = data.rows || [];
if (!rows.length) { el.innerHTML = `<div class="rv-empty rv-no-runs">${E(data.empty || 'No runs yet.')}</div>`; return; }
const out = ['<div class="rv-tree">'];
for (const r of rows) {
  if (r.kind === 'session') {
    out.push(`<div class="rv-session" title="${E(r.session_id)}"><b>${E(r.dataset)}</b> · ${E(r.model)} · ${r.n_probes} probes
      <div class="rv-id">${E(r.session_id)}</div></div>`);
    continue;
  }
  const pad = 8 + 16 * r.depth;
  const acc = r.best_val_accuracy === null ? '–' : (100 * r.best_val_accuracy).toFixed(1) + '%';
  const epochs = r.last_epoch === null ? 'no epochs' : `${r.last_epoch} epochs`;
  const fork = r.fork_epoch === null ? '' : `<span>fork @ ${r.fork_epoch}</span>`;
  out.push(`<div class="rv-run ${r.run_id === data.value ? 'rv-active' : ''}" data-run="${E(r.run_id)}" data-click="${E(r.run_id)}"
      tabindex="0" style="padding-left:${pad}px" title="${E(r.run_id)}">
    <span class="rv-name">${r.depth ? '<span class="rv-branch">└</span>' : ''}${E(r.name || r.run_id)}</span>
    <span class="rv-badge" style="background:${data.colors[r.status] || '#64748B'}">${E(r.status)}</span>
    <span class="rv-meta"><span>${epochs}</span>${fork}<span>best val acc <span class="rv-acc">${acc}</span></span></span>
  </div>`);
}
out.push('</div>');
el.innerHTML = out.join('');
"""


class RunTree(HTMLView):
    _draw = _DRAW
    _stylesheets = [*HTMLView._stylesheets, _CSS]


class RunPicker(Viewer):
    """Sessions and their fork trees; clicking a run sets `value` to its id.

    Args (params):
        rows: rows of `ReplayData.tree` (session rows and run rows with ``depth``).
        value: the chosen run id.

    Example:
        >>> picker = RunPicker(rows=data.tree())
        >>> picker.param.watch(lambda e: print(e.new), "value")
    """

    rows = param.List(default=[], doc="Rows of ReplayData.tree().")
    value = param.String(default=None, allow_None=True, doc="The chosen run id.")
    empty_message = param.String(default="No runs in this store yet.")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._tree = RunTree(sizing_mode="stretch_width", css_classes=["rv-run-picker"])
        self._tree.param.watch(self._on_click, "clicked")
        self.param.watch(self._refresh, ["rows", "value", "empty_message"])
        self._refresh()

    def __panel__(self) -> pn.viewable.Viewable:
        return self._tree

    @property
    def run_ids(self) -> list[str]:
        """The run ids in tree order."""
        return [r["run_id"] for r in self.rows if r.get("kind") == "run"]

    def _on_click(self, _: Any) -> None:
        rid = self._tree.clicked_value
        if rid in self.run_ids:
            self.value = rid

    def _refresh(self, *_: Any) -> None:
        self._tree.data = {"rows": self.rows, "value": self.value, "colors": STATUS_COLORS,
                           "empty": self.empty_message}
