"""The doctor panel: the filter doctor's findings at the shown epoch, each with a one-click fix.

Findings come from the ``diagnoses`` table (`revacnn/analysis/doctor.py`, `docs/diagnoses.md`).
Each row shows the layer, the filter (uid), the kind as a coloured badge, the message and, where
the doctor suggests a steering command, a button. A click sets `DoctorPanel.request` to that
suggestion (plain data, ``{"op": ..., "args": {...}}``); the page decides what it means: the live
page sends it to the running trainer, the replay page forks the run at the shown epoch with it.

Example:
    >>> panel = DoctorPanel(diagnoses=store.sql("SELECT * FROM diagnoses WHERE run_id='r'"), epoch=3)
    >>> panel.param.watch(lambda e: print(e.new), "request")
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import panel as pn
import param
from panel.viewable import Viewer

from ...errors import SteeringError
from ...steering.commands import OPS, Command
from ._component import HTMLView

#: badge colour per kind (the theme's palette: red = broken, amber = wasteful, blue = done)
KIND_COLORS = {
    "dead": "#dc2626",
    "redundant": "#d97706",
    "converged": "#38BDF8",
    "cluster_pattern": "#7c3aed",
    "rgb_pattern": "#db2777",
}

_CSS = """
.rv-doctor { max-height: 420px; overflow: auto; }
.rv-doctor td.rv-msg { white-space: normal; }
.rv-doctor button.rv-fix { font: inherit; font-size: 12px; padding: 2px 8px; border-radius: 4px;
  border: 1px solid var(--rv-border, #cbd5e1); background: var(--rv-card, #fff); cursor: pointer; }
.rv-doctor button.rv-fix:hover { border-color: #38BDF8; }
.rv-doctor button.rv-fix[disabled] { opacity: .5; cursor: not-allowed; }
.rv-doctor code { font-family: var(--rv-mono); font-size: 11.5px; }
"""

_DRAW = r"""
const rows = data.rows || [];
const head = `<div class="rv-doctor-summary">${E(data.summary || '')}</div>`;
if (!rows.length) { el.innerHTML = head + `<div class="rv-empty rv-no-findings">${E(data.empty || 'No findings.')}</div>`; return; }
const o = [head, '<div class="rv-doctor"><table class="rv-table"><thead><tr><th>layer</th><th>filter</th><th>finding</th><th>score</th><th class="rv-msg">message</th><th>fix</th></tr></thead><tbody>'];
rows.forEach((r, i) => {
  const fix = r.command
    ? `<button class="rv-fix" data-click="${i}" ${data.enabled ? '' : 'disabled'} title="${E(data.action)}"><code>${E(r.command)}</code></button>`
    : '';
  o.push(`<tr class="rv-finding" data-kind="${E(r.kind)}" data-layer="${E(r.layer)}" data-uid="${E(r.uid)}">
    <td>${E(r.layer)}</td><td>${E(r.filter)}</td>
    <td><span class="rv-badge" style="background:${r.color}">${E(r.kind)}</span></td>
    <td>${E(r.score)}</td><td class="rv-msg">${E(r.message)}</td><td>${fix}</td></tr>`);
});
o.push('</tbody></table></div>');
el.innerHTML = o.join('');
"""


class DoctorTable(HTMLView):
    _draw = _DRAW
    _stylesheets = [*HTMLView._stylesheets, _CSS]


def command_text(suggestion: dict[str, Any]) -> str:
    """The suggestion as the words of ``revacnn steer``, e.g. ``reinit-filters conv2 3``.

    Example:
        >>> command_text({"op": "freeze", "args": {"layer": "conv1"}})
        'freeze conv1'
    """
    args = suggestion.get("args", {})
    words = [suggestion.get("op", "?")]
    if "layer" in args:
        words.append(str(args["layer"]))
    if "indices" in args:
        words += [str(i) for i in args["indices"]]
    if "lr" in args:
        words.append(f"{float(args['lr']):g}")
    return " ".join(words)


def suggestion_command(suggestion: Mapping[str, Any],
                       uids: Mapping[str, Sequence[int]] | None = None) -> Command:
    """The steering `Command` of a suggestion, with its filters mapped to today's indices.

    A suggestion names its filters by index at the finding's epoch and, where it has them, by
    ``filter_uids``. Indices shift when filters are added or deleted, so with ``uids`` (each
    layer's current filter uids, in index order) the uids are mapped to current indices. Keys
    that are not the op's arguments (``filter_uids``, ``duplicate_of``, ``finding``) are dropped.

    Raises:
        SteeringError: unknown op, or a filter of the finding is gone (the message names its uid).

    Example:
        >>> suggestion_command({"op": "reinit-filters", "args": {"layer": "conv2", "indices": [3]},
        ...                     "filter_uids": [40]}, {"conv2": [10, 40, 41]}).args
        {'layer': 'conv2', 'indices': [1]}
    """
    op = suggestion.get("op")
    if op not in OPS:
        raise SteeringError(f"The doctor suggested an unknown op. Received: op={op!r} "
                            f"(expected one of {', '.join(OPS)})")
    raw = suggestion.get("args") or {}
    args = {k: v for k, v in raw.items() if k in OPS[op] or (op == "add-filters" and k == "init")}
    want = suggestion.get("filter_uids")
    if "indices" in OPS[op] and want and uids is not None:
        layer = args.get("layer")
        current = [int(u) for u in uids.get(layer, [])] if layer in uids else None
        if current is None:
            raise SteeringError(f"Cannot apply {command_text(suggestion)}: layer {layer!r} is not in the "
                                f"network any more (layers now: {', '.join(map(str, uids)) or 'none'})")
        gone = [int(u) for u in want if int(u) not in current]
        if gone:
            raise SteeringError(
                f"Cannot apply {command_text(suggestion)}: filter uid {', '.join(map(str, gone))} of "
                f"{layer} is gone (deleted since the finding); nothing was sent")
        args["indices"] = [current.index(int(u)) for u in want]
    return Command(op=str(op), args=args)


#: fork options of `revacnn fork` per op (how a suggestion becomes a fork's change)
_FORK_FLAGS = {"freeze": "--freeze", "freeze-filters": "--freeze-filters",
               "delete-filters": "--delete-filters", "reinit-filters": "--reinit-filters",
               "add-filters": "--add-filters", "set-lr": "--lr"}


def fork_command_line(store: str, run_id: str, epoch: int, suggestion: Mapping[str, Any]) -> str:
    """The ``revacnn fork`` command line that branches ``run_id`` at ``epoch`` with the suggestion.

    The indices are those of the finding's epoch, which is the fork point, so they need no mapping.

    Raises:
        SteeringError: the op has no fork option (pause, resume, stop, unfreeze …).

    Example:
        >>> fork_command_line("store", "run-1", 3, {"op": "reinit-filters",
        ...                   "args": {"layer": "conv2", "indices": [3]}})
        'revacnn fork run-1 --store store --epoch 3 --reinit-filters conv2:3'
    """
    op = suggestion.get("op")
    args = suggestion.get("args") or {}
    flag = _FORK_FLAGS.get(str(op))
    if flag is None:
        raise SteeringError(f"A fork cannot apply {op!r}. Received: {command_text(dict(suggestion))} "
                            f"(a fork takes {', '.join(_FORK_FLAGS)})")
    if op == "freeze":
        value = str(args["layer"])
    elif op == "set-lr":
        value = f"{float(args['lr']):g}"
    elif op == "add-filters":
        value = f"{args['layer']}:{int(args['n'])}"
    else:
        value = f"{args['layer']}:{','.join(str(int(i)) for i in args['indices'])}"
    words = ["revacnn", "fork", run_id, "--store", store, "--epoch", str(int(epoch)), flag, value]
    return " ".join(shlex.quote(w) for w in words)


def _suggestion(raw: Any) -> dict[str, Any] | None:
    if raw is None or (isinstance(raw, float) and pd.isna(raw)):
        return None
    try:
        obj = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and "op" in obj else None


class DoctorPanel(Viewer):
    """The findings of the shown epoch; a click on a fix sets `request` to its steering command.

    Example:
        >>> DoctorPanel(diagnoses=frame.diagnoses, epoch=4, action="send to the trainer")
    """

    diagnoses = param.DataFrame(default=None, allow_None=True,
                                doc="diagnoses rows (columns of the diagnoses table).")
    epoch = param.Integer(default=None, allow_None=True, doc="show this epoch's findings")
    enabled = param.Boolean(default=True, doc="whether the fix buttons may be clicked")
    action = param.String(default="apply", doc="what a click does (tooltip), e.g. 'fork here'")
    request = param.Dict(default=None, allow_None=True,
                         doc="the last suggestion clicked (with 'finding': its row), or None")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._rows: list[dict[str, Any]] = []
        self._table = DoctorTable(sizing_mode="stretch_width", css_classes=["rv-doctor-panel"])
        self._table.param.watch(self._on_click, "clicked")
        self.param.watch(self._refresh, ["diagnoses", "epoch", "enabled", "action"])
        self._refresh()

    def __panel__(self) -> pn.viewable.Viewable:
        return self._table

    def rows(self) -> list[dict[str, Any]]:
        """The findings shown (filters first, then layers), as plain dicts."""
        df = self.diagnoses
        if df is None or not len(df):
            return []
        if self.epoch is not None and "epoch" in df:
            df = df[df["epoch"] == self.epoch]
        out = []
        for r in df.to_dict("records"):
            sug = _suggestion(r.get("suggestion"))
            uid = r.get("filter_uid")
            has_uid = uid is not None and not pd.isna(uid)
            filt = r.get("filter")
            out.append({
                "layer": r.get("layer"),
                "uid": int(uid) if has_uid else "",
                "filter": (f"{int(filt)} (uid {int(uid)})" if has_uid and filt is not None
                           and not pd.isna(filt) else (f"uid {int(uid)}" if has_uid else "layer")),
                "kind": r.get("kind"),
                "color": KIND_COLORS.get(r.get("kind"), "#64748b"),
                "score": "" if pd.isna(r.get("score")) else f"{float(r['score']):.3f}",
                "message": r.get("message") or "",
                "command": command_text(sug) if sug else "",
                "suggestion": sug,
            })
        out.sort(key=lambda x: (x["uid"] == "", str(x["layer"]), str(x["uid"])))
        return out

    def _refresh(self, *_: Any) -> None:
        self._rows = self.rows()
        kinds: dict[str, int] = {}
        for r in self._rows:
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        where = f"epoch {self.epoch}" if self.epoch is not None else "this run"
        self._table.data = {
            "rows": [{k: v for k, v in r.items() if k != "suggestion"} for r in self._rows],
            "summary": f"{where}: {summary}" if summary else "",
            "empty": f"The doctor found nothing at {where}.",
            "enabled": bool(self.enabled),
            "action": self.action,
        }

    def _on_click(self, event: Any) -> None:
        value = self._table.clicked_value
        if not value.isdigit() or not self.enabled:
            return
        i = int(value)
        if i >= len(self._rows) or self._rows[i]["suggestion"] is None:
            return
        row = self._rows[i]
        self.request = {**row["suggestion"], "finding": {k: row[k] for k in ("layer", "uid", "kind")}}
