"""The live app: follow a running training in real time and steer it with a click (ReVACNN's live mode).

One `LiveHub` per store and server process polls cheap file stamps (directory listings and
modification times) in a background thread and loads what changed: the trainer's live snapshot
(about every second), new steering events and newly committed epoch records. Every browser session
reads the hub's latest `FeedState` from a light periodic callback, so any number of tabs can follow
the same run and all of them see what one of them steers. Steering goes through the store
(`revacnn.steering.send`); the trainer applies each command at its next batch boundary and writes
an event, which the hub picks up like everything else.

Example:
    >>> from revacnn.ui.live import create_live_app
    >>> create_live_app("store").servable()          # or: panel serve apps/live.py --args --store store
"""

from __future__ import annotations

import html
import ipaddress
import logging
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import panel as pn
import param
from bokeh.models import (
    ColumnDataSource,
    HoverTool,
)
from bokeh.plotting import figure

from ..storage import EVENTS_SCHEMA, Store, open_store
from ..storage.live import read_live_snapshot
from .data import MEASURES, LayerFrame, NetworkFrame
from .launcher import ForkForm, StartRunForm
from .theme import MEASURE_LABELS, css_vars
from .views.events import EventLog
from .views.network import NetworkView as SharedNetworkView
from .views.steering import SteeringControls, event_args, store_sender

log = logging.getLogger("revacnn.ui.live")

#: Seconds between two polls of a followed run's files (snapshot, events, epochs, status).
FEED_POLL_S = 0.2
#: The same while a steering command sent from this server waits for its event.
FEED_POLL_HOT_S = 0.05
#: How long a run stays "hot" after a command was sent from this server.
HOT_S = 10.0
#: Seconds between two polls of the store's run list.
RUNS_POLL_S = 1.0
#: Milliseconds between two checks of the hub by each browser session (a version comparison).
SESSION_TICK_MS = 100
TERMINAL = ("finished", "stopped", "interrupted", "failed")


# ====================================================================== data: what the views draw
@dataclass
class LiveRecord:
    """The network's state at one moment, from the live snapshot or from an epoch record.

    Attributes:
        source: ``"live"`` (a snapshot) or ``"epoch"`` (a committed epoch record).
        epoch: the epoch in progress (live) or recorded (epoch).
        batch: batches done in ``epoch`` (live), or None.
        n_batches: batches per epoch, when known.
        at: UNIX time it was published or committed.
        conv_layers: conv layer names in model order.
        n_filters: every weighted layer -> number of filters (units).
        uids: every weighted layer -> filter uids in index order.
        frozen_layers: layers frozen as a whole.
        frozen_filters: layer -> indices of single frozen filters.
        kernels: conv layer -> ``(F, kh, kw, c)``.
        activations: conv layer -> ``(P, F, H, W)``.
        embedding: conv layer -> ``(F, 2)`` t-SNE positions (epoch records only).
        lr: the learning rate.
        paused: whether the trainer is paused.
        probabilities: ``(P, classes)`` the probes' predicted class probabilities, or None.
        measures: conv layer -> per-filter measures (``grad_l1`` … of epoch records).
        key: identifies the content (render caches, redraw decisions).

    Example:
        >>> rec = feed.state.current
        >>> rec.source, rec.n_filters["conv1"], "conv1" in rec.frozen_layers
        ('live', 16, False)
    """

    source: str
    epoch: int
    batch: int | None
    n_batches: int | None
    at: float
    conv_layers: list[str]
    n_filters: dict[str, int]
    uids: dict[str, list[int]]
    frozen_layers: list[str]
    frozen_filters: dict[str, list[int]]
    kernels: dict[str, np.ndarray]
    activations: dict[str, np.ndarray]
    embedding: dict[str, np.ndarray] = field(default_factory=dict)
    lr: float | None = None
    paused: bool = False
    probabilities: np.ndarray | None = None
    measures: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    key: tuple[Any, ...] = ()


def record_from_snapshot(snap: Mapping[str, Any]) -> LiveRecord:
    """A `LiveRecord` from `revacnn.storage.live.read_live_snapshot`'s dict.

    Example:
        >>> rec = record_from_snapshot(read_live_snapshot(store, run_id))
        >>> rec.source, rec.batch
        ('live', 12)
    """
    meta = snap["meta"]
    uids = {k: [int(u) for u in v] for k, v in meta.get("uids", {}).items()}
    ff = {}
    for layer, fz in (meta.get("frozen_filters") or {}).items():
        s = {int(u) for u in fz}
        ff[layer] = [i for i, u in enumerate(uids.get(layer, [])) if u in s]
    kernels = dict(snap.get("kernels", {}))
    return LiveRecord(
        source="live", epoch=int(meta.get("epoch", 0)), batch=int(meta.get("batch", 0)),
        n_batches=int(meta.get("n_batches") or 0) or None, at=float(meta.get("published_at") or 0.0),
        conv_layers=list(kernels), n_filters={k: len(v) for k, v in uids.items()}, uids=uids,
        frozen_layers=list(meta.get("frozen_layers", [])), frozen_filters=ff, kernels=kernels,
        activations=dict(snap.get("activations", {})), lr=meta.get("lr"),
        paused=bool(meta.get("paused", False)), probabilities=snap.get("probabilities"),
        key=("live", meta.get("run_id"), meta.get("epoch"), meta.get("batch"), meta.get("published_at")),
    )


def record_from_epoch(store: Store, run_id: str, epoch: int, layers: pd.DataFrame | None,
                      metrics: Mapping[str, Any] | None = None) -> LiveRecord:
    """A `LiveRecord` from a committed epoch record (read with Zarr: call it off the event loop).

    Args:
        store: the store.
        run_id: the run that recorded ``epoch`` (an ancestor for a fork's inherited epochs).
        epoch: the epoch.
        layers: that run's ``layers`` rows (for the layer-frozen flags), or None.
        metrics: the epoch's ``epochs`` row (``committed_at``, ``lr``, ``n_batches``), or None.

    Example:
        >>> rec = record_from_epoch(store, run_id, 3, store.run(run_id).table("layers"))
        >>> rec.source, rec.epoch
        ('epoch', 3)
    """
    rec = store.run(run_id).epoch(epoch)
    conv = rec.conv_layers
    n_filters, uids, kernels, acts, emb, ff = {}, {}, {}, {}, {}, {}
    measures: dict[str, dict[str, np.ndarray]] = {}
    frozen_layers: list[str] = []
    lay = None
    if layers is not None and len(layers):
        lay = layers[layers["epoch"] == epoch].set_index("layer")
    for name in rec.layer_names:
        lr_ = rec.layer(name)
        u = [int(x) for x in lr_.filter_uids]
        uids[name] = u
        n_filters[name] = len(u)
        layer_frozen = bool(lay.loc[name, "frozen"]) if lay is not None and name in lay.index else False
        if layer_frozen:
            frozen_layers.append(name)
        if name in conv:
            kernels[name] = lr_.kernel
            if lr_.has("activations"):
                acts[name] = lr_.activations
            if lr_.has("embedding"):
                emb[name] = lr_.embedding
            measures[name] = {m: getattr(lr_, m) for m in ("grad_l1", "act_mean", "weight_change_l1")
                              if lr_.has(m)}
            if not layer_frozen and lr_.has("frozen"):
                ff[name] = [int(i) for i in np.flatnonzero(lr_.frozen)]
    m = dict(metrics or {})
    at = m.get("committed_at")
    at_s = pd.Timestamp(at).timestamp() if at is not None and not pd.isna(at) else time.time()
    lr = m.get("lr")
    nb = m.get("n_batches")
    try:
        probabilities = rec.probabilities
    except (KeyError, OSError, ValueError):
        probabilities = None
    return LiveRecord(
        source="epoch", epoch=int(epoch), batch=None,
        n_batches=int(nb) if nb is not None and not pd.isna(nb) and int(nb) > 0 else None,
        at=at_s, conv_layers=list(conv), n_filters=n_filters, uids=uids, frozen_layers=frozen_layers,
        frozen_filters={k: v for k, v in ff.items() if v}, kernels=kernels, activations=acts,
        embedding=emb, lr=None if lr is None or pd.isna(lr) else float(lr),
        probabilities=probabilities, measures=measures,
        key=("epoch", run_id, int(epoch)),
    )


