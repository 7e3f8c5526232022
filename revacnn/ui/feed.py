"""The read model of a followed run for the live page: live snapshot, epoch records, events, status.

A `RunFeed` is polled by the server's one poller (`revacnn.ui.data.StoreWatcher`) and keeps a
`FeedState` that it replaces whole on every change, so sessions read it without locks. Its frames
are the replay page's: `frame_from_live` for the live snapshot, `ReplayData.frame` for the last
epoch record, and the run's history is `ReplayData.bundle` (metrics, events, fork points).

Between epochs the live frame's embedding is the warm-started t-SNE of the latest snapshot
(`revacnn.analysis.EmbeddingTracker`, continued from the last epoch record's positions by uid),
computed in one worker thread only while a page shows the embedding, so points move as the
filters change and do not jump when an epoch record arrives.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from ..storage import EVENTS_SCHEMA
from ..storage.live import read_live_snapshot
from .data import NetworkFrame, ReplayData, RunBundle, frame_from_live
from .views.network import prerender

log = logging.getLogger("revacnn.ui")

__all__ = ["TERMINAL", "FeedState", "RunFeed"]

#: Statuses of a run whose trainer is gone.
TERMINAL = ("finished", "stopped", "interrupted", "failed")

#: One worker thread for the feeds' side work (live t-SNE, pre-rendered sprites), off the poller.
_WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="revacnn-live-worker")


def _prerender(frame: NetworkFrame) -> None:
    try:
        prerender(frame)
    except Exception:  # noqa: BLE001 - the view renders it itself then
        log.debug("prerender failed", exc_info=True)


@dataclass
class FeedState:
    """Everything the feed knows about one run; replaced whole (never mutated) on every change.

    Attributes:
        version: bumps whenever anything below changes.
        snap_v, events_v, epochs_v, status_v: per-part versions (sessions redraw only what changed).
        live: the last live snapshot as a `NetworkFrame` (``live=True``); ``batches`` its
            batch-level history ``(epoch, batch, loss, accuracy, time)`` rows.
        bundle: the run's history (`RunBundle`: metrics, events, fork points) at the last commit.
        record: the last committed epoch record as a `NetworkFrame`.
        events: the run's own steering events, oldest first (read as each event file appears).

    Example:
        >>> st = StoreWatcher.shared("store").follow(run_id).state
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
    live: NetworkFrame | None = None
    batches: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))
    events: pd.DataFrame = field(default_factory=lambda: EVENTS_SCHEMA.empty_table().to_pandas())
    bundle: RunBundle | None = None
    record: NetworkFrame | None = None
    error: str | None = None
    version: int = 0
    snap_v: int = 0
    events_v: int = 0
    epochs_v: int = 0
    status_v: int = 0

    @property
    def epochs(self) -> list[int]:
        """Committed epochs of the run's full history."""
        return self.bundle.epochs if self.bundle is not None else []

    @property
    def metrics(self) -> pd.DataFrame:
        """Per-epoch rows of the full history (`RunBundle.metrics`)."""
        return self.bundle.metrics if self.bundle is not None else pd.DataFrame()

    @property
    def current(self) -> NetworkFrame | None:
        """The newest of the live snapshot and the last epoch record (the record once the run ended)."""
        a, b = self.live, self.record
        if a is None:
            return b
        if b is None:
            return a
        if self.status in TERMINAL:
            return b  # a snapshot taken after the last record was never recorded: show what was
        if (b.epoch or 0) >= (a.epoch or 0) or b.at >= a.at:
            return b
        return a


