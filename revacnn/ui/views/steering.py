"""Steering controls of the live app: per layer, per selected filter and per run, with each command's outcome.

Every control sends a `revacnn.steering` command through the store (the trainer applies it at
its next batch boundary) and then shows the resulting event: ``applied`` with the trainer's message,
or ``rejected`` with its reason. Controls that cannot apply are disabled and say why.

Example:
    >>> controls = SteeringControls(sender=lambda op, words: send_to_store(op, words))
    >>> controls.update_state(run_id="run-…", status="running", layers={"conv1": 16, "conv2": 20},
    ...                       conv_layers=["conv1", "conv2"], frozen_layers=[], frozen_filters={})
    >>> controls.send("freeze", ["conv1"])   # what the "Freeze layer" button does
"""

from __future__ import annotations

import asyncio
import html
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import panel as pn
import param

from ..theme import FROZEN
from ._component import run_locked

#: Seconds after which a command without an event is reported as unanswered.
ANSWER_TIMEOUT_S = 30.0

Sender = Callable[[str, list[str]], str]
"""``sender(op, words) -> command_id``: parses and queues one command (raises on bad input)."""

Planner = Callable[[str, list[str]], str]
"""``planner(op, words) -> plan text``: the surgery plan of a command (what ``revacnn steer …
--dry-run`` prints); raises with the reason when the change would be refused. Blocking: the
controls call it in a worker thread."""

#: Ops whose plan is shown, and confirmed, before they are sent.
PLANNED_OPS = ("add-filters", "delete-filters", "reinit-filters")


@dataclass
class Pending:
    """A command this session sent and whose event it has not seen yet."""

    command_id: str
    op: str
    words: list[str]
    sent_at: float

    @property
    def label(self) -> str:
        return " ".join([self.op, *self.words])


def parse_indices(text: str) -> list[int]:
    """Filter indices from text such as ``"0, 3 5-7"`` (ranges included, duplicates dropped).

    Raises:
        ValueError: a word is not an index or a range.

    Example:
        >>> parse_indices("0, 3 5-7")
        [0, 3, 5, 6, 7]
    """
    out: list[int] = []
    for word in text.replace(",", " ").split():
        if "-" in word.strip("-"):
            a, b = word.split("-", 1)
            lo, hi = int(a), int(b)
            out.extend(range(min(lo, hi), max(lo, hi) + 1))
        else:
            out.append(int(word))
    seen: set[int] = set()
    return [i for i in out if not (i in seen or seen.add(i))]


def format_indices(indices: Sequence[int]) -> str:
    """The text form of an index list (``[0, 3, 5]`` -> ``"0, 3, 5"``).

    Example:
        >>> format_indices([3, 0])
        '0, 3'
    """
    return ", ".join(str(i) for i in sorted(indices))