def run_metrics(store: Store, run_id: str) -> pd.DataFrame:
    """Per-epoch rows of a run's full history (a fork's ancestors' epochs before its fork point).

    Reads Parquet directly (no SQL engine), so it is cheap enough to call on every commit.

    Example:
        >>> run_metrics(store, fork_id)[["epoch", "val_accuracy", "source_run_id"]]
    """
    run = store.run(run_id)
    own = run.table("epochs")
    own["source_run_id"] = run_id
    if run.parent_run_id is not None and run.fork_epoch is not None:
        parent = run_metrics(store, run.parent_run_id)
        parent = parent[parent["epoch"] < int(run.fork_epoch)]
        own = pd.concat([parent, own], ignore_index=True) if len(parent) else own
    return own.sort_values("epoch", kind="stable").reset_index(drop=True)


@dataclass
class FeedState:
    """Everything the hub knows about one run; replaced whole (never mutated) on every change.

    Attributes:
        version: bumps whenever anything below changes.
        snap_v, events_v, epochs_v, status_v: per-part versions (sessions redraw only what changed).
        live: the last live snapshot, as a `LiveRecord`; ``batches`` its batch-level history.
        record: the last committed epoch record; ``metrics`` every epoch's row of the history.
        events: the run's steering events, oldest first.

    Example:
        >>> st = LiveHub.for_store("store").subscribe(run_id).state
        >>> st.status, st.epochs[-1], len(st.events)
        ('running', 4, 2)
    """

    run_id: str
    name: str = ""
    status: str = "running"
    status_message: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    parent_run_id: str | None = None
    fork_epoch: int | None = None
    snapshot: dict[str, Any] | None = None
    batches: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))
    live: LiveRecord | None = None
    events: pd.DataFrame = field(default_factory=lambda: EVENTS_SCHEMA.empty_table().to_pandas())
    metrics: pd.DataFrame = field(default_factory=pd.DataFrame)
    epochs: list[int] = field(default_factory=list)
    record: LiveRecord | None = None
    previous_uids: dict[str, list[int]] | None = None
    probes: tuple[np.ndarray, np.ndarray] | None = None
    class_names: list[str] = field(default_factory=list)
    error: str | None = None
    version: int = 0
    snap_v: int = 0
    events_v: int = 0
    epochs_v: int = 0
    status_v: int = 0

    @property
    def current(self) -> LiveRecord | None:
        """The newest of the live snapshot and the last epoch record (the record once the run ended)."""
        a, b = self.live, self.record
        if a is None:
            return b
        if b is None:
            return a
        if self.status in TERMINAL:
            return b  # a snapshot taken after the last record was never recorded: show what was
        if b.epoch >= a.epoch or b.at >= a.at:
            return b
        return a


class RunFeed:
    """What the hub knows about one followed run; `state` is swapped atomically by the hub thread.

    Example:
        >>> feed = RunFeed(store, run_id)
        >>> feed.poll()      # the hub thread calls this every FEED_POLL_S
        True
        >>> feed.state.live.batch
        12
    """

    def __init__(self, store: Store, run_id: str) -> None:
        self.store = store
        self.run_id = run_id
        self.state = FeedState(run_id=run_id)
        self.subscribers = 0
        self.hot_until = 0.0
        self._stamps: dict[str, Any] = {}
        self._status_checked = 0.0
        self._event_names: tuple[str, ...] = ()

    def _bump(self, st: FeedState, **parts: Any) -> FeedState:
        changes = dict(parts)
        for key in ("snap_v", "events_v", "epochs_v", "status_v"):
            if changes.pop(key, False):
                changes[key] = getattr(st, key) + 1
        changes["version"] = st.version + 1
        return replace(st, **changes)

    def poll(self) -> bool:
        """Check the run's files once and load what changed; True when the state changed."""
        rid = self.run_id
        st = self.state
        changed = False
        try:
            # the first poll: metadata and probes
            if "meta" not in self._stamps:
                run = self.store.run(rid)
                self._run = run
                try:
                    probes = self.store.probes(run.session_id)
                    names = self.store.class_names(run.session_id)
                except Exception:  # noqa: BLE001 - probes are decoration
                    probes, names = None, []
                st = self._bump(st, name=run.name or rid, config=dict(run.config),
                                parent_run_id=run.parent_run_id, fork_epoch=run.fork_epoch,
                                probes=probes, class_names=names, status_v=True)
                self._stamps["meta"] = True
                changed = True
            stamps = self.store.run_stamp(rid)
            # status: its file changes with every heartbeat; re-read at most every second
            stamp = stamps["status"]
            now = time.monotonic()
            if stamp != self._stamps.get("status") or now - self._status_checked > 2.0:
                self._stamps["status"] = stamp
                self._status_checked = now
                info = self._run.status_info
                status = self._run.status
                if status != st.status or info.get("message") != st.status_message:
                    st = self._bump(st, status=status, status_message=info.get("message"), status_v=True)
                    changed = True
            # the live snapshot
            stamp = stamps["snapshot"]
            if stamp is not None and stamp != self._stamps.get("snap"):
                snap = read_live_snapshot(self.store, rid)
                if snap is not None:
                    self._stamps["snap"] = stamp
                    st = self._bump(st, snapshot=snap["meta"], batches=np.asarray(snap["batches"]),
                                    live=record_from_snapshot(snap), snap_v=True)
                    changed = True
            # events: one small Parquet file each; read only the new ones
            names = stamps["events"]
            if names != self._event_names:
                known = set(self._event_names)
                ev = self.store.read_events(rid, [n for n in names if n not in known])
                self._event_names = names
                if len(ev):
                    events = pd.concat([st.events, ev], ignore_index=True) if len(st.events) else ev
                    events = events.sort_values("at", kind="stable").reset_index(drop=True)
                    st = self._bump(st, events=events, events_v=True)
                    changed = True
            # committed epochs: the epochs table's segment names are the commit markers
            names = stamps["epochs"]
            if names != self._stamps.get("epochs"):
                metrics = run_metrics(self.store, rid)
                epochs = [int(e) for e in metrics["epoch"]] if len(metrics) else []
                if epochs != st.epochs or not metrics.equals(st.metrics):
                    # publish the commit at once (status line, curves); the record's arrays follow
                    st = self._bump(st, metrics=metrics, epochs=epochs, epochs_v=True)
                    self.state = st
                    changed = True
                record, previous = st.record, st.previous_uids
                if epochs and (record is None or record.epoch != epochs[-1]):
                    previous = record.uids if record is not None else None
                    last = metrics.iloc[-1].to_dict()
                    src = str(last.get("source_run_id") or rid)
                    layers = self.store.run(src).table("layers")
                    record = record_from_epoch(self.store, src, epochs[-1], layers, last)
                    st = self._bump(st, record=record, previous_uids=previous, epochs_v=True)
                    changed = True
                self._stamps["epochs"] = names
            if st.error is not None:
                st = replace(st, error=None)
        except Exception as exc:  # noqa: BLE001 - a half-written file: try again next poll
            log.debug("poll of %s failed: %s", rid, exc)
            if st.error != str(exc):
                st = self._bump(st, error=f"{type(exc).__name__}: {exc}")
                changed = True
        if changed:
            self.state = st
        return changed