class RunFeed:
    """What the server knows about one followed run; `state` is swapped atomically by the poller.

    Example:
        >>> feed = RunFeed(ReplayData.shared("store"), run_id)
        >>> feed.poll()      # the poller thread calls this every StoreWatcher.FEED_POLL_S
        True
        >>> feed.state.live.batch
        12
    """

    def __init__(self, data: ReplayData, run_id: str) -> None:
        self.data = data
        self.run_id = run_id
        self.state = FeedState(run_id=run_id)
        self.subscribers = 0
        self.hot_until = 0.0
        self.want_embedding = 0.0  # monotonic time until which a page shows the embedding
        self.listeners: list[Callable[[], None]] = []
        self._stamps: dict[str, Any] = {}
        self._status_checked = 0.0
        self._event_names: tuple[str, ...] = ()
        self._lock = threading.Lock()
        self._tracker: Any = None
        self._tracked_record: Any = None
        self._embedding_busy = False
        self._embedded_key: Any = None

    # ------------------------------------------------------------------ state changes
    def _bump(self, st: FeedState, **parts: Any) -> FeedState:
        changes = dict(parts)
        for key in ("snap_v", "events_v", "epochs_v", "status_v"):
            if changes.pop(key, False):
                changes[key] = getattr(st, key) + 1
        changes["version"] = st.version + 1
        return replace(st, **changes)

    def _publish(self, st: FeedState) -> None:
        self.state = st
        for fn in list(self.listeners):
            try:
                fn()
            except Exception:  # noqa: BLE001 - a closed session
                log.debug("feed listener failed", exc_info=True)

    def poll(self) -> bool:
        """Check the run's files once and load what changed; True when the state changed."""
        with self._lock:
            return self._poll()

    def _poll(self) -> bool:
        store = self.data.store
        rid = self.run_id
        st = self.state
        changed = False
        try:
            if "meta" not in self._stamps:  # the first poll: metadata
                run = store.run(rid)
                self._run = run
                st = self._bump(st, name=run.name or rid, config=dict(run.config),
                                parent_run_id=run.parent_run_id, fork_epoch=run.fork_epoch, status_v=True)
                self._stamps["meta"] = True
                changed = True
            stamps = store.run_stamp(rid)
            # events first: what a click waits for (one small Parquet file each; read only new ones)
            names = stamps["events"]
            if names != self._event_names:
                known = set(self._event_names)
                ev = store.read_events(rid, [n for n in names if n not in known])
                self._event_names = names
                if len(ev):
                    events = pd.concat([st.events, ev], ignore_index=True) if len(st.events) else ev
                    events = events.sort_values("at", kind="stable").reset_index(drop=True)
                    st = self._bump(st, events=events, events_v=True)
                    changed = True
            # status: its file changes with every heartbeat; re-read on change or every 2 s
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
            if changed:
                self._publish(st)  # before the heavier reads below
            # committed epochs: the epochs table's segment names are the commit markers
            names = stamps["epochs"]
            if names != self._stamps.get("epochs"):
                bundle = self.data.bundle(rid, fresh=True)
                record = self.data.frame(bundle, bundle.epochs[-1], prefetch=False) if bundle.epochs else None
                if record is not None:
                    _WORKER.submit(_prerender, record)
                st = self._bump(st, bundle=bundle, record=record, epochs_v=True)
                self._stamps["epochs"] = names
                changed = True
            # the live snapshot
            stamp = stamps["snapshot"]
            if stamp is not None and stamp != self._stamps.get("snap"):
                snap = read_live_snapshot(store, rid)
                if snap is not None:
                    self._stamps["snap"] = stamp
                    bundle = st.bundle or self.data.bundle(rid)
                    prev = ({lf.name: np.asarray(lf.uids) for lf in st.record.layers}
                            if st.record is not None else None)
                    live = frame_from_live(snap, bundle.probe_images, bundle.probe_labels, bundle.class_names,
                                           previous_uids=prev)
                    live.run_id = live.source_run_id = rid
                    live = self._with_embedding(live, st.live)
                    _WORKER.submit(_prerender, live)  # sprites, in the worker: not on a session's loop
                    st = self._bump(st, live=live, batches=np.asarray(snap["batches"]), snap_v=True)
                    changed = True
            if st.error is not None:
                st = replace(st, error=None)
                changed = True
        except Exception as exc:  # noqa: BLE001 - a half-written file: try again next poll
            log.debug("poll of %s failed: %s", rid, exc)
            if st.error != f"{type(exc).__name__}: {exc}":
                st = self._bump(st, error=f"{type(exc).__name__}: {exc}")
                changed = True
        if changed:
            self._publish(st)
        self._maybe_embed()
        return changed

    # ------------------------------------------------------------------ the live embedding
    def _with_embedding(self, live: NetworkFrame, before: NetworkFrame | None) -> NetworkFrame:
        """Carry the last computed positions (by uid) onto a new live frame until the next t-SNE."""
        if before is None:
            return live
        for lf in live.layers:
            old = before.layer(lf.name)
            if old is None or old.embedding is None:
                continue
            pos = {int(u): old.embedding[i] for i, u in enumerate(old.uids) if i < len(old.embedding)}
            if all(int(u) in pos for u in lf.uids):
                lf.embedding = np.array([pos[int(u)] for u in lf.uids], np.float64)
        return live

    def _maybe_embed(self) -> None:
        st = self.state
        live = st.live
        if (live is None or self._embedding_busy or time.monotonic() > self.want_embedding
                or live.key == self._embedded_key or st.current is not live):
            return
        self._embedding_busy = True
        self._embedded_key = live.key
        _WORKER.submit(self._embed, live, st.record)

    def _embed(self, live: NetworkFrame, record: NetworkFrame | None) -> None:
        """Warm-started t-SNE of the snapshot's kernels, continued from the record's layout by uid."""
        try:
            from ..analysis import EmbeddingTracker, filter_features

            if self._tracker is None or (record is not None and record.key != self._tracked_record):
                self._tracker = EmbeddingTracker(seed=0, warm_iter=60)
                tracks = {}
                for lf in record.layers if record is not None else []:
                    if lf.embedding is None or not np.isfinite(lf.embedding).all():
                        continue
                    tracks[lf.name] = {"uids": [int(u) for u in lf.uids],
                                       "positions": np.asarray(lf.embedding, np.float64).tolist(), "step": 1}
                self._tracker.load_state_dict({"version": 1, "seed": 0, "tracks": tracks})
                self._tracked_record = record.key if record is not None else None
            layers = []
            for lf in live.layers:
                if lf.kernel is None or lf.n_filters < 3:
                    layers.append(lf)
                    continue
                try:
                    feats = filter_features("weights", kernel=np.asarray(lf.kernel, np.float64))
                    pos = self._tracker.embed(lf.name, np.asarray(lf.uids, np.int64), feats)
                    layers.append(replace(lf, embedding=np.asarray(pos, np.float64)))
                except Exception as exc:  # noqa: BLE001 - a diverged layer: keep the last layout
                    log.debug("live t-SNE of %s failed: %s", lf.name, exc)
                    layers.append(lf)
            with self._lock:
                st = self.state
                if st.live is not None and st.live.key == live.key:
                    self._publish(self._bump(st, live=replace(live, layers=layers, key=(*live.key, "tsne")),
                                             snap_v=True))
        except Exception:  # noqa: BLE001 - the embedding is decoration: never break the feed
            log.exception("live t-SNE failed")
        finally:
            self._embedding_busy = False
