"""The live page: the replay page's views over a running training, plus steering (ReVACNN's live mode).

It is the replay page's stack, not a second UI: the same read model (`revacnn.ui.data`: frames
from epoch records and from the trainer's live snapshot), the same poller (the server's one
`StoreWatcher`, which follows the runs live pages show as `revacnn.ui.feed.RunFeed`s and pushes
each change to their sessions), the same views (`revacnn.ui.views`: network, embedding, curves,
event log) and the same template and colours (`revacnn.ui.theme`). The live page adds the
steering controls, batch-level curves and a picker that lists running runs first. Steering goes
through the store (`revacnn.steering.send`); the trainer applies each command at its next batch
boundary and writes an event, which the feed picks up (polled fast for a while after a click).

Example:
    >>> from revacnn.ui.live import create_live_app
    >>> create_live_app("store").servable()          # or: panel serve apps/live.py --args --store store
"""

from __future__ import annotations

import html
import ipaddress
import logging
import math
import time
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import panel as pn
import param

from ..errors import RevacnnError
from .data import MEASURES, NetworkFrame, ReplayData, StoreWatcher, latest_touched
from .feed import TERMINAL, FeedState, RunFeed
from .launcher import ForkForm, StartRunForm
from .theme import MEASURE_LABELS, PAGE_CSS, make_template, status_badge
from .views.curves import BatchCurvesView, CurvesView, event_x
from .views.doctor import DoctorPanel, live_diagnoses, suggestion_command
from .views.embedding import EmbeddingView
from .views.events import EventLog
from .views.network import NetworkView
from .views.steering import SteeringControls, cli_planner, event_args, store_sender

log = logging.getLogger("revacnn.ui")

__all__ = ["LiveApp", "create_live_app", "event_x", "steering_permission"]

#: Fallback refresh of each session (the feed also pushes every change at once).
SESSION_TICK_MS = 250
#: How long the feed keeps computing the live t-SNE after a page last showed the embedding.
EMBEDDING_WANTED_S = 5.0


# ====================================================================== permission
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}


def steering_permission(allow_steering: bool = True) -> tuple[bool, str]:
    """Whether this browser session may steer, and why not.

    Steering needs ``allow_steering`` and either an authenticated user (Panel basic auth or OAuth)
    or a client on this machine talking to a server on a loopback address.

    Example:
        >>> steering_permission(False)[0]
        False
    """
    fix = ("Serve it on 127.0.0.1 (the default) or with authentication "
           "(`panel serve … --basic-auth …` or OAuth) to steer.")
    if not allow_steering:
        return False, ("Steering is disabled: this app is served on a non-local address without "
                       "authentication, so anyone who reaches it could change the training. " + fix)
    doc = pn.state.curdoc
    ctx = getattr(doc, "session_context", None) if doc is not None else None
    req = getattr(ctx, "request", None) if ctx is not None else None
    if req is None:
        return True, ""  # a notebook or a test: no HTTP client
    try:
        user = pn.state.user
    except Exception:  # noqa: BLE001
        user = None
    if user and user != "guest":
        return True, ""
    headers = {str(k).lower(): v for k, v in (getattr(req, "headers", {}) or {}).items()}
    if any(h in headers for h in ("x-forwarded-for", "forwarded", "x-real-ip")):
        return False, "Steering is disabled: this app is behind a proxy without authentication. " + fix
    ip = getattr(req, "remote_ip", None)
    try:
        local_ip = ip is not None and ipaddress.ip_address(str(ip)).is_loopback
    except ValueError:
        local_ip = False
    host = str(headers.get("host", "")).rsplit(":", 1)[0] if headers.get("host") else ""
    if local_ip and (not host or host in _LOCAL_HOSTS or host.startswith("127.")):
        return True, ""
    return False, (f"Steering is disabled for this connection (from {ip or 'an unknown address'}): "
                   "the app is reachable from other machines and nobody is logged in. " + fix)