class LiveHub:
    """One per store and server process: polls the run list and every followed run in one thread.

    Example:
        >>> hub = LiveHub.for_store("store")
        >>> feed = hub.subscribe("run-…")   # sessions then read feed.state
        >>> hub.unsubscribe(feed)
    """

    _hubs: dict[str, LiveHub] = {}
    _lock = threading.Lock()

    def __init__(self, store: Store) -> None:
        self.store = store
        self.feeds: dict[str, RunFeed] = {}
        self.runs: pd.DataFrame = pd.DataFrame(columns=["run_id", "name", "status", "created_at"])
        self.runs_version = 0
        self.sessions = 0
        self._runs_stamp: Any = None
        self._runs_checked = 0.0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="revacnn-live-hub")
        self._thread.start()

    @classmethod
    def for_store(cls, store: Store | str | os.PathLike[str]) -> LiveHub:
        """The hub of ``store`` in this process (created on first use)."""
        st = store if isinstance(store, Store) else open_store(store)
        key = str(st.root)
        with cls._lock:
            hub = cls._hubs.get(key)
            if hub is None:
                hub = cls._hubs[key] = cls(st)
            return hub

    # ------------------------------------------------------------------ subscriptions
    def subscribe(self, run_id: str) -> RunFeed:
        """Follow ``run_id`` (shared with every other session following it)."""
        with self._lock:
            feed = self.feeds.get(run_id)
            if feed is None:
                feed = self.feeds[run_id] = RunFeed(self.store, run_id)
            feed.subscribers += 1
        self._wake.set()  # the hub thread loads its first state now (reads stay off the event loop)
        return feed

    def unsubscribe(self, feed: RunFeed) -> None:
        """Stop following (the feed is dropped when its last session leaves)."""
        with self._lock:
            feed.subscribers -= 1
            if feed.subscribers <= 0 and self.feeds.get(feed.run_id) is feed:
                del self.feeds[feed.run_id]

    def add_session(self) -> None:
        with self._lock:
            self.sessions += 1
        if self.runs_version == 0:
            self.poll_runs(force=True)  # the first session needs the run list at once
        self._wake.set()

    def remove_session(self) -> None:
        with self._lock:
            self.sessions = max(0, self.sessions - 1)

    # ------------------------------------------------------------------ polling
    def poll_runs(self, *, force: bool = False) -> bool:
        """Re-read the run list when a run appeared or a status file changed."""
        stamp = self.store.runs_stamp()
        now = time.monotonic()
        if not force and stamp == self._runs_stamp and now - self._runs_checked < 5.0:
            return False
        self._runs_stamp = stamp
        self._runs_checked = now
        try:
            runs = self.store.runs()
        except Exception as exc:  # noqa: BLE001
            log.debug("run list failed: %s", exc)
            return False
        cols = ["run_id", "name", "status", "created_at", "parent_run_id", "fork_epoch"]
        runs = runs[cols].reset_index(drop=True)
        if not runs.equals(self.runs):
            self.runs = runs
            self.runs_version += 1
            return True
        return False

    def heat(self, feed: RunFeed) -> None:
        """Poll ``feed`` fast for a while: a steering command was just sent."""
        feed.hot_until = time.monotonic() + HOT_S
        self._wake.set()

    def _loop(self) -> None:
        last_runs = 0.0
        period = FEED_POLL_S
        while True:
            self._wake.wait(period)
            self._wake.clear()
            with self._lock:
                feeds = list(self.feeds.values())
                sessions = self.sessions
            now = time.monotonic()
            period = FEED_POLL_HOT_S if any(f.hot_until > now for f in feeds) else FEED_POLL_S
            for feed in feeds:
                try:
                    feed.poll()
                except Exception:  # noqa: BLE001
                    log.exception("live feed poll failed")
            if sessions and time.monotonic() - last_runs >= RUNS_POLL_S:
                last_runs = time.monotonic()
                try:
                    self.poll_runs()
                except Exception:  # noqa: BLE001
                    log.exception("run list poll failed")


# ====================================================================== pictures
def pca_2d(kernel: np.ndarray) -> np.ndarray:
    """A 2-D PCA of flattened filters ``(F, …)`` -> ``(F, 2)`` (the live fallback embedding).

    Example:
        >>> pca_2d(np.random.randn(16, 5, 5, 3)).shape
        (16, 2)
    """
    x = np.asarray(kernel, np.float64).reshape(len(kernel), -1)
    if len(x) < 2:
        return np.zeros((len(x), 2))
    x = x - x.mean(axis=0)
    try:
        u, s, _ = np.linalg.svd(x, full_matrices=False)
    except np.linalg.LinAlgError:
        return np.zeros((len(x), 2))
    out = u[:, :2] * s[:2]
    if out.shape[1] < 2:
        out = np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    # a stable orientation: the largest coordinate of each axis is positive
    signs = np.sign(out[np.abs(out).argmax(axis=0), [0, 1]])
    return out * np.where(signs == 0, 1, signs)


# ====================================================================== views
def run_now(fn: Any) -> None:
    """Run ``fn`` at once (the default of `EmbeddingView.run_locked` outside a server)."""
    fn()


FROZEN_COLOR = "#1f6feb"
SELECT_COLOR = "#f28e2b"


_SINGLE_SELECT_JS = "data.selected && data.selected === `${L.name}:${L.uids[i]}`"
_MULTI_SELECT_JS = ("(data.selected_set ? data.selected_set.includes(`${L.name}:${L.uids[i]}`) : ("
                    + _SINGLE_SELECT_JS + "))")

try:  # the shared view's canvas, taught to highlight several selected tiles
    from .views.network import _DRAW as _NETWORK_DRAW
except ImportError:  # pragma: no cover - the shared view changed: one highlighted tile
    _NETWORK_DRAW = ""
MULTI_SELECT = _SINGLE_SELECT_JS in _NETWORK_DRAW
_PUBLIC: dict[tuple[type, str | None], type] = {}