class SteeringControls(pn.viewable.Viewer):
    """Buttons and inputs that steer a live run, and the outcome of each command.

    State (``run_id``, ``status``, layer sizes, frozen sets …) is pushed in by the live app with
    `update_state`; events are pushed in with `resolve`. Sending goes through ``sender``.

    Example:
        >>> c = SteeringControls(sender=my_sender)
        >>> c.update_state(run_id="run-1", status="running", layers={"conv1": 16},
        ...                conv_layers=["conv1"], frozen_layers=[], frozen_filters={})
        >>> c.layer = "conv1"; c.selected = [3]
        >>> c.send("delete-filters", ["conv1", "3"])
    """

    run_id = param.String(default=None, allow_None=True)
    status = param.String(default="", doc="the run's status: running, finished …")
    allowed = param.Boolean(default=True, doc="False: this server may not steer (no authentication)")
    deny_reason = param.String(default="")
    layers = param.Dict(default={}, doc="weighted layer -> number of filters (units)")
    conv_layers = param.List(default=[], item_type=str)
    frozen_layers = param.List(default=[], item_type=str)
    frozen_filters = param.Dict(default={}, doc="layer -> indices of single frozen filters")
    paused = param.Boolean(default=False)
    lr = param.Number(default=None, allow_None=True)
    layer = param.Selector(default=None, objects=[], allow_None=True)
    selected = param.List(default=[], item_type=int, doc="selected filter indices of `layer`")

    def __init__(self, *, sender: Sender | None = None, fork_form: pn.viewable.Viewer | None = None,
                 planner: Planner | None = None, **params: Any) -> None:
        super().__init__(**params)
        self.sender = sender
        #: With a planner, filter surgery (`PLANNED_OPS`) shows its plan first; "Apply" sends it.
        self.planner = planner
        self.planned: tuple[str, list[str]] | None = None
        self._plan_gen = 0
        self.pending: dict[str, Pending] = {}
        self.history: list[dict[str, Any]] = []
        self._seen_events: set[str] = set()
        self.on_result: Callable[[dict[str, Any]], None] | None = None

        W = pn.widgets
        self.layer_select = W.Select(options=[], sizing_mode="stretch_width", css_classes=["rv-layer-select"])
        self.layer_info = pn.pane.HTML("", margin=(0, 5), css_classes=["rv-layer-info"])
        self.btn_freeze = W.Button(label="Freeze layer", color="primary", css_classes=["rv-freeze-layer"])
        self.btn_unfreeze = W.Button(label="Unfreeze layer", css_classes=["rv-unfreeze-layer"])
        self.add_n = W.IntInput(label="New filters", value=2, start=1, end=512, width=90)
        self.btn_add = W.Button(label="Add filters", css_classes=["rv-add-filters"], align="end")
        self.indices = W.TextInput(label="Selected filters (click tiles, or type 0, 3, 5-7)",
                                   placeholder="none selected", sizing_mode="stretch_width",
                                   css_classes=["rv-filter-indices"])
        self.btn_all = W.Button(label="Select all", color="light", width=90)
        self.btn_none = W.Button(label="Clear", color="light", width=70)
        self.btn_ffreeze = W.Button(label="Freeze filters", css_classes=["rv-freeze-filters"])
        self.btn_funfreeze = W.Button(label="Unfreeze filters", css_classes=["rv-unfreeze-filters"])
        self.btn_delete = W.Button(label="Delete filters", color="danger", css_classes=["rv-delete-filters"])
        self.btn_reinit = W.Button(label="Re-initialise filters", css_classes=["rv-reinit-filters"])
        self.filter_hint = pn.pane.HTML("", margin=(0, 5), css_classes=["rv-filter-hint"])
        self.lr_input = W.FloatInput(label="Learning rate", value=None, step=1e-4, start=0, width=130,
                                     format="0.[000000]", css_classes=["rv-lr"])
        self.btn_lr = W.Button(label="Set learning rate", css_classes=["rv-set-lr"], align="end")
        self.btn_pause = W.Button(label="Pause", css_classes=["rv-pause"])
        self.btn_resume = W.Button(label="Resume", css_classes=["rv-resume"])
        self.btn_stop = W.Button(label="Stop training", color="danger", css_classes=["rv-stop"])
        self.btn_fork = W.Button(label="Fork from this epoch…", color="light", css_classes=["rv-fork"])
        self.notice = pn.pane.Alert("", alert_type="warning", visible=False, margin=(5, 5),
                                    css_classes=["rv-steer-notice"])
        self.result = pn.pane.Alert("", alert_type="light", visible=False, margin=(5, 5),
                                    css_classes=["rv-steer-result"])
        self.log = pn.pane.HTML("", margin=(0, 5), css_classes=["rv-steer-history"])
        self.plan_text = pn.pane.HTML("", sizing_mode="stretch_width", margin=(0, 5), css_classes=["rv-plan"])
        self.btn_plan_apply = W.Button(label="Apply", color="danger", css_classes=["rv-plan-apply"],
                                       disabled=True)
        self.btn_plan_cancel = W.Button(label="Cancel", color="light", css_classes=["rv-plan-cancel"])
        self.plan_box = pn.Column(
            pn.pane.HTML("<b>Surgery plan</b> <span style='color:var(--rv-muted);font-size:11px'>every layer "
                         "and channel this change touches; nothing is sent until you apply it</span>",
                         margin=(0, 5)),
            self.plan_text, pn.Row(self.btn_plan_apply, self.btn_plan_cancel, sizing_mode="stretch_width"),
            visible=False, sizing_mode="stretch_width", css_classes=["rv-plan-box"],
            styles={"border": "1px solid var(--rv-border, #ccc)", "border-radius": "8px", "padding": "4px"},
        )
        self.btn_plan_apply.on_click(lambda _e: self.apply_plan())
        self.btn_plan_cancel.on_click(lambda _e: self.cancel_plan())
        self.fork_form = fork_form
        self.fork_card = pn.Card(pn.pane.HTML("…"), title="Fork", collapsed=True,
                                 visible=fork_form is not None, sizing_mode="stretch_width",
                                 css_classes=["rv-fork-card"])
        self.fork_card.param.watch(self._fork_opened, "collapsed")

        self.layer_select.param.watch(lambda e: setattr(self, "layer", e.new), "value")
        self.indices.param.watch(self._typed_indices, "value")
        self.btn_freeze.on_click(lambda _e: self._send_layer("freeze"))
        self.btn_unfreeze.on_click(lambda _e: self._send_layer("unfreeze"))
        self.btn_add.on_click(lambda _e: self._send_layer("add-filters", [str(self.add_n.value or 1)]))
        # (delete/reinit/add go through `request`: with a planner they show their plan first)
        self.btn_all.on_click(lambda _e: self._select_all())
        self.btn_none.on_click(lambda _e: setattr(self, "selected", []))
        self.btn_ffreeze.on_click(lambda _e: self._send_filters("freeze-filters"))
        self.btn_funfreeze.on_click(lambda _e: self._send_filters("unfreeze-filters"))
        self.btn_delete.on_click(lambda _e: self._send_filters("delete-filters"))
        self.btn_reinit.on_click(lambda _e: self._send_filters("reinit-filters"))
        self.btn_lr.on_click(lambda _e: self._send_lr())
        self.btn_pause.on_click(lambda _e: self.send("pause", []))
        self.btn_resume.on_click(lambda _e: self.send("resume", []))
        self.btn_stop.on_click(lambda _e: self.send("stop", []))
        self.btn_fork.on_click(lambda _e: self._open_fork())
        self.param.watch(self._refresh, ["run_id", "status", "allowed", "deny_reason", "layers",
                                         "conv_layers", "frozen_layers", "frozen_filters", "paused",
                                         "lr", "layer", "selected"])

        box = dict(sizing_mode="stretch_width", margin=(4, 0))
        self._layout = pn.Column(
            self.notice,
            pn.pane.HTML("<b>Layer</b>", margin=(0, 5)),
            self.layer_select, self.layer_info,
            pn.Row(self.btn_freeze, self.btn_unfreeze, **box),
            pn.Row(self.add_n, self.btn_add, **box),
            pn.layout.Divider(),
            pn.pane.HTML("<b>Filters</b>", margin=(0, 5)),
            self.indices, pn.Row(self.btn_all, self.btn_none, **box), self.filter_hint,
            pn.Row(self.btn_ffreeze, self.btn_funfreeze, **box),
            pn.Row(self.btn_delete, self.btn_reinit, **box),
            self.plan_box,
            pn.layout.Divider(),
            pn.pane.HTML("<b>Run</b>", margin=(0, 5)),
            pn.Row(self.lr_input, self.btn_lr, **box),
            pn.Row(self.btn_pause, self.btn_resume, self.btn_stop, **box),
            self.btn_fork, self.fork_card,
            pn.layout.Divider(),
            self.result, self.log,
            sizing_mode="stretch_width", css_classes=["rv-steering"],
        )
        self._refresh()

    # ------------------------------------------------------------------ state in
    def update_state(self, *, run_id: str | None, status: str, layers: Mapping[str, int],
                     conv_layers: Sequence[str], frozen_layers: Sequence[str],
                     frozen_filters: Mapping[str, Sequence[int]], paused: bool = False,
                     lr: float | None = None) -> None:
        """Push the run's current state (from the live snapshot or the last epoch record).

        Example:
            >>> c.update_state(run_id="run-1", status="running", layers={"conv1": 16},
            ...                conv_layers=["conv1"], frozen_layers=["conv1"], frozen_filters={})
        """
        changes: dict[str, Any] = {}
        if run_id != self.run_id:
            changes["run_id"] = run_id
            changes["selected"] = []
            self.pending.clear()
        new = {"status": status, "layers": dict(layers), "conv_layers": list(conv_layers),
               "frozen_layers": list(frozen_layers),
               "frozen_filters": {k: sorted(int(i) for i in v) for k, v in frozen_filters.items()},
               "paused": bool(paused), "lr": lr}
        for k, v in new.items():
            if getattr(self, k) != v:
                changes[k] = v
        if "layers" in changes and self.layer in changes["layers"] and "selected" not in changes:
            n = changes["layers"][self.layer]
            if any(i >= n for i in self.selected) or n != self.layers.get(self.layer):
                changes["selected"] = []  # indices shifted (filters added or deleted)
        options = list(conv_layers) + [n for n in layers if n not in conv_layers]
        self.param.layer.objects = options
        if self.layer not in options:
            changes["layer"] = options[0] if options else None
        if changes:
            self.param.update(**changes)
        if self.lr_input.value is None and lr is not None:
            self.lr_input.value = float(lr)

    def select(self, layer: str, indices: Sequence[int]) -> None:
        """Select filters (from a click on a tile or on a point of the embedding)."""
        if layer in self.param.layer.objects:
            self.param.update(layer=layer, selected=sorted({int(i) for i in indices}))

    # ------------------------------------------------------------------ sending
    def send(self, op: str, words: list[str]) -> str | None:
        """Queue one command; its outcome appears when `resolve` sees its event.

        Returns:
            The command id, or None when it could not be sent (the reason is shown).
        """
        why = self._why_not()
        if why:
            self._show("warning", html.escape(why))
            return None
        if self.sender is None:
            self._show("warning", "This view has no connection to a store.")
            return None
        try:
            cid = self.sender(op, list(words))
        except Exception as exc:  # parse errors, a run that just ended …
            self._show("danger", f"<b>not sent</b>: {html.escape(str(exc))}")
            self.history.insert(0, {"label": " ".join([op, *words]), "status": "not sent",
                                    "message": str(exc)})
            self._render_history()
            return None
        p = Pending(cid, op, list(words), time.time())
        self.pending[cid] = p
        self._show("info", f"sent <code>{html.escape(p.label)}</code>; waiting for the trainer…")
        return cid

    def request(self, op: str, words: list[str]) -> str | None:
        """What a button does: filter surgery with a planner shows its plan (`preview`), the rest is sent.

        Returns:
            The command id when it was sent now, else None.
        """
        if op in PLANNED_OPS and self.planner is not None:
            self.preview(op, words)
            return None
        return self.send(op, words)

    def preview(self, op: str, words: list[str]) -> None:
        """Show the surgery plan of ``op words`` with Apply / Cancel (the plan is read in a thread).

        Example:
            >>> c.preview("add-filters", ["conv1", "2"])   # then c.apply_plan() sends it
        """
        why = self._why_not()
        if why:
            self._show("warning", html.escape(why))
            return
        self._plan_gen += 1
        gen = self._plan_gen
        self.planned = (op, list(words))
        label = html.escape(" ".join([op, *words]))
        self.plan_text.object = (f"<div class='rv-plan-wait' style='font-size:12px'>planning <code>{label}</code> "
                                 "against the run's last recorded epoch…</div>")
        self.btn_plan_apply.disabled = True
        self.btn_plan_apply.label = "Apply"
        self.plan_box.visible = True
        planner = self.planner
        assert planner is not None

        def done(text: str | None, error: str | None) -> None:
            if gen != self._plan_gen or self.planned is None:
                return  # cancelled, or another preview replaced it
            if error is None:
                self.plan_text.object = (
                    f"<pre class='rv-plan-text' data-op='{html.escape(op)}' style='font-size:11.5px;"
                    f"white-space:pre-wrap;margin:4px 0'>{html.escape(text or '')}</pre>")
                self.btn_plan_apply.label = "Apply"
            else:
                self.plan_text.object = (
                    f"<div class='rv-plan-refused' style='font-size:12px;color:#b42318'><b>the plan says "
                    f"this change would be refused</b>: {html.escape(error)}</div>")
                self.btn_plan_apply.label = "Send anyway"
            self.btn_plan_apply.disabled = False

        if _in_session():
            async def work() -> None:
                try:
                    text, err = await asyncio.to_thread(planner, op, list(words)), None
                except Exception as exc:  # noqa: BLE001 - shown in the plan box
                    text, err = None, str(exc) or type(exc).__name__
                await run_locked(lambda: done(text, err))

            pn.state.execute(work)
        else:
            try:
                done(planner(op, list(words)), None)
            except Exception as exc:  # noqa: BLE001
                done(None, str(exc) or type(exc).__name__)

    def apply_plan(self) -> str | None:
        """Send the previewed change (the "Apply" button)."""
        if self.planned is None:
            return None
        op, words = self.planned
        self.cancel_plan()
        return self.send(op, words)

    def cancel_plan(self) -> None:
        """Drop the previewed change (the "Cancel" button)."""
        self.planned = None
        self._plan_gen += 1
        self.plan_box.visible = False
        self.btn_plan_apply.disabled = True

    def _send_layer(self, op: str, extra: list[str] | None = None) -> None:
        if self.layer:
            self.request(op, [self.layer, *(extra or [])])

    def _send_filters(self, op: str) -> None:
        if not self.layer or not self.selected:
            self._show("warning", "Select filters first: click tiles or points in the embedding "
                                  "or type indices.")
            return
        self.request(op, [self.layer, *[str(i) for i in sorted(self.selected)]])

    def _send_lr(self) -> None:
        v = self.lr_input.value
        if v is None:
            self._show("warning", "Type a learning rate first.")
            return
        self.send("set-lr", [repr(float(v))])

    def _select_all(self) -> None:
        n = self.layers.get(self.layer or "", 0)
        self.selected = list(range(n))

    def _typed_indices(self, event: Any) -> None:
        try:
            idx = parse_indices(event.new or "")
        except ValueError:
            self.filter_hint.object = ("<span style='color:#b00'>Type filter indices such as "
                                       "<code>0, 3, 5-7</code>.</span>")
            return
        if sorted(idx) != sorted(self.selected):
            self.selected = idx

    def _open_fork(self) -> None:
        if self.fork_form is None:
            return
        if hasattr(self.fork_form, "select_latest"):
            self.fork_form.select_latest()
        self.fork_card.collapsed = False

    def _fork_opened(self, event: Any) -> None:
        """Render the fork form when its card is first opened (it is not built with the page)."""
        if not event.new and self.fork_form is not None and self.fork_form not in self.fork_card.objects:
            self.fork_card.objects = [self.fork_form]

    # ------------------------------------------------------------------ events in
    def resolve(self, events: pd.DataFrame) -> list[dict[str, Any]]:
        """Show the outcome of this session's commands whose events appeared in ``events``.

        Returns:
            The event rows that resolved a pending command.
        """
        done: list[dict[str, Any]] = []
        if self.pending and events is not None and len(events):
            ids = set(events["event_id"]).intersection(self.pending)
            for row in events[events["event_id"].isin(ids)].to_dict("records"):
                p = self.pending.pop(row["event_id"], None)
                if p is None:
                    continue
                done.append(row)
                self._report(p, row)
        now = time.time()
        for cid, p in list(self.pending.items()):
            if now - p.sent_at > ANSWER_TIMEOUT_S:
                del self.pending[cid]
                msg = (f"no answer from the trainer within {ANSWER_TIMEOUT_S:g} s "
                       "(the command stays queued until the trainer reads it)")
                self._show("warning", f"<code>{html.escape(p.label)}</code>: {msg}")
                self.history.insert(0, {"label": p.label, "status": "no answer", "message": msg})
                self._render_history()
        return done

    def _report(self, p: Pending, row: Mapping[str, Any]) -> None:
        status = str(row.get("status"))
        where = f"epoch {row.get('epoch')}, batch {row.get('batch')}"
        msg = str(row.get("message") or "")
        kind = "success" if status == "applied" else "danger"
        self._show(kind, f"<b class='rv-event-status'>{html.escape(status)}</b>: "
                         f"<code>{html.escape(p.label)}</code>: "
                         f"<span class='rv-event-message'>{html.escape(msg)}</span> ({where})")
        entry = {"label": p.label, "status": status, "message": msg, "where": where,
                 "latency_s": time.time() - p.sent_at}
        self.history.insert(0, entry)
        self._render_history()
        if self.on_result is not None:
            self.on_result(entry)

    def _show(self, kind: str, text: str) -> None:
        self.result.alert_type = kind
        self.result.object = text
        self.result.visible = True

    def _render_history(self) -> None:
        rows = []
        for h in self.history[:6]:
            color = {"applied": "#1a7f37", "rejected": "#b42318"}.get(h["status"], "#8a6d00")
            rows.append(f"<li><span style='color:{color}'>{html.escape(h['status'])}</span> "
                        f"<code>{html.escape(h['label'])}</code></li>")
        self.log.object = ("<div style='font-size:12px'>This tab's last commands:<ul style='margin:2px 0;"
                           "padding-left:18px'>" + "".join(rows) + "</ul></div>") if rows else ""

    # ------------------------------------------------------------------ enabling
    def _why_not(self) -> str:
        if not self.allowed:
            return self.deny_reason or "Steering is disabled on this server."
        if not self.run_id:
            return "Attach to a running run (or start one) to steer it."
        if self.status != "running":
            return (f"Run {self.run_id} is {self.status or 'not running'}: nothing to steer. "
                    "Fork it from an epoch, or open it in replay.")
        return ""

    def _refresh(self, *_: Any) -> None:
        why = self._why_not()
        live = not why
        # the layer select
        opts = list(self.param.layer.objects)
        if list(self.layer_select.options) != opts:
            self.layer_select.options = opts
        if self.layer_select.value != self.layer:
            self.layer_select.value = self.layer
        layer = self.layer or ""
        n = int(self.layers.get(layer, 0))
        frozen = layer in self.frozen_layers
        n_ff = len(self.frozen_filters.get(layer, []))
        badge = (f"<span class='rv-badge rv-frozen' style='background:{FROZEN};color:white;"
                 "border-radius:8px;padding:1px 7px;margin-left:6px'>frozen</span>") if frozen else ""
        kind = "filters" if layer in self.conv_layers else "units"
        self.layer_info.object = (
            f"<div style='font-size:13px'><b>{html.escape(layer)}</b>: "
            f"<span class='rv-nfilters'>{n} {kind}</span>{badge}"
            + (f" · {n_ff} single frozen" if n_ff else "") + "</div>"
        ) if layer else ""
        is_conv = layer in self.conv_layers
        self.btn_freeze.disabled = not live or not layer or frozen
        self.btn_unfreeze.disabled = not live or not layer or not frozen
        self.btn_add.disabled = not live or not is_conv
        self.add_n.disabled = not live or not is_conv
        sel = sorted(i for i in self.selected if i < n)
        text = format_indices(sel)
        if self.indices.value != text:
            self.indices.value = text
        has_sel = bool(sel) and is_conv
        for b in (self.btn_ffreeze, self.btn_funfreeze, self.btn_delete, self.btn_reinit):
            b.disabled = not live or not has_sel
        hint = ""
        if live and is_conv:
            if not sel:
                hint = "No filter selected: click tiles in the network view or points in the embedding."
            elif len(sel) >= n:
                hint = (f"<span style='color:#b42318'>Deleting all {n} filters of {html.escape(layer)} "
                        "cannot apply (at least one must remain): the trainer will refuse it.</span>")
            else:
                fz = set(self.frozen_filters.get(layer, []))
                hint = f"{len(sel)} of {n} selected" + (
                    f" ({len(fz.intersection(sel))} frozen)" if fz.intersection(sel) else "")
        elif live and layer and not is_conv:
            hint = f"{html.escape(layer)} is a dense layer: filter controls apply to conv layers."
        self.filter_hint.object = f"<div style='font-size:12px'>{hint}</div>" if hint else ""
        self.btn_lr.disabled = self.lr_input.disabled = not live
        self.btn_pause.disabled = not live or self.paused
        self.btn_resume.disabled = not live or not self.paused
        self.btn_stop.disabled = not live
        self.btn_fork.disabled = not (self.allowed and self.run_id and self.fork_form is not None)
        if why and self.run_id or not self.allowed:
            self.notice.object = html.escape(why)
            self.notice.alert_type = "danger" if not self.allowed else "warning"
            self.notice.visible = True
        else:
            self.notice.visible = False

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout


def _in_session() -> bool:
    doc = pn.state.curdoc
    return doc is not None and getattr(doc, "session_context", None) is not None


def cli_planner(store_path: str, run_id_getter: Callable[[], str | None], *,
                timeout_s: float = 180.0) -> Planner:
    """A `Planner` that runs ``revacnn steer STORE RUN OP WORDS --dry-run`` in a subprocess.

    The plan is the trainer's own (`revacnn.trainer.preview` over `revacnn.steering.graph`, against
    the run's last recorded epoch); the UI never imports the trainer or TensorFlow, so it asks the
    command line, as a user would.

    Raises:
        RevacnnError: the dry run refused the change (its one-line reason) or failed.

    Example:
        >>> planner = cli_planner("store", lambda: "run-…")
        >>> print(planner("add-filters", ["conv1", "2"]))
    """
    import subprocess
    import sys

    from ...errors import RevacnnError

    def _plan(op: str, words: list[str]) -> str:
        run_id = run_id_getter()
        if not run_id:
            raise RevacnnError("No run attached")
        words = list(words)
        extra: list[str] = []
        if op == "add-filters" and len(words) > 2:
            extra = ["--init", words.pop()]
        cmd = [sys.executable, "-m", "revacnn.cli", "steer", "--store", str(store_path), run_id, op,
               *words, *extra, "--dry-run"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise RevacnnError(f"the dry run took longer than {timeout_s:g} s") from None
        if res.returncode != 0:
            lines = [ln for ln in (res.stderr or res.stdout).strip().splitlines() if ln.strip()]
            raise RevacnnError(lines[-1] if lines else f"the dry run exited with {res.returncode}")
        return res.stdout.strip()

    return _plan


def store_sender(store: Any, run_id_getter: Callable[[], str | None]) -> Sender:
    """A `Sender` that parses a command and queues it in ``store`` for the current run.

    Example:
        >>> sender = store_sender(revacnn.open_store("store"), lambda: "run-…")
        >>> sender("freeze", ["conv1"])
        'cmd-3f2a…'
    """
    from ...steering import parse, send

    def _send(op: str, words: list[str]) -> str:
        run_id = run_id_getter()
        if not run_id:
            raise ValueError("no run attached")
        init = None
        if op == "add-filters" and len(words) > 2:
            init = words.pop()
        cmd = parse(op, words, init=init)
        send(store, run_id, cmd)
        return cmd.command_id

    return _send


def event_args(row: Mapping[str, Any]) -> dict[str, Any]:
    """The decoded ``args`` JSON of an event row ({} when absent or malformed)."""
    try:
        out = json.loads(row.get("args") or "{}")
        return out if isinstance(out, dict) else {}
    except (TypeError, ValueError):
        return {}