# ====================================================================== the app
def lazy_card(content: pn.viewable.Viewable, *, title: str, **params: Any) -> pn.Card:
    """A collapsed card that renders ``content`` only when it is first opened (faster page loads).

    Example:
        >>> card = lazy_card(StartRunForm(store_path="store"), title="Start a new run")
    """
    card = pn.Card(pn.pane.HTML("…"), title=title, collapsed=True, sizing_mode="stretch_width", **params)

    def _opened(event: Any) -> None:
        if not event.new and content not in card.objects:
            card.objects = [content]

    card.param.watch(_opened, "collapsed")
    return card


def _fmt(v: Any, spec: str = ".3f") -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "–"
    return "–" if math.isnan(f) else format(f, spec)


def effective(st: FeedState) -> tuple[NetworkFrame | None, bool, float | None]:
    """The frame to show: the newest one, plus what events applied since it was taken changed.

    Layer (un)freezing, pause/resume and learning-rate changes show as soon as their event
    appears, before the next snapshot confirms them.

    Returns:
        ``(frame, paused, lr)``.

    Example:
        >>> frame, paused, lr = effective(feed.state)
    """
    cur = st.current
    if cur is None:
        return None, False, None
    frozen = set(cur.frozen_layers)
    want = set(frozen)
    paused, lr = cur.paused, cur.lr
    if len(st.events):
        applied = st.events[st.events["status"] == "applied"]
        for r in applied.to_dict("records"):
            at = r.get("at")
            if at is None or pd.isna(at) or pd.Timestamp(at).timestamp() <= cur.at:
                continue
            a = event_args(r)
            if r["kind"] == "freeze":
                want.add(a.get("layer"))
            elif r["kind"] == "unfreeze":
                want.discard(a.get("layer"))
            elif r["kind"] == "pause":
                paused = True
            elif r["kind"] == "resume":
                paused = False
            elif r["kind"] == "set-lr" and isinstance(a.get("lr"), (int, float)):
                lr = float(a["lr"])
    if want != frozen:
        layers = [replace(lf, layer_frozen=lf.name in want,
                          frozen=np.ones(lf.n_filters, bool) if lf.name in want else
                          (lf.frozen if not lf.layer_frozen else np.zeros(lf.n_filters, bool)))
                  for lf in cur.layers]
        cur = replace(cur, layers=layers, key=(*cur.key, tuple(sorted(want))))
    return cur, paused, lr