def public_canvas(canvas: Any, *, draw: str | None = None) -> Any:
    """``canvas`` re-created from a subclass whose name does not start with ``_``.

    Bokeh does not register model classes whose names start with an underscore, so a browser
    cannot resolve a custom component called ``_Something`` ("could not resolve type"). The shared
    views' canvases are such classes; this gives them a public name (and, optionally, new drawing
    code) without touching the shared module.

    Example:
        >>> view._canvas = public_canvas(view._canvas, draw=new_js)
    """
    cls = type(canvas)
    if not cls.__name__.startswith("_") and draw is None:
        return canvas
    key = (cls, draw)
    sub = _PUBLIC.get(key)
    if sub is None:
        body: dict[str, Any] = {"__module__": __name__}
        if draw is not None:
            body["_draw"] = draw
        sub = type(f"Live{cls.__name__.lstrip('_')}{'Multi' if draw else ''}", (cls,), body)
        _PUBLIC[key] = sub
    return sub(sizing_mode=canvas.sizing_mode, css_classes=list(canvas.css_classes), data=dict(canvas.data))


def network_frame(rec: LiveRecord, probe_images: np.ndarray | None, probe_labels: np.ndarray | None,
                  class_names: Sequence[str], *, run_id: str,
                  previous_uids: Mapping[str, Sequence[int]] | None = None) -> NetworkFrame:
    """The shared network view's `NetworkFrame` from a `LiveRecord` (live snapshot or epoch record).

    Filters whose uid is not in ``previous_uids`` (the last epoch record) are marked as added, and
    uids that disappeared since as deleted.

    Example:
        >>> frame = network_frame(feed.state.current, *store.probes(sid), names, run_id=run_id)
        >>> NetworkView(frame=frame)
    """
    layers = []
    for i, name in enumerate(rec.conv_layers):
        uids = np.asarray(rec.uids.get(name, []), np.int64)
        acts = rec.activations.get(name)
        n = len(uids) if len(uids) else (acts.shape[1] if acts is not None else 0)
        if len(uids) != n:
            uids = np.arange(n, dtype=np.int64)
        if acts is not None:
            acts = np.asarray(acts, np.float32)
            if acts.shape[1] != n:
                acts = None
        layer_frozen = name in rec.frozen_layers
        frozen = np.ones(n, bool) if layer_frozen else np.isin(np.arange(n), rec.frozen_filters.get(name, []))
        measures = {k: np.asarray(v, np.float64) for k, v in rec.measures.get(name, {}).items() if len(v) == n}
        if "act_mean" not in measures and acts is not None:
            measures["act_mean"] = acts.mean(axis=(0, 2, 3)).astype(np.float64)
        added, deleted = None, []
        if previous_uids is not None and name in previous_uids:
            before = np.asarray(previous_uids[name], np.int64)
            added = ~np.isin(uids, before)
            deleted = [int(u) for u in before if u not in set(uids.tolist())]
        emb = rec.embedding.get(name)
        layers.append(LayerFrame(
            name=name, uids=uids, frozen=frozen, activations=acts, kernel=rec.kernels.get(name),
            measures=measures, embedding=emb if emb is not None and len(emb) == n else None,
            layer_frozen=layer_frozen, added=added, deleted=deleted, index=i,
        ))
    if rec.source == "live":
        label = f"live · epoch {rec.epoch} · batch {rec.batch}/{rec.n_batches or '?'}"
    else:
        label = f"epoch {rec.epoch} (recorded)"
    images = np.zeros((0, 1, 1, 3), np.uint8) if probe_images is None else np.asarray(probe_images)
    labels = np.zeros(0, np.int64) if probe_labels is None else np.asarray(probe_labels)
    probs = None if rec.probabilities is None else np.asarray(rec.probabilities, np.float32)
    if probs is not None and len(probs) != len(images):
        probs = None
    return NetworkFrame(
        layers=layers, probabilities=probs, probe_images=images, probe_labels=labels,
        class_names=list(class_names), epoch=rec.epoch, run_id=run_id, source_run_id=run_id, label=label,
        metrics={"lr": rec.lr}, key=(*rec.key, tuple(rec.frozen_layers),
                                     tuple(sorted((k, tuple(v)) for k, v in rec.frozen_filters.items()))),
    )


class LiveNetworkView(SharedNetworkView):
    """The shared network view (`revacnn.ui.views.network.NetworkView`) for the live app.

    A click on a tile calls ``on_tile(layer, uid)`` (every click, also on the same tile again, so
    that it can toggle); every filter in `selection` is highlighted.

    Example:
        >>> view = LiveNetworkView(on_tile=lambda layer, uid: print(layer, uid))
        >>> view.selection = ["conv2:3", "conv2:5"]
    """

    selection = param.List(default=[], item_type=str, doc="'layer:uid' of every selected filter")

    def __init__(self, *, on_tile: Any = None, **params: Any) -> None:
        super().__init__(**params)
        self.on_tile = on_tile
        draw = _NETWORK_DRAW.replace(_SINGLE_SELECT_JS, _MULTI_SELECT_JS) if MULTI_SELECT else None
        self._canvas = public_canvas(self._canvas, draw=draw)
        self._canvas.param.watch(self._tile_clicked, "clicked")
        self.param.watch(self._refresh, ["selection"])
        self._refresh()

    def _tile_clicked(self, _event: Any) -> None:
        value = self._canvas.clicked_value
        if ":" not in value or self.on_tile is None:
            return
        layer, uid = value.rsplit(":", 1)
        try:
            self.on_tile(layer, int(uid))
        except ValueError:
            return

    def render_data(self) -> dict[str, Any]:
        out = super().render_data()
        out["selected_set"] = list(self.selection)
        if self.selection:
            out["selected"] = self.selection[-1]
        return out


class LiveNetwork(pn.viewable.Viewer):
    """The live network view with its probe and measure pickers.

    Example:
        >>> net = LiveNetwork(on_tile=lambda layer, uid: print(layer, uid))
        >>> net.update(rec, network_frame(rec, images, labels, names, run_id=run_id))
    """

    def __init__(self, on_tile: Any, **params: Any) -> None:
        super().__init__(**params)
        self.view = LiveNetworkView(on_tile=on_tile, measure="act_mean",
                                    empty_message="Waiting for the first snapshot of the run…")
        self.probe_select = pn.widgets.Select(label="Probe image", options={"probe 0": 0}, width=220)
        self.measure_select = pn.widgets.Select(label="Bars", options={MEASURE_LABELS[m]: m for m in MEASURES},
                                                value="act_mean", width=220)
        self.probe_select.param.watch(lambda e: setattr(self.view, "probe", int(e.new)), "value")
        self.measure_select.param.watch(lambda e: setattr(self.view, "measure", e.new), "value")
        self.caption = pn.pane.HTML("", margin=(22, 5, 0, 5), css_classes=["rv-network-caption"])
        self._layout = pn.Column(
            pn.Row(self.probe_select, self.measure_select, self.caption, sizing_mode="stretch_width"),
            pn.pane.HTML("<div style='font-size:11.5px;color:#666'>Click tiles to select filters for "
                         "steering (click again to unselect).</div>", margin=(0, 5)),
            self.view, sizing_mode="stretch_width",
        )
        self._probes_set = False
        self.rec: LiveRecord | None = None

    def set_probes(self, images: np.ndarray | None, labels: np.ndarray | None, names: Sequence[str]) -> None:
        if images is None or self._probes_set:
            return
        self._probes_set = True
        opts = {}
        for i in range(len(images)):
            lab = int(labels[i]) if labels is not None and i < len(labels) else None
            cname = names[lab] if lab is not None and lab < len(names) else ("" if lab is None else str(lab))
            opts[f"probe {i}: {cname}"] = i
        self.probe_select.options = opts or {"probe 0": 0}

    def update(self, rec: LiveRecord, frame: NetworkFrame) -> None:
        """Draw ``frame`` (built from ``rec``)."""
        self.rec = rec
        self.view.frame = frame
        where = (f"live: epoch {rec.epoch}, batch {rec.batch}/{rec.n_batches or '?'}" if rec.source == "live"
                 else f"epoch record {rec.epoch}")
        self.caption.object = f"<span style='font-size:12px;color:#555'>{html.escape(where)}</span>"

    def set_selection(self, layer: str | None, indices: Sequence[int]) -> None:
        rec = self.rec
        sel: list[str] = []
        if rec is not None and layer:
            uids = rec.uids.get(layer, [])
            sel = [f"{layer}:{uids[i]}" for i in sorted(indices) if i < len(uids)]
        if sel != self.view.selection:
            self.view.selection = sel

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout

class EmbeddingView(pn.viewable.Viewer):
    """The embedding view of one conv layer: t-SNE of the last epoch record, or a live PCA.

    Lasso, box or tap points to select filters. Filters added since the last record sit at the
    centre until the next record places them.

    Example:
        >>> emb = EmbeddingView(on_select=lambda layer, indices: print(layer, indices), layer="conv1")
        >>> emb.update(feed.state.current, feed.state.record)
    """

    layer = param.String(default=None, allow_None=True)
    mode = param.Selector(default="t-SNE (last epoch)", objects=["t-SNE (last epoch)", "PCA (live)"])

    def __init__(self, on_select: Any, *, run_locked: Any = run_now, **params: Any) -> None:
        super().__init__(**params)
        self.on_select = on_select
        self.run_locked = run_locked  # how to change Bokeh models from a widget's callback
        self._syncing = False
        self.source = ColumnDataSource({"x": [], "y": [], "index": [], "uid": [], "color": [], "label": []})
        fig = figure(height=300, sizing_mode="stretch_width", tools="lasso_select,box_select,tap,reset",
                     toolbar_location="above", min_border=5)
        fig.axis.visible = False
        fig.grid.visible = False
        r = fig.scatter(x="x", y="y", source=self.source, size=11, fill_color="color", line_color="#333")
        r.selection_glyph = r.glyph.clone(line_color=SELECT_COLOR, line_width=3)
        r.nonselection_glyph = r.glyph.clone(fill_alpha=0.5)
        fig.text(x="x", y="y", text="label", source=self.source, text_font_size="9px", x_offset=7,
                 y_offset=-3, text_color="#444")
        fig.add_tools(HoverTool(renderers=[r], tooltips=[("filter", "@index"), ("uid", "@uid")]))
        self.source.selected.on_change("indices", self._selected)
        self.figure = fig
        self.title = pn.pane.HTML("", margin=(0, 5))
        self.mode_select = pn.widgets.RadioButtonGroup(options=list(self.param.mode.objects),
                                                       value=self.mode, color="light")
        self.mode_select.param.watch(lambda e: setattr(self, "mode", e.new), "value")
        self._layout = pn.Column(pn.Row(self.title, self.mode_select), pn.pane.Bokeh(fig, sizing_mode="stretch_width"),
                                 sizing_mode="stretch_width", css_classes=["rv-embedding"])
        self._rec: LiveRecord | None = None
        self._recorded: LiveRecord | None = None
        self.param.watch(lambda _e: self.run_locked(self._redraw), ["layer", "mode"])

    def _selected(self, attr: str, old: list[int], new: list[int]) -> None:
        if not self._syncing and self.layer:
            self.on_select(self.layer, list(new))

    def set_selection(self, layer: str | None, indices: Sequence[int]) -> None:
        idx = sorted(int(i) for i in indices) if layer == self.layer else []
        n = len(self.source.data["x"])
        idx = [i for i in idx if i < n]
        if list(self.source.selected.indices) != idx:
            self._syncing = True
            try:
                self.source.selected.indices = idx
            finally:
                self._syncing = False

    def update(self, current: LiveRecord, recorded: LiveRecord | None) -> None:
        self._rec, self._recorded = current, recorded
        self._redraw()

    def _redraw(self) -> None:
        rec, recorded, layer = self._rec, self._recorded, self.layer
        if rec is None or not layer or layer not in rec.kernels:
            self.title.object = "<i>Select a conv layer.</i>" if rec is not None else ""
            self.source.data = {k: [] for k in self.source.data}
            return
        kernel = rec.kernels[layer]
        uids = rec.uids.get(layer, list(range(len(kernel))))
        pos = None
        how = "PCA of the current filters (live)"
        if self.mode.startswith("t-SNE") and recorded is not None and layer in recorded.embedding:
            emb = np.asarray(recorded.embedding[layer], np.float64)
            by_uid = {int(u): emb[i] for i, u in enumerate(recorded.uids.get(layer, [])) if i < len(emb)}
            if by_uid and np.isfinite(np.array(list(by_uid.values()))).all():
                centre = np.mean(list(by_uid.values()), axis=0)
                pos = np.array([by_uid.get(int(u), centre) for u in uids])
                added = sum(int(u) not in by_uid for u in uids)
                how = f"t-SNE of epoch {recorded.epoch}" + (f" ({added} new filters at the centre)" if added else "")
        if pos is None:
            pos = pca_2d(kernel)
        frozen = set(rec.frozen_filters.get(layer, []))
        all_frozen = layer in rec.frozen_layers
        colors = [FROZEN_COLOR if all_frozen or i in frozen else "#bbbbbb" for i in range(len(kernel))]
        if kernel.shape[-1] == 3:  # conv1: colour each filter by its dominant input channel
            share = np.abs(kernel).sum(axis=(1, 2))
            dom = share.argmax(axis=-1)
            pal = ["#d62728", "#2ca02c", "#1f77b4"]
            colors = [FROZEN_COLOR if c == FROZEN_COLOR else pal[int(d)] for c, d in zip(colors, dom, strict=False)]
        self.source.data = {"x": pos[:, 0].tolist(), "y": pos[:, 1].tolist(), "index": list(range(len(kernel))),
                            "uid": [int(u) for u in uids[: len(kernel)]], "color": colors,
                            "label": [str(i) for i in range(len(kernel))]}
        self.title.object = (f"<div style='font-size:13px'><b>{html.escape(layer)}</b> embedding: "
                             f"{html.escape(how)}</div>")

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout


EVENT_COLORS = {"applied": "#2ca02c", "rejected": "#d62728"}


def event_x(epoch: int, batch: int, n_batches: int | None) -> float:
    """Where an event at (epoch, batch) sits on the fractional-epoch axis.

    Example:
        >>> event_x(3, 5, 10)
        2.5
    """
    if not n_batches:
        return float(epoch)
    return float(epoch) - 1.0 + min(max(batch, 0), n_batches) / n_batches


