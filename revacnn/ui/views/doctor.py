"""The doctor panel: the filter doctor's findings at the shown epoch, each with a one-click fix.

Findings come from the ``diagnoses`` table (`revacnn/analysis/doctor.py`, `docs/diagnoses.md`).
Each row shows the layer, the filter (uid), the kind as a coloured badge, the message and, where
the doctor suggests a steering command, a button. A click sets `DoctorPanel.request` to that
suggestion (plain data, ``{"op": ..., "args": {...}}``); the page decides what it means: the live
page sends it to the running trainer, the replay page forks the run at the shown epoch with it.

Between epochs the live page adds provisional findings computed on the trainer's live snapshot
(`live_diagnoses`: ``dead`` and ``redundant`` only, marked "live"); a finding that a fork already
applied (`handled_by`) is marked handled, with the fork's run id.

Example:
    >>> panel = DoctorPanel(diagnoses=store.sql("SELECT * FROM diagnoses WHERE run_id='r'"), epoch=3)
    >>> panel.param.watch(lambda e: print(e.new), "request")
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from html import escape as html_escape
from typing import Any

import numpy as np
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
.rv-doctor .rv-live-tag { margin-left: 4px; font-size: 10px; padding: 0 4px; border-radius: 3px;
  border: 1px dashed #38BDF8; color: #0284c7; }
.rv-doctor tr.rv-live-finding td { font-style: italic; }
.rv-doctor .rv-handled { font-size: 11px; color: #16a34a; margin-top: 2px; }
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
  const live = r.live ? `<span class="rv-live-tag" title="${E(data.live_title || '')}">live</span>` : '';
  const done = r.handled ? `<div class="rv-handled" title="a fork applied this fix">handled: ${E(r.handled)}</div>` : '';
  o.push(`<tr class="rv-finding${r.live ? ' rv-live-finding' : ''}${r.handled ? ' rv-is-handled' : ''}" data-kind="${E(r.kind)}" data-layer="${E(r.layer)}" data-uid="${E(r.uid)}">
    <td>${E(r.layer)}</td><td>${E(r.filter)}</td>
    <td><span class="rv-badge" style="background:${r.color}">${E(r.kind)}</span>${live}</td>
    <td>${E(r.score)}</td><td class="rv-msg">${E(r.message)}</td><td>${fix}${done}</td></tr>`);
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


def fork_kwargs(suggestion: Mapping[str, Any]) -> dict[str, Any]:
    """The suggestion as keyword arguments of `revacnn.ui.launcher.fork_argv` (the same fork as
    `fork_command_line`).

    Raises:
        SteeringError: the op has no fork option.

    Example:
        >>> fork_kwargs({"op": "reinit-filters", "args": {"layer": "conv2", "indices": [3]}})
        {'reinit_filters': {'conv2': [3]}}
    """
    op = str(suggestion.get("op"))
    args = suggestion.get("args") or {}
    if op not in _FORK_FLAGS:
        raise SteeringError(f"A fork cannot apply {op!r}. Received: {command_text(dict(suggestion))} "
                            f"(a fork takes {', '.join(_FORK_FLAGS)})")
    if op == "freeze":
        return {"freeze": [str(args["layer"])]}
    if op == "set-lr":
        return {"lr": float(args["lr"])}
    if op == "add-filters":
        return {"add_filters": {str(args["layer"]): int(args["n"])}}
    key = op.replace("-", "_")
    return {key: {str(args["layer"]): [int(i) for i in args["indices"]]}}


def handled_by(suggestion: Mapping[str, Any], epoch: int, children: Sequence[Mapping[str, Any]]) -> str | None:
    """The run id of a fork that applied ``suggestion`` at ``epoch``, or None.

    ``children`` are the run's forks as ``runs`` rows (``run_id``, ``fork_epoch``, ``config``:
    a dict or its JSON). A fork handled a finding when it branched at the finding's epoch with
    the same op on the same layer and filters (``fork_changes`` in its config), or, for
    ``set-lr``, with that learning rate.

    Example:
        >>> kid = {"run_id": "run-2", "fork_epoch": 3, "config": {"extra": {"fork_changes": [
        ...     {"op": "freeze", "args": {"layer": "conv1"}}]}}}
        >>> handled_by({"op": "freeze", "args": {"layer": "conv1"}}, 3, [kid])
        'run-2'
    """
    op = suggestion.get("op")
    args = suggestion.get("args") or {}
    for child in children:
        fe = child.get("fork_epoch")
        if fe is None or pd.isna(fe) or int(fe) != int(epoch):
            continue
        cfg = child.get("config") or {}
        if isinstance(cfg, str):
            try:
                cfg = json.loads(cfg)
            except ValueError:
                continue
        if op == "set-lr":
            lr = cfg.get("lr")
            if lr is not None and abs(float(lr) - float(args.get("lr", -1))) <= 1e-9 * max(1.0, float(lr)):
                return str(child.get("run_id"))
            continue
        for c in (cfg.get("extra") or {}).get("fork_changes") or []:
            ca = c.get("args") or {}
            if c.get("op") == op and ca.get("layer") == args.get("layer") and (
                    "indices" not in args or sorted(map(int, ca.get("indices", []))) ==
                    sorted(map(int, args["indices"]))):
                return str(child.get("run_id"))
    return None


def live_diagnoses(frame: Any) -> pd.DataFrame:
    """Provisional ``dead``/``redundant`` rows from a live `NetworkFrame` (its kernels and probe
    activations), in the ``diagnoses`` table's columns plus ``live`` (True). Empty when the frame
    is not live.

    Example:
        >>> live_diagnoses(feed.state.live)[["layer", "filter_uid", "kind"]]
    """
    from ...analysis.doctor import LayerArrays, diagnose_live

    cols = ["epoch", "layer", "filter_uid", "filter", "kind", "score", "suggestion", "message", "live"]
    rows: list[dict[str, Any]] = []
    if frame is not None and getattr(frame, "live", False):
        for lf in frame.layers:
            if lf.kernel is None or lf.activations is None or lf.layer_frozen:
                continue
            k = np.asarray(lf.kernel)
            if k.ndim != 4 or len(k) != len(lf.uids) or np.asarray(lf.activations).shape[1] != len(k):
                continue
            arrays = LayerArrays(lf.name, k, None, np.asarray(lf.activations, np.float32), None,
                                 [int(u) for u in lf.uids])
            for d in diagnose_live(arrays):
                row = d.to_row()
                row["suggestion"] = None if d.suggestion is None else json.dumps(d.suggestion)  # as recorded
                rows.append({"epoch": frame.epoch, **row, "live": True})
    return pd.DataFrame(rows, columns=cols)


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
    live = param.DataFrame(default=None, allow_None=True,
                           doc="provisional findings from the live snapshot (`live_diagnoses`), or None")
    live_label = param.String(default="", doc="where the live findings come from, e.g. 'epoch 5, batch 30'")
    handled = param.Dict(default={}, doc="finding key (epoch, layer, uid, kind) -> the run id of the fork "
                                         "that applied its fix")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._rows: list[dict[str, Any]] = []
        self._table = DoctorTable(sizing_mode="stretch_width", css_classes=["rv-doctor-panel"])
        self._table.param.watch(self._on_click, "clicked")
        self.param.watch(self._refresh, ["diagnoses", "epoch", "enabled", "action", "live", "live_label",
                                         "handled"])
        self._refresh()

    def __panel__(self) -> pn.viewable.Viewable:
        return self._table

    def rows(self, *, live: bool = False) -> list[dict[str, Any]]:
        """The findings shown (filters first, then layers), as plain dicts.

        Args:
            live: the provisional live findings instead of the recorded ones.
        """
        df = self.live if live else self.diagnoses
        if df is None or not len(df):
            return []
        if not live and self.epoch is not None and "epoch" in df:
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
                "live": bool(live),
                "handled": self.handled.get(finding_key(r.get("epoch"), r.get("layer"), uid, r.get("kind")), ""),
                "epoch": None if r.get("epoch") is None or pd.isna(r.get("epoch")) else int(r["epoch"]),
            })
        out.sort(key=lambda x: (x["uid"] == "", str(x["layer"]), str(x["uid"])))
        return out

    def recorded_rows(self) -> list[dict[str, Any]]:
        """`rows()` of the recorded findings at `epoch`, as last drawn (no second pass over the table)."""
        return [r for r in self._rows if not r["live"]]

    def _refresh(self, *_: Any) -> None:
        recorded = self.rows()
        live = self.rows(live=True)
        self._rows = recorded + live

        def count(rows: list[dict[str, Any]]) -> str:
            kinds: dict[str, int] = {}
            for r in rows:
                kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
            return ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))

        where = f"epoch {self.epoch}" if self.epoch is not None else "this run"
        summary = f"{where}: {count(recorded)}" if recorded else ""
        if live:
            summary += ("; " if summary else "") + f"live{f' ({self.live_label})' if self.live_label else ''}, " \
                       f"provisional: {count(live)}"
        self._table.data = {
            "rows": [{k: v for k, v in r.items() if k != "suggestion"} for r in self._rows],
            "summary": summary,
            "live_title": "provisional: from the trainer's live snapshot (kernels and probe activations "
                          "only), before the epoch is recorded",
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
        self.request = {**row["suggestion"],
                        "finding": {k: row[k] for k in ("layer", "uid", "kind", "live", "epoch")}}


def finding_key(epoch: Any, layer: Any, uid: Any, kind: Any) -> tuple[int | None, str, int | None, str]:
    """The key of a finding in `DoctorPanel.handled`.

    Example:
        >>> finding_key(3, "conv2", 7.0, "dead")
        (3, 'conv2', 7, 'dead')
    """
    def _int(v: Any) -> int | None:
        return None if v is None or v == "" or (isinstance(v, float) and pd.isna(v)) else int(v)

    return (_int(epoch), str(layer), _int(uid), str(kind))


class DoctorForks:
    """The replay page's doctor clicks: each starts ``revacnn fork RUN --epoch K <fix>`` as its own
    process (`revacnn.ui.launcher`), shows the command line and then the new run's id, and marks
    the findings that a fork of the run already applied as handled (`handled_by`).

    Example:
        >>> forks = DoctorForks(panel, "store")
        >>> forks.click("run-1", 3, {"op": "freeze", "args": {"layer": "conv1"}})
        >>> forks.poll()          # from the page's periodic callback
    """

    def __init__(self, panel: DoctorPanel, store_path: str) -> None:
        self.panel = panel
        self.store_path = str(store_path)
        self.note = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["rv-doctor-fork"], visible=False)
        self.job: Any = None
        self._line = ""
        self._run: tuple[str, int] | None = None
        self.started: list[str] = []

    def _show(self, body: str, kind: str) -> None:
        colors = {"info": "#0284c7", "warn": "#d97706", "ok": "#16a34a", "error": "#dc2626"}
        self.note.object = (f"<div class='rv-doctor-fork-{kind}' style='border-left:3px solid "
                            f"{colors.get(kind, '#64748b')};padding:4px 8px;font-size:12.5px'>{body}</div>")
        self.note.visible = True

    def _cmd_html(self) -> str:
        return (f"<pre class='rv-fork-cmd' style='user-select:all;white-space:pre-wrap;margin:6px 0 0 0'>"
                f"{html_escape(self._line)}</pre>")

    def click(self, run_id: str, epoch: int, request: Mapping[str, Any]) -> Any:
        """Start the fork that applies ``request`` (a suggestion) to ``run_id`` at ``epoch``.

        Returns:
            The launcher's `Job`, or None when the suggestion has no fork form (the note says why).
        """
        from ..launcher import launch_fork

        if self.job is not None and self.job.returncode is None and not self.job.run_id:
            self._show("A fork is still starting; wait for its run id." + self._cmd_html(), "warn")
            return None
        try:
            self._line = fork_command_line(self.store_path, run_id, epoch, request)
            kwargs = fork_kwargs(request)
        except (SteeringError, KeyError, TypeError, ValueError) as exc:
            self._show(html_escape(str(exc)), "warn")
            return None
        self._run = (run_id, int(epoch))
        self.job = launch_fork(self.store_path, run_id, int(epoch), **kwargs)
        self._show(f"Starting the fork of {html_escape(run_id)} at epoch {int(epoch)} "
                   "(TensorFlow takes a few seconds to load); the same fork from a shell:" + self._cmd_html(),
                   "info")
        return self.job

    def poll(self) -> str | None:
        """Check the started fork; returns its run id once, when it becomes known."""
        job = self.job
        if job is None:
            return None
        if job.run_id:
            self.job = None
            self.started.append(job.run_id)
            self._show(f"Started the fork <b class='rv-fork-run-id'>{html_escape(job.run_id)}</b> (pid "
                       f"{job.proc.pid}); it appears in the run list. Command line:" + self._cmd_html(), "ok")
            if self._run is not None:
                self.refresh_handled(*self._run)
            return job.run_id
        if job.returncode is not None and job._got_id.is_set():
            self.job = None
            tail = job.log_tail().splitlines()
            self._show(f"The fork did not start: {html_escape(tail[-1] if tail else f'exit code {job.returncode}')}"
                       + self._cmd_html(), "error")
        return None

    def refresh_handled(self, run_id: str, epoch: int | None = None) -> None:
        """Mark the run's findings that one of its forks already applied (reads the ``runs`` table)."""
        del epoch  # every epoch's findings are matched against the forks at that epoch
        try:
            from ...storage import open_store

            rid = str(run_id).replace("'", "''")
            kids = open_store(self.store_path, mode="r").sql(
                f"SELECT run_id, fork_epoch, config FROM runs WHERE parent_run_id = '{rid}'")
            children = kids.to_dict("records")
        except Exception:  # noqa: BLE001 - no forks yet, or the store is being written
            children = []
        handled: dict[tuple[Any, ...], str] = {}
        df = self.panel.diagnoses
        if children and df is not None and len(df):
            for r in df.to_dict("records"):
                sug = _suggestion(r.get("suggestion"))
                if sug is None or r.get("epoch") is None:
                    continue
                by = handled_by(sug, int(r["epoch"]), children)
                if by:
                    handled[finding_key(r.get("epoch"), r.get("layer"), r.get("filter_uid"), r.get("kind"))] = by
        if handled != self.panel.handled:
            self.panel.handled = handled