class LiveApp(pn.viewable.Viewer):
    """The live page of one browser session: attach to (or start) a run, watch it, steer it.

    Example:
        >>> app = LiveApp(store_path="store", run_id="run-…")
        >>> app.refresh()          # what the feed's push (and the periodic callback) does
        >>> app.steering.send("freeze", ["conv1"])
    """

    run_id = param.String(default=None, allow_None=True)
    store_path = param.String()
    allow_steering = param.Boolean(default=True)
    replay_url = param.String(default="replay", allow_None=True,
                              doc="path of the replay app on this server (None: not served)")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.data = ReplayData.shared(self.store_path)  # opens the store read-only, never creates one
        self.watcher = StoreWatcher.shared(self.data.path)
        self.feed: RunFeed | None = None
        self._seen: dict[str, Any] = {}
        self._runs_v: Any = None
        self._runs = pd.DataFrame(columns=["run_id", "name", "status", "created_at", "parent_run_id",
                                           "fork_epoch"])
        self._closed = False
        self._push_pending = False
        self._doc = pn.state.curdoc if getattr(pn.state.curdoc, "session_context", None) is not None else None
        allowed, why = steering_permission(self.allow_steering)
        self.allowed, self.deny_reason = allowed, why

        self.run_select = pn.widgets.Select(label="Run", options={}, sizing_mode="stretch_width",
                                            css_classes=["rv-run-select"])
        self.run_select.param.watch(self._picked, "value")
        root = str(self.data.path)
        self.start_form = StartRunForm(store_path=root, enabled=allowed)
        self.fork_form = ForkForm(store_path=root, enabled=allowed)
        # filter surgery shows its plan (`revacnn steer … --dry-run`) before it is sent
        self.steering = SteeringControls(sender=self._send, fork_form=self.fork_form, allowed=allowed,
                                         deny_reason=why, planner=cli_planner(root, lambda: self.run_id))
        self._store_sender: Any = None
        self.steering.param.watch(self._selection_changed, ["layer", "selected"])
        # the replay page's views
        self.network = NetworkView(measure="act_mean", empty_message="Waiting for the first snapshot of the run…")
        self.network.param.watch(self._tile_clicked, "clicks")
        self.doctor = DoctorPanel(enabled=allowed, action="send this command to the trainer")
        self.doctor.param.watch(self._on_doctor, "request")
        self.doctor_note = pn.pane.Alert("", alert_type="info", visible=False, css_classes=["rv-doctor-note"])
        self._embedding: EmbeddingView | None = None  # built when its tab is first shown (faster load)
        self._curves: CurvesView | None = None
        self._embedding_tab = pn.Column(sizing_mode="stretch_width")
        self._curves_tab = pn.Column(sizing_mode="stretch_width")
        self.batch_curves = BatchCurvesView()
        self.event_log = EventLog(empty_message="No steering events yet.")
        self.probe_select = pn.widgets.Select(label="Probe image", options={"probe 0": 0}, width=220)
        self.measure_select = pn.widgets.Select(label="Filter measure",
                                                options={MEASURE_LABELS[m]: m for m in MEASURES},
                                                value="act_mean", width=220)
        self.probe_select.param.watch(self._on_probe, "value")
        self.measure_select.param.watch(self._on_measure, "value")
        self._probes_key: Any = None
        self.status_line = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["rv-status"],
                                        stylesheets=[PAGE_CSS])
        self.progress = pn.indicators.Progress(value=0, max=1, bar_color="primary", sizing_mode="stretch_width",
                                               height=14, css_classes=["rv-progress-bar"])
        self.banner = pn.pane.Alert("", alert_type="success", visible=False, css_classes=["rv-run-ended"])
        self.error = pn.pane.Alert("", alert_type="warning", visible=False)
        self.auth_notice = pn.pane.Alert(why, alert_type="danger", visible=not allowed,
                                         css_classes=["rv-auth-notice"])
        self.tabs = pn.Tabs(
            ("Network", pn.Column(
                pn.Row(self.probe_select, self.measure_select, sizing_mode="stretch_width"),
                pn.pane.HTML("<div style='font-size:11.5px;color:var(--rv-muted)'>Click tiles to select "
                             "filters for steering (click again to unselect).</div>", margin=(0, 5)),
                self.network,
                pn.pane.HTML("<b>Doctor</b> <span style='color:var(--rv-muted);font-size:11px'>findings of "
                             "the last recorded epoch, and provisional ones (live) of the snapshot "
                             "between epochs; a fix is sent to the trainer as a steering command</span>"),
                self.doctor, self.doctor_note, sizing_mode="stretch_width")),
            ("Embedding", self._embedding_tab),
            ("Epoch curves", self._curves_tab),
            dynamic=False, sizing_mode="stretch_width",
        )
        self.tabs.param.watch(lambda _e: self.run_locked(self._tab_shown), "active")
        self.main = pn.Column(
            self.auth_notice, self.status_line, self.progress, self.banner, self.error, self.tabs,
            pn.Row(pn.Column(pn.pane.HTML("<b>Loss and accuracy</b>"), self.batch_curves,
                             sizing_mode="stretch_width"),
                   pn.Column(pn.pane.HTML("<b>Events</b>"), self.event_log, sizing_mode="stretch_width"),
                   sizing_mode="stretch_width"),
            sizing_mode="stretch_width", css_classes=["rv-live"],
        )
        problem = self.data.problem()
        if problem:
            self.error.object = f"Cannot open the store. {html.escape(problem)}"
            self.error.visible = True
            self.status_line.object = "<div style='font-size:14px'>No store to follow.</div>"
            return
        self._update_runs(force=True)
        if self.run_id:
            self._attach(self.run_id)
        elif len(self._runs):
            self._attach(self.default_run(self._runs))
        self.refresh()

    @property
    def embedding(self) -> EmbeddingView:
        """The embedding view (the replay page's), built on first use."""
        if self._embedding is None:
            self._embedding = EmbeddingView(trails=False, measure=self.measure_select.value,
                                            probe=int(self.probe_select.value or 0))
            self._embedding.param.watch(self._point_clicked, "selected")
            self._embedding_tab.objects = [self._embedding]
        return self._embedding

    @property
    def curves(self) -> CurvesView:
        """The per-epoch curves (the replay page's view), built on first use."""
        if self._curves is None:
            self._curves = CurvesView()
            self._curves_tab.objects = [self._curves]
            self._seen.pop("epochs_v", None)
        return self._curves

    def _tab_shown(self) -> None:
        if self.tabs.active == 1:
            _ = self.embedding
        elif self.tabs.active == 2:
            _ = self.curves
        self._redraw_current()

    def sidebar(self) -> list[Any]:
        """What goes into the page's sidebar: runs, start a run, steering."""
        start_card = lazy_card(self.start_form, title="Start a new run", css_classes=["rv-start-card"])
        return [pn.pane.HTML("<b style='font-size:14px'>Runs</b>"), self.run_select, start_card,
                pn.layout.Divider(), pn.pane.HTML("<b style='font-size:14px'>Steering</b>"), self.steering]

    @staticmethod
    def default_run(runs: pd.DataFrame) -> str:
        """The run a new session attaches to: the newest running one, else the newest one."""
        running = runs[runs["status"] == "running"]
        pick = running if len(running) else runs
        return str(pick.sort_values("created_at", kind="stable")["run_id"].iloc[-1])

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the fallback periodic refresh in the current server session."""
        pn.state.add_periodic_callback(self.refresh, period=SESSION_TICK_MS)
        try:
            pn.state.on_session_destroyed(lambda _ctx: self.close())
        except Exception:  # noqa: BLE001 - not in a server session
            pass

    def close(self) -> None:
        """Stop following (the session ended)."""
        if self._closed:
            return
        self._closed = True
        self._detach()

    def _detach(self) -> None:
        if self.feed is not None:
            try:
                self.feed.listeners.remove(self._pushed)
            except ValueError:
                pass
            self.watcher.unfollow(self.feed)
            self.feed = None

    def _pushed(self) -> None:
        """Called by the poller thread when the feed changed: refresh on the session's loop now."""
        doc = self._doc
        if doc is None or self._push_pending or self._closed:
            return
        self._push_pending = True

        def run() -> None:
            self._push_pending = False
            self.refresh()

        try:
            doc.add_next_tick_callback(run)
        except Exception:  # noqa: BLE001 - the session is gone
            self._push_pending = False

    # ------------------------------------------------------------------ runs
    def _update_runs(self, *, force: bool = False) -> None:
        v = self.watcher.version
        if not force and v == self._runs_v:
            return
        self._runs_v = v
        try:
            runs = self.data.store.runs()
        except RevacnnError as exc:
            log.debug("run list failed: %s", exc)
            return
        self._runs = runs[["run_id", "name", "status", "created_at", "parent_run_id", "fork_epoch"]]
        runs = self._runs
        opts: dict[str, str] = {}
        if len(runs):
            order = runs.assign(_live=(runs["status"] != "running")).sort_values(
                ["_live", "created_at"], ascending=[True, False])
            for r in order.to_dict("records"):
                label = f"{r['name'] if isinstance(r['name'], str) else r['run_id']} · {r['status']}"
                if isinstance(r.get("parent_run_id"), str):
                    label += f" · fork@{r.get('fork_epoch')}"
                if r["name"] != r["run_id"]:
                    label += f" ({r['run_id']})"
                opts[label] = r["run_id"]
        if self.run_id and self.run_id not in opts.values():
            opts[self.run_id] = self.run_id
        if opts != self.run_select.options:
            self.run_select.options = opts
        if self.run_id and self.run_select.value != self.run_id:
            self.run_select.value = self.run_id

    def _picked(self, event: Any) -> None:
        if event.new and event.new != self.run_id:
            run_id = event.new
            self.run_locked(lambda: self._attach(run_id))

    def run_locked(self, fn: Any) -> None:
        """Run ``fn``, which changes Bokeh models, where that is safe (the next tick of the session)."""
        doc = self._doc
        if doc is not None and getattr(doc, "session_context", None) is not None:
            doc.add_next_tick_callback(fn)
        else:
            fn()

    def _redraw_current(self) -> None:
        if self.feed is not None:
            self._seen.pop("frame", None)
            self.refresh()

    def _attach(self, run_id: str) -> None:
        if self.feed is not None and self.feed.run_id == run_id:
            return
        try:
            self.data.store.run(run_id)
        except Exception as exc:  # noqa: BLE001
            self.error.object = html.escape(str(exc))
            self.error.visible = True
            return
        if self.feed is not None:
            self._detach()
            self.batch_curves.reset()
            self.event_log.events = None
            self.network.frame = None
            self.banner.visible = False
        self.run_id = run_id
        self._store_sender = store_sender(self.data.store, lambda: self.run_id)
        self.feed = self.watcher.follow(run_id)
        self.feed.listeners.append(self._pushed)
        self._seen = {}
        self.fork_form.run_id = run_id
        if self.run_select.value != run_id:
            if run_id not in self.run_select.options.values():
                self._update_runs(force=True)
            self.run_select.value = run_id
        try:
            if pn.state.location is not None:
                pn.state.location.update_query(run=run_id)
        except Exception:  # noqa: BLE001
            pass
        self.refresh()

    def _send(self, op: str, words: list[str]) -> str:
        """Queue a steering command for the attached run and poll its events fast until it answers."""
        if self._store_sender is None:
            raise RevacnnError("No run attached")
        cid = self._store_sender(op, words)
        if self.feed is not None:
            self.watcher.heat(self.feed)
        return cid

    def _on_doctor(self, event: Any) -> None:
        """A click on a finding's fix: send it to the trainer, its filters mapped to today's indices."""
        req = event.new
        if not req:
            return
        cur = effective(self.feed.state)[0] if self.feed is not None else None
        uids = {lf.name: [int(u) for u in lf.uids] for lf in cur.layers} if cur is not None else None
        try:
            cmd = suggestion_command(req, uids)
        except RevacnnError as exc:
            self.doctor_note.param.update(object=html.escape(str(exc)), alert_type="danger", visible=True)
            return
        a = cmd.args
        words = ([str(a["layer"])] if "layer" in a else []) + [str(int(i)) for i in a.get("indices", [])]
        if "n" in a:
            words.append(str(int(a["n"])))
        if "init" in a:
            words.append(str(a["init"]))
        if "lr" in a:
            words.append(repr(float(a["lr"])))
        label = " ".join([cmd.op, *words])
        cid = self.steering.send(cmd.op, words)
        if cid is None:
            self.doctor_note.param.update(object=f"Not sent: <code>{html.escape(label)}</code> (see the "
                                                 "steering panel for why).", alert_type="danger", visible=True)
        else:
            self.doctor_note.param.update(
                object=f"Sent <code>{html.escape(label)}</code> to the trainer; its event (applied or "
                       "rejected) appears in the steering panel and the event log.",
                alert_type="info", visible=True)

    # ------------------------------------------------------------------ selection
    def _toggle(self, layer: str, uid: int) -> None:
        """Add the filter ``uid`` of ``layer`` to the steering selection, or remove it."""
        frame = self.network.frame
        lf = frame.layer(layer) if frame is not None else None
        i = lf.position(uid) if lf is not None else None
        if i is None:
            return
        current = set(self.steering.selected) if self.steering.layer == layer else set()
        current ^= {i}
        self.steering.select(layer, sorted(current))

    def _tile_clicked(self, _event: Any) -> None:
        sel = self.network.selected
        if sel is None:
            return
        self._toggle(*sel)
        self.network.selected = None  # the steering selection is what is highlighted

    def _point_clicked(self, event: Any) -> None:
        if event.new is not None:
            self._toggle(*event.new)

    def _selection_changed(self, *_: Any) -> None:
        layer, selected = self.steering.layer, self.steering.selected
        frame = self.network.frame
        lf = frame.layer(layer) if frame is not None and layer else None
        sel = [f"{layer}:{int(lf.uids[i])}" for i in sorted(selected) if lf is not None and i < lf.n_filters]
        if sel != self.network.selection:
            self.network.selection = sel
        emb = self._embedding
        if emb is not None and layer and frame is not None and layer in frame.conv_layers and emb.layer != layer:
            self.run_locked(lambda: setattr(emb, "layer", layer))

    def _on_probe(self, event: Any) -> None:
        self.run_locked(lambda: self.param_update(probe=int(event.new)))

    def _on_measure(self, event: Any) -> None:
        self.run_locked(lambda: self.param_update(measure=event.new))

    def param_update(self, **kw: Any) -> None:
        """Set a view input on every view that has it (probe, measure)."""
        for view in (self.network, self._embedding):
            if view is not None:
                view.param.update(**{k: v for k, v in kw.items() if k in view.param})

    # ------------------------------------------------------------------ refresh
    def refresh(self) -> None:
        """Bring every view up to the feed's state (cheap when nothing changed)."""
        if self._closed:
            return
        for form in (self.start_form, self.fork_form):
            rid = form.poll()
            if rid:
                self._update_runs(force=True)
                self._attach(rid)
        self._update_runs()
        feed = self.feed
        if feed is None:
            if not self.error.visible:
                self.status_line.object = ("<div style='font-size:14px'>No run attached: pick a running run "
                                           "in the sidebar, or start one.</div>")
            return
        if self.tabs.active == 1:
            feed.want_embedding = time.monotonic() + EMBEDDING_WANTED_S
        st = feed.state
        seen = self._seen
        cur, paused, lr = effective(st)
        # light work first, so that what a click waits for reaches the browser before big redraws
        if st.events_v != seen.get("events_v"):
            seen["events_v"] = st.events_v
            self.event_log.events = st.events
            self.batch_curves.events = st.events
        if st.status_v != seen.get("status_v"):
            seen["status_v"] = st.status_v
            self._update_banner(st)
        state_key = (st.events_v, st.status_v, st.epochs_v, st.snap_v)
        if state_key != seen.get("state"):
            seen["state"] = state_key
            self._push_state(st, cur, paused, lr)
        self.steering.resolve(st.events)
        self._update_status(st, cur, paused, lr)
        if st.epochs_v != seen.get("epochs_v"):
            seen["epochs_v"] = st.epochs_v
            self.fork_form.epochs_available = list(st.epochs)
            if st.bundle is not None:
                b = st.bundle
                if self._curves is not None:
                    self._curves.param.update(metrics=b.metrics, layers=b.layers, marks=b.marks,
                                              inherited_upto=b.fork_epoch if b.parent_run_id else None,
                                              epoch=b.epochs[-1] if b.epochs else None)
                self.batch_curves.metrics = b.metrics
                self.doctor.param.update(diagnoses=b.diagnoses, epoch=b.epochs[-1] if b.epochs else None)
                self.network.findings = self.doctor.rows()
                if self._embedding is not None:
                    self._embedding.history = b.filters
                self._set_probes(b)
        if st.error:
            self.error.object = f"Reading the run failed (retrying): {html.escape(st.error)}"
            self.error.visible = True
        elif self.error.visible and feed is not None:
            self.error.visible = False
        if seen.get("live_doc") != (st.snap_v, st.status):
            seen["live_doc"] = (st.snap_v, st.status)
            self._live_findings(st)
        if seen.get("snap_v") != st.snap_v:
            seen["snap_v"] = st.snap_v
            self.batch_curves.param.update(batches=st.batches, n_batches=(cur.n_batches if cur else None))
        # the layers of the most recent applied surgery stay marked until the next one (replay marks
        # each surgery at its own epoch)
        touched = latest_touched(st.events)
        if touched != self.network.touched:
            self.network.touched = touched  # the layers this epoch's applied surgery changed
        if cur is not None and cur.key != seen.get("frame"):
            seen["frame"] = cur.key
            self.network.frame = cur
            self._selection_changed()
            if self.tabs.active == 1:
                self.embedding.frame = cur
        elif self.tabs.active == 1 and cur is not None and self.embedding.frame is not cur:
            self.embedding.param.update(frame=cur, history=st.bundle.filters if st.bundle else None)

    def _live_findings(self, st: FeedState) -> None:
        """Between epochs: the doctor's provisional dead/redundant findings on the live snapshot.

        Shown while the run trains and its snapshot is not older than its last record (the
        snapshot at an epoch's end is the record's twin); cleared when the run ends.
        """
        snap, rec = st.live, st.record
        if snap is None or st.status in TERMINAL or (rec is not None and (snap.epoch or 0) < (rec.epoch or 0)):
            if self.doctor.live is not None:
                self.doctor.param.update(live=None, live_label="")
            return
        try:
            found = live_diagnoses(snap)
        except Exception:  # noqa: BLE001 - a provisional view must never break the page
            log.debug("live diagnoses failed", exc_info=True)
            return
        where = f"snapshot in epoch {snap.epoch}"
        old = self.doctor.live
        same = (old is not None and where == self.doctor.live_label and len(old) == len(found)
                and old[["layer", "filter_uid", "kind"]].astype(str).values.tolist()
                == found[["layer", "filter_uid", "kind"]].astype(str).values.tolist())
        if not same:  # redraw only when the findings change (a snapshot comes every second)
            self.doctor.param.update(live=found, live_label=where)

    def _set_probes(self, bundle: Any) -> None:
        key = (bundle.session_id, len(bundle.probe_labels))
        if key == self._probes_key:
            return
        self._probes_key = key
        opts = {}
        for i, lab in enumerate(bundle.probe_labels):
            lab = int(lab)
            name = bundle.class_names[lab] if lab < len(bundle.class_names) else str(lab)
            opts[f"probe {i}: {name}"] = i
        self.probe_select.options = opts or {"probe 0": 0}

    def _push_state(self, st: FeedState, cur: NetworkFrame | None, paused: bool, lr: float | None) -> None:
        if cur is None:
            self.steering.update_state(run_id=st.run_id, status=st.status, layers={}, conv_layers=[],
                                       frozen_layers=[], frozen_filters={})
            return
        units = dict(cur.units) or {lf.name: lf.n_filters for lf in cur.layers}
        for lf in cur.layers:
            units[lf.name] = lf.n_filters
        self.steering.update_state(
            run_id=st.run_id, status=st.status, layers=units, conv_layers=cur.conv_layers,
            frozen_layers=cur.frozen_layers, frozen_filters=cur.frozen_filters, paused=paused, lr=lr,
        )
        self.fork_form.layers = list(cur.conv_layers) + [n for n in units if n not in cur.conv_layers]

    def _update_status(self, st: FeedState, cur: NetworkFrame | None, paused: bool, lr: float | None) -> None:
        live = st.live
        total = st.config.get("epochs", "?")
        status = st.status
        if paused and status == "running":
            status = "paused"
        badge = f"<span class='rv-run-status' data-status='{status}'>{status_badge(status)}</span>"
        parts = [f"<span style='font-size:19px;font-weight:700'>{html.escape(st.name or st.run_id)}</span> {badge}"]
        if live is not None and status in ("running", "paused"):
            age = time.time() - live.at
            parts.append(
                f"<span class='rv-progress-text' data-epoch='{live.epoch}' data-batch='{live.batch}'>"
                f"epoch {live.epoch}/{total} · batch {live.batch}/{live.n_batches or '?'}</span>"
            )
            parts.append(f"<span style='color:var(--rv-muted)'>snapshot {age:.0f} s ago</span>")
        if lr is not None:
            parts.append(f"<span>lr {lr:g}</span>")
        stats = ""
        if st.epochs:
            m = st.metrics.iloc[-1]
            parts.append(f"<span class='rv-last-epoch' data-epoch='{st.epochs[-1]}'>recorded: epoch "
                         f"{st.epochs[-1]}</span>")
            stats = "".join(f"<div class='rv-stat'><b>{v}</b><span>{k}</span></div>" for k, v in (
                ("val accuracy", _fmt(m.get("val_accuracy"))), ("val loss", _fmt(m.get("val_loss"))),
                ("train loss", _fmt(m.get("loss")))))
        text = ("<div class='rv-title-bar' style='font-size:14px'>" + " · ".join(parts) + "</div>"
                + (f"<div class='rv-title-bar' style='margin-top:6px'>{stats}</div>" if stats else ""))
        if text != self.status_line.object:
            self.status_line.object = text
        if live is not None and live.n_batches:
            try:
                done = (int(live.epoch) - 1) * live.n_batches + int(live.batch or 0)
                n_total = int(total) * live.n_batches
            except (TypeError, ValueError):
                done, n_total = 0, 1
            if status == "finished":
                done = n_total
            mx = max(n_total, 1)
            value = int(min(max(done, 0), mx))
            if mx >= self.progress.max:
                if self.progress.max != mx:
                    self.progress.max = mx
                if self.progress.value != value:
                    self.progress.value = value
            else:
                self.progress.value = min(value, self.progress.value)
                self.progress.max = mx
                self.progress.value = value

    def _update_banner(self, st: FeedState) -> None:
        if st.status in TERMINAL:
            last = st.epochs[-1] if st.epochs else None
            msg = f"Run **{st.run_id}** is **{st.status}**"
            if last is not None:
                msg += f" (last recorded epoch: {last})"
            if st.status_message:
                msg += f": {st.status_message}"
            if self.replay_url:
                msg += f". [Open it in replay]({self.replay_url}?run={st.run_id})"
            self.banner.object = msg
            self.banner.alert_type = "success" if st.status == "finished" else "warning"
            self.banner.visible = True
        else:
            self.banner.visible = False

    def __panel__(self) -> pn.viewable.Viewable:
        return self.main