class LiveCurves(pn.viewable.Viewer):
    """Batch-level loss and accuracy from the live snapshot, epoch records as points, events as marks.

    Example:
        >>> curves = LiveCurves()
        >>> curves.update(feed.state)
    """

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.batches = ColumnDataSource({"x": [], "loss": [], "acc": [], "epoch": [], "batch": []})
        self.epochs = ColumnDataSource({"x": [], "loss": [], "acc": [], "val_loss": [], "val_acc": []})
        self.events = ColumnDataSource({"x": [], "color": [], "kind": [], "status": [], "message": []})
        self.figs = []
        for key, val, title in (("loss", "val_loss", "loss"), ("acc", "val_acc", "accuracy")):
            shared = {"x_range": self.figs[0].x_range} if self.figs else {}
            f = figure(height=210, sizing_mode="stretch_width", title=title, tools="pan,wheel_zoom,reset",
                       toolbar_location="right", **shared)
            f.vspan(x="x", source=self.events, line_color="color", line_width=2, line_alpha=0.7)
            f.line(x="x", y=key, source=self.batches, color="#1f77b4", legend_label="train (batches)")
            f.scatter(x="x", y=key, source=self.epochs, color="#1f77b4", size=7, legend_label="train (epoch)")
            f.scatter(x="x", y=val, source=self.epochs, color="#ff7f0e", size=7, marker="square",
                      legend_label="validation")
            f.line(x="x", y=val, source=self.epochs, color="#ff7f0e", line_dash="dashed")
            f.legend.location = "top_right" if key == "loss" else "bottom_right"
            f.legend.label_text_font_size = "9px"
            f.legend.background_fill_alpha = 0.6
            f.xaxis.axis_label = "epoch"
            self.figs.append(f)
        ev_marks = self.figs[0].scatter(x="x", y=0, source=self.events, marker="inverted_triangle", size=0)
        self.figs[0].add_tools(HoverTool(renderers=[ev_marks], tooltips=[("event", "@kind"), ("", "@status: @message")]))
        self._layout = pn.Column(*[pn.pane.Bokeh(f, sizing_mode="stretch_width") for f in self.figs],
                                 sizing_mode="stretch_width", css_classes=["rv-curves"])
        self._n_batches: int | None = None
        self._rows: np.ndarray | None = None
        self._metrics_key: Any = None
        self._events_key: Any = None

    def update(self, st: FeedState) -> None:
        b = np.asarray(st.batches)
        nb = st.live.n_batches if st.live is not None else None
        if nb is None and len(st.metrics) and "n_batches" in st.metrics:
            vals = st.metrics["n_batches"].dropna()
            vals = vals[vals > 0]
            nb = int(vals.iloc[-1]) if len(vals) else None
        self._n_batches = nb
        if len(b) and nb:
            rows = self._rows
            if rows is not None and len(rows) and len(b) > len(rows) and np.array_equal(b[: len(rows)], rows):
                new = b[len(rows):]  # stream what is new: the history only grows within a run
                self.batches.stream(self._batch_columns(new, nb))
            elif rows is None or not np.array_equal(b, rows):
                self.batches.data = self._batch_columns(b, nb)
            self._rows = b
        m = st.metrics
        key = (len(m), tuple(m.iloc[-1].astype(str)) if len(m) else ())
        if len(m) and key != self._metrics_key:
            self._metrics_key = key

            def col(name: str) -> list[float]:
                return [float("nan") if v is None or pd.isna(v) else float(v) for v in m.get(name, [None] * len(m))]

            self.epochs.data = {"x": [float(e) for e in m["epoch"]], "loss": col("loss"), "acc": col("accuracy"),
                                "val_loss": col("val_loss"), "val_acc": col("val_accuracy")}
        self.update_events(st.events)

    @staticmethod
    def _batch_columns(b: np.ndarray, nb: int) -> dict[str, list[Any]]:
        return {"x": (b[:, 0] - 1 + b[:, 1] / nb).tolist(), "loss": b[:, 2].tolist(), "acc": b[:, 3].tolist(),
                "epoch": b[:, 0].astype(int).tolist(), "batch": b[:, 1].astype(int).tolist()}

    def reset(self) -> None:
        """Forget the previous run's curves (another run was attached)."""
        for src in (self.batches, self.epochs, self.events):
            src.data = {k: [] for k in src.data}
        self._rows = None
        self._metrics_key = None
        self._events_key = None

    def update_events(self, events: pd.DataFrame) -> None:
        key = ((0, None) if events is None or not len(events) else (len(events), events["event_id"].iloc[-1]),
               self._n_batches)
        if key == self._events_key:
            return
        self._events_key = key
        if events is None or not len(events):
            self.events.data = {k: [] for k in self.events.data}
            return
        ev = events.dropna(subset=["epoch"])
        self.events.data = {
            "x": [event_x(int(e), int(b) if not pd.isna(b) else 0, self._n_batches)
                  for e, b in zip(ev["epoch"], ev["batch"], strict=False)],
            "color": [EVENT_COLORS.get(s, "#999") for s in ev["status"]],
            "kind": ev["kind"].astype(str).tolist(), "status": ev["status"].astype(str).tolist(),
            "message": ev["message"].astype(str).tolist(),
        }

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout


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