def create_live_app(store_path: str, *, allow_steering: bool = True, run_id: str | None = None,
                    replay_url: str | None = "replay") -> pn.viewable.Viewable:
    """Build the live page for the current browser session (the replay page's template and views).

    Args:
        store_path: the store folder (opened read-only: a wrong path shows a message, it never
            creates a store).
        allow_steering: False disables every steering control (and says why): pass False when the
            server listens on a non-local address without authentication. With True, a client that
            is neither local nor logged in still cannot steer.
        run_id: the run to attach to (default: the ``?run=`` query argument, else the newest running run).
        replay_url: path of the replay app served beside this one, for "open in replay" (None: none).

    Returns:
        A servable page (a FastListTemplate); its `LiveApp` is ``page.live_app``.

    Example:
        >>> create_live_app("store").servable()
    """
    if run_id is None:
        try:
            arg = (pn.state.session_args or {}).get("run")
            if arg:
                run_id = arg[0].decode() if isinstance(arg[0], bytes) else str(arg[0])
        except Exception:  # noqa: BLE001
            run_id = None
    app = LiveApp(store_path=str(store_path), allow_steering=allow_steering, run_id=run_id,
                  replay_url=replay_url)
    if pn.state.curdoc is not None and getattr(pn.state.curdoc, "session_context", None) is not None:
        app.start()
    tpl = make_template("revacnn · live", sidebar=app.sidebar(), main=[app])
    tpl.live_app = app  # type: ignore[attr-defined]  # for tests and notebooks
    return tpl