class LiveApp(pn.viewable.Viewer):
    """The live app for one browser session: attach to (or start) a run, watch it, steer it.

    Example:
        >>> app = LiveApp(store_path="store", run_id="run-…")
        >>> app.refresh()          # what the periodic callback does
        >>> app.steering.send("freeze", ["conv1"])
    """

    run_id = param.String(default=None, allow_None=True)
    store_path = param.String()
    allow_steering = param.Boolean(default=True)
    replay_url = param.String(default="replay", allow_None=True,
                              doc="path of the replay app on this server (None: not served)")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.store = open_store(self.store_path)
        self.hub = LiveHub.for_store(self.store)
        self.feed: RunFeed | None = None
        self._seen: dict[str, Any] = {}
        self._heavy_pending = False
        self._runs_v = -1
        self._closed = False
        allowed, why = steering_permission(self.allow_steering)
        self.allowed, self.deny_reason = allowed, why

        self.run_select = pn.widgets.Select(label="Run", options={}, sizing_mode="stretch_width",
                                            css_classes=["rv-run-select"])
        self.run_select.param.watch(self._picked, "value")
        self.start_form = StartRunForm(store_path=str(self.store.root), enabled=allowed)
        self.fork_form = ForkForm(store_path=str(self.store.root), enabled=allowed)
        self.steering = SteeringControls(sender=self._send, fork_form=self.fork_form, allowed=allowed,
                                         deny_reason=why)
        self._store_sender = store_sender(self.store, lambda: self.run_id)
        self.steering.param.watch(self._selection_changed, ["layer", "selected"])
        self.network = LiveNetwork(on_tile=self._tile_toggle)
        self._doc = pn.state.curdoc if getattr(pn.state.curdoc, "session_context", None) is not None else None
        self.embedding = EmbeddingView(on_select=self._tile_select, run_locked=self.run_locked)
        self.curves = LiveCurves()
        self.event_log = EventLog(empty_message="No steering events yet.")
        self.status_line = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["rv-status"])
        self.progress = pn.indicators.Progress(value=0, max=1, bar_color="primary", sizing_mode="stretch_width",
                                               height=14, css_classes=["rv-progress-bar"])
        self.banner = pn.pane.Alert("", alert_type="success", visible=False, css_classes=["rv-run-ended"])
        self.error = pn.pane.Alert("", alert_type="warning", visible=False)
        self.auth_notice = pn.pane.Alert(why, alert_type="danger", visible=not allowed,
                                         css_classes=["rv-auth-notice"])
        start_card = lazy_card(self.start_form, title="Start a new run", css_classes=["rv-start-card"])
        sidebar = pn.Column(
            pn.pane.HTML("<h2 style='margin:4px 0'>revacnn · live</h2>"),
            self.run_select, start_card, pn.layout.Divider(),
            pn.pane.HTML("<h3 style='margin:2px 0'>Steering</h3>"), self.steering,
            width=360, css_classes=["rv-sidebar"],
        )
        self.tabs = pn.Tabs(("Network", self.network), ("Embedding", self.embedding), dynamic=False,
                            sizing_mode="stretch_width")
        self.tabs.param.watch(lambda _e: self.run_locked(self._redraw_current), "active")
        main = pn.Column(
            self.auth_notice, self.status_line, self.progress, self.banner, self.error,
            self.tabs,
            pn.Row(pn.Column(pn.pane.HTML("<h3 style='margin:2px 0'>Loss and accuracy</h3>"), self.curves,
                             sizing_mode="stretch_width"),
                   pn.Column(pn.pane.HTML("<h3 style='margin:2px 0'>Events</h3>"), self.event_log,
                             sizing_mode="stretch_width"),
                   sizing_mode="stretch_width"),
            sizing_mode="stretch_width", margin=(0, 10),
        )
        self._layout = pn.Row(sidebar, main, sizing_mode="stretch_width", css_classes=["rv-live"],
                              stylesheets=[css_vars().replace(":root", ":host")])
        self.hub.add_session()
        self._update_runs(force=True)
        if self.run_id:
            self._attach(self.run_id)
        elif len(self.hub.runs):
            self._attach(self.default_run(self.hub.runs))
        self.refresh()

    @staticmethod
    def default_run(runs: pd.DataFrame) -> str:
        """The run a new session attaches to: the newest running one, else the newest one."""
        running = runs[runs["status"] == "running"]
        pick = running if len(running) else runs
        return str(pick.sort_values("created_at", kind="stable")["run_id"].iloc[-1])

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the periodic refresh in the current server session."""
        pn.state.add_periodic_callback(self.refresh, period=SESSION_TICK_MS)
        try:
            pn.state.on_session_destroyed(lambda _ctx: self.close())
        except Exception:  # noqa: BLE001 - not in a server session
            pass

    def close(self) -> None:
        """Leave the hub (the session ended)."""
        if self._closed:
            return
        self._closed = True
        if self.feed is not None:
            self.hub.unsubscribe(self.feed)
            self.feed = None
        self.hub.remove_session()

    # ------------------------------------------------------------------ attaching
    def _update_runs(self, *, force: bool = False) -> None:
        if not force and self.hub.runs_version == self._runs_v:
            return
        self._runs_v = self.hub.runs_version
        runs = self.hub.runs
        if not len(runs):
            self.run_select.options = {}
            return
        order = runs.assign(_live=(runs["status"] != "running")).sort_values(
            ["_live", "created_at"], ascending=[True, False])
        opts = {}
        for r in order.to_dict("records"):
            label = f"{r['name'] or r['run_id']} · {r['status']}"
            if r.get("parent_run_id") is not None and not pd.isna(r.get("parent_run_id")):
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
        """Run ``fn``, which changes Bokeh models, where that is safe.

        Panel runs a widget's callbacks without the Bokeh document lock, and changing a raw Bokeh
        model there can fail ("_pending_writes should be non-None …"); in a server session such
        changes go to the next tick of the document's loop, which holds the lock.
        """
        doc = self._doc
        if doc is not None and getattr(doc, "session_context", None) is not None:
            doc.add_next_tick_callback(fn)
        else:
            fn()

    def _redraw_current(self) -> None:
        if self.feed is not None:
            self._redraw(self.feed.state)

    def _attach(self, run_id: str) -> None:
        if self.feed is not None and self.feed.run_id == run_id:
            return
        try:
            self.store.run(run_id)
        except Exception as exc:  # noqa: BLE001
            self.error.object = html.escape(str(exc))
            self.error.visible = True
            return
        if self.feed is not None:
            self.hub.unsubscribe(self.feed)
            self.curves.reset()
            self.event_log.events = None
            self.network.view.frame = None
            self.network.rec = None
            self.banner.visible = False
        self.run_id = run_id
        self.feed = self.hub.subscribe(run_id)
        self._seen = {}
        self._heavy_pending = False
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
        cid = self._store_sender(op, words)
        if self.feed is not None:
            self.hub.heat(self.feed)
        return cid

    # ------------------------------------------------------------------ selection
    def _tile_select(self, layer: str, indices: list[int]) -> None:
        self.steering.select(layer, indices)

    def _tile_toggle(self, layer: str, uid: int) -> None:
        """A click on a filter tile: add it to the selection of its layer, or remove it."""
        rec = self.network.rec
        uids = rec.uids.get(layer, []) if rec is not None else []
        if uid not in uids:
            return
        i = uids.index(uid)
        current = set(self.steering.selected) if self.steering.layer == layer else set()
        current ^= {i}
        self.steering.select(layer, sorted(current))

    def _selection_changed(self, *_: Any) -> None:
        self.network.set_selection(self.steering.layer, self.steering.selected)
        self.run_locked(self._embedding_selection)

    def _embedding_selection(self) -> None:
        if self.embedding.layer != self.steering.layer:
            rec = self.network.rec
            conv = rec.conv_layers if rec is not None else []
            self.embedding.layer = self.steering.layer if self.steering.layer in conv else self.embedding.layer
        self.embedding.set_selection(self.steering.layer, self.steering.selected)

    # ------------------------------------------------------------------ refresh
    def refresh(self) -> None:
        """Bring every view up to the hub's state (cheap when nothing changed)."""
        for form in (self.start_form, self.fork_form):
            rid = form.poll()
            if rid:
                self.hub.poll_runs(force=True)
                self._attach(rid)
        self._update_runs()
        feed = self.feed
        if feed is None:
            self.status_line.object = ("<div style='font-size:14px'>No run attached: pick a running run "
                                       "above, or start one.</div>")
            return
        st = feed.state
        seen = self._seen
        if st.version == seen.get("version") and not self._heavy_pending:
            self.steering.resolve(st.events)
            self._update_status(st)
            return
        seen["version"] = st.version
        light = False
        # light work first, so that what a click waits for reaches the browser before big redraws
        if st.status_v != seen.get("status_v"):
            seen["status_v"] = st.status_v
            self._update_banner(st)
            self._heavy_pending = True  # an ended run shows its last record
            light = True
        if st.events_v != seen.get("events_v"):
            seen["events_v"] = st.events_v
            self.event_log.events = st.events
            self.curves.update_events(st.events)
            self._heavy_pending = True  # the frozen overlay may change the network view
            light = True
        if light or st.epochs_v != seen.get("epochs_v") or st.snap_v != seen.get("snap_v"):
            cur, paused, lr = self.effective(st)
            self._push_state(st, cur, paused, lr)
        self.steering.resolve(st.events)
        self._update_status(st)
        if st.epochs_v != seen.get("epochs_v"):
            seen["epochs_v"] = st.epochs_v
            self.fork_form.epochs_available = list(st.epochs)
            if st.probes is not None:
                self.network.set_probes(st.probes[0], st.probes[1], st.class_names)
            self.curves.update(st)
            self._heavy_pending = True
            light = True
        if st.snap_v != seen.get("snap_v"):
            seen["snap_v"] = st.snap_v
            self._heavy_pending = True
        if st.error:
            self.error.object = f"Reading the run failed (retrying): {html.escape(st.error)}"
            self.error.visible = True
        else:
            self.error.visible = False
        if self._heavy_pending and not light:
            self._heavy_pending = False
            self._redraw(st)

    def _redraw(self, st: FeedState) -> None:
        """The heavy part of a refresh: network and embedding views, batch curves."""
        seen = self._seen
        cur, _paused, _lr = self.effective(st)
        if cur is not None:
            key = (cur.key, tuple(cur.frozen_layers))
            self.network.rec = cur  # tile clicks and selections map uids with the newest state
            if self.tabs.active == 0 and key != seen.get("network"):  # only the visible tab redraws
                seen["network"] = key
                prev = st.record.uids if st.record is not None and cur.source == "live" else st.previous_uids
                probes = st.probes or (None, None)
                self.network.update(cur, network_frame(cur, probes[0], probes[1], st.class_names,
                                                       run_id=st.run_id, previous_uids=prev))
                self.network.set_selection(self.steering.layer, self.steering.selected)
            if self.embedding.layer is None and cur.conv_layers:
                self.embedding.layer = (self.steering.layer if self.steering.layer in cur.conv_layers
                                        else cur.conv_layers[0])
            if self.tabs.active == 1 and (key, st.record.key if st.record else None) != seen.get("embedding"):
                seen["embedding"] = (key, st.record.key if st.record else None)
                self.embedding.update(cur, st.record)
                self.embedding.set_selection(self.steering.layer, self.steering.selected)
        if seen.get("curves_snap") != st.snap_v:
            seen["curves_snap"] = st.snap_v
            self.curves.update(st)

    @staticmethod
    def effective(st: FeedState) -> tuple[LiveRecord | None, bool, float | None]:
        """The state to show: the newest record, plus what events applied since it was taken changed.

        Layer (un)freezing, pause/resume and learning-rate changes show as soon as their event
        appears, before the next snapshot confirms them.

        Returns:
            ``(record, paused, lr)``.
        """
        cur = st.current
        if cur is None:
            return None, False, None
        frozen_layers = list(cur.frozen_layers)
        paused, lr = cur.paused, cur.lr
        if len(st.events):
            applied = st.events[st.events["status"] == "applied"]
            for r in applied.to_dict("records"):
                at = r.get("at")
                if at is None or pd.isna(at) or pd.Timestamp(at).timestamp() <= cur.at:
                    continue
                a = event_args(r)
                if r["kind"] == "freeze" and a.get("layer") not in frozen_layers:
                    frozen_layers.append(a.get("layer"))
                elif r["kind"] == "unfreeze" and a.get("layer") in frozen_layers:
                    frozen_layers.remove(a.get("layer"))
                elif r["kind"] == "pause":
                    paused = True
                elif r["kind"] == "resume":
                    paused = False
                elif r["kind"] == "set-lr" and isinstance(a.get("lr"), (int, float)):
                    lr = float(a["lr"])
        if frozen_layers != cur.frozen_layers:
            cur = replace(cur, frozen_layers=frozen_layers)
        return cur, paused, lr

    def _push_state(self, st: FeedState, cur: LiveRecord | None, paused: bool, lr: float | None) -> None:
        if cur is None:
            self.steering.update_state(run_id=st.run_id, status=st.status, layers={}, conv_layers=[],
                                       frozen_layers=[], frozen_filters={})
            return
        self.steering.update_state(
            run_id=st.run_id, status=st.status, layers=cur.n_filters, conv_layers=cur.conv_layers,
            frozen_layers=cur.frozen_layers, frozen_filters=cur.frozen_filters, paused=paused, lr=lr,
        )
        self.fork_form.layers = list(cur.conv_layers) + [n for n in cur.n_filters if n not in cur.conv_layers]

    def _update_status(self, st: FeedState) -> None:
        cur = st.current
        live = st.live
        total = st.config.get("epochs", "?")
        status = st.status
        if live is not None and live.paused and status == "running":
            status = "paused"
        colors = {"running": "#2ca02c", "paused": "#e3a008", "finished": "#1f6feb", "stopped": "#6e7781",
                  "interrupted": "#d62728", "failed": "#d62728"}
        badge = (f"<span class='rv-run-status' data-status='{status}' style='background:{colors.get(status, '#999')};"
                 f"color:white;border-radius:8px;padding:1px 8px'>{status}</span>")
        parts = [f"<b>{html.escape(st.name or st.run_id)}</b> {badge}"]
        if live is not None and status in ("running", "paused"):
            age = time.time() - live.at
            parts.append(
                f"<span class='rv-progress-text' data-epoch='{live.epoch}' data-batch='{live.batch}'>"
                f"epoch {live.epoch}/{total} · batch {live.batch}/{live.n_batches or '?'}</span>"
            )
            parts.append(f"<span style='color:#666'>snapshot {age:.0f} s ago</span>")
        if cur is not None and cur.lr is not None:
            parts.append(f"lr {cur.lr:g}")
        if st.epochs:
            m = st.metrics.iloc[-1]
            parts.append(
                f"<span class='rv-last-epoch' data-epoch='{st.epochs[-1]}'>recorded: epoch {st.epochs[-1]} "
                f"(val acc {_fmt(m.get('val_accuracy'))}, val loss {_fmt(m.get('val_loss'))})</span>"
            )
        text = "<div style='font-size:14px'>" + " · ".join(parts) + "</div>"
        if text != self.status_line.object:
            self.status_line.object = text
        if live is not None and live.n_batches:
            try:
                done = (int(live.epoch) - 1) * live.n_batches + int(live.batch or 0)
                n_total = int(total) * live.n_batches
            except (TypeError, ValueError):
                done, n_total = 0, 1
            if status in ("finished",):
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
        return self._layout


def create_live_app(store_path: str, *, allow_steering: bool = True, run_id: str | None = None,
                    replay_url: str | None = "replay") -> pn.viewable.Viewable:
    """Build the live app for the current browser session.

    Args:
        store_path: the store folder.
        allow_steering: False disables every steering control (and says why): pass False when the
            server listens on a non-local address without authentication. With True, a client that
            is neither local nor logged in still cannot steer.
        run_id: the run to attach to (default: the ``?run=`` query argument, else the newest running run).
        replay_url: path of the replay app served beside this one, for "open in replay" (None: none).

    Returns:
        The app's layout; call ``.servable()`` on it.

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
    return app
