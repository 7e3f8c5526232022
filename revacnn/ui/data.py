"""Data access for the apps: one cached reader over a store, and the frames the views draw.

The views never touch the store themselves. They draw plain dataclasses:

* `NetworkFrame` (with one `LayerFrame` per conv layer): the network's state at one moment —
  activations of the probes, first-layer kernels, per-filter measures, uids, frozen flags,
  embeddings and the probes' class probabilities. `ReplayData.frame` builds one from an epoch
  record; `frame_from_live` builds one from the trainer's live snapshot.
* `RunBundle`: everything per run that does not change with the epoch — the full history
  (``timeline``), metrics, the ``filters``/``layers`` rows, steering events and fork points.

`ReplayData` is shared by every browser session of a server process (`ReplayData.shared`) and
caches what it reads. Epoch arrays are read through Zarr's asynchronous API (all arrays of an
epoch at once); callers on the event loop use the ``a…`` coroutines, which run the blocking work
in a worker thread so that the server stays responsive.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from ..errors import RevacnnError, SQLError, StoreNotFoundError
from ..storage import Store, is_url, open_store, store_key

log = logging.getLogger("revacnn.ui")

__all__ = [
    "MEASURES",
    "LayerFrame",
    "NetworkFrame",
    "ReplayData",
    "RunBundle",
    "StoreWatcher",
    "frame_from_live",
    "timed",
    "latest_touched",
    "touched_layers",
]

#: Steering ops that change a network's structure or weights (filter surgery).
SURGERY_OPS: tuple[str, ...] = ("add-filters", "delete-filters", "reinit-filters")

#: Per-filter measures the views can show as bars, rings and circle sizes.
MEASURES: tuple[str, ...] = ("grad_l1", "act_mean", "weight_change_l1")

_T = TypeVar("_T")


# ============================================================================ frames
@dataclass
class LayerFrame:
    """One conv layer at one moment, as the views draw it.

    Attributes:
        name: the layer's name (``conv1`` …).
        uids: ``(F,)`` stable filter uids in index order.
        frozen: ``(F,)`` which filters are frozen (all of them when the layer is frozen).
        activations: ``(P, F, H, W)`` the probes' activation maps, or None when unavailable.
        kernel: ``(F, kh, kw, c)`` weights, or None when not loaded (only the first layer's are
            read for every epoch; `ReplayData.kernel` reads the others on demand).
        measures: measure name (see `MEASURES`) -> ``(F,)`` values; missing measures are absent.
        embedding: ``(F, 2)`` node-level t-SNE positions (NaN where it failed), or None.
        layer_embedding: ``(F, 2)`` layer-level (all layers together) positions, or None.
        layer_frozen: the whole layer is frozen.
        added: ``(F,)`` filters whose uid did not exist in the previous frame, or None.
        deleted: uids that existed in the previous frame and are gone now.
        index: position of the layer among the conv layers.
        error: why this layer's arrays could not be read, or None.

    Example:
        >>> lf = LayerFrame("conv1", uids=np.arange(4), frozen=np.zeros(4, bool))
        >>> lf.n_filters
        4
    """

    name: str
    uids: np.ndarray
    frozen: np.ndarray
    activations: np.ndarray | None = None
    kernel: np.ndarray | None = None
    measures: dict[str, np.ndarray] = field(default_factory=dict)
    embedding: np.ndarray | None = None
    layer_embedding: np.ndarray | None = None
    layer_frozen: bool = False
    added: np.ndarray | None = None
    deleted: list[int] = field(default_factory=list)
    index: int = 0
    error: str | None = None

    @property
    def n_filters(self) -> int:
        """Number of filters."""
        return int(len(self.uids))

    def abs_max(self) -> np.ndarray:
        """``(P, F)``: the largest absolute activation of each filter on each probe (cached)."""
        cached = self.__dict__.get("_absmax")
        if cached is None:
            a = self.activations
            if a is None or a.ndim != 4:
                cached = np.zeros((0, self.n_filters), np.float32)
            else:
                flat = np.asarray(a).reshape(a.shape[0], a.shape[1], -1)  # max/min exact in float16 too
                cached = (np.maximum(flat.max(axis=-1), -flat.min(axis=-1)).astype(np.float32)
                          if flat.shape[-1] else np.zeros(a.shape[:2], np.float32))
                cached = np.nan_to_num(cached, nan=0.0, posinf=0.0, neginf=0.0)
            self.__dict__["_absmax"] = cached
        return cached

    def activation_scale(self) -> np.ndarray:
        """Per-filter brightness scale of the activation maps: each filter's max over all probes."""
        m = self.abs_max()
        return m.max(axis=0) if len(m) else np.zeros(self.n_filters, np.float32)

    def position(self, uid: int) -> int | None:
        """The index of the filter with ``uid``, or None."""
        hits = np.flatnonzero(np.asarray(self.uids) == int(uid))
        return int(hits[0]) if len(hits) else None


@dataclass
class NetworkFrame:
    """The network's state at one moment (an epoch record or a live snapshot).

    Attributes:
        layers: one `LayerFrame` per conv layer, in model order.
        probabilities: ``(P, classes)`` predicted class probabilities of the probes, or None.
        probe_images: ``(P, H, W, C)`` uint8 probe images.
        probe_labels: ``(P,)`` true classes of the probes.
        class_names: class names (index = class).
        epoch: the epoch shown (None for an empty frame).
        run_id: the run being viewed.
        source_run_id: the run that recorded it (an ancestor for a fork's inherited epochs).
        label: a short caption such as ``"epoch 3"``.
        metrics: the epoch's metrics (loss, val_accuracy …).
        message: a message to show instead of (no layers) or above the network.
        key: identifies the frame's content, for render caches.
        live: True for a live snapshot (then ``batch``, ``n_batches``, ``paused`` are set).
        batch: batches done in ``epoch`` (live), or None.
        n_batches: batches per epoch, when known.
        at: UNIX time the snapshot was published or the epoch committed (0 when unknown).
        paused: whether the trainer was paused (live).
        units: every weighted layer (conv and dense) -> its number of filters or units.
        partial: built from a partial (first-paint) `RunBundle`: no per-filter measures or
            embeddings yet.

    Example:
        >>> f = NetworkFrame.empty("No run selected")
        >>> f.message
        'No run selected'
    """

    layers: list[LayerFrame]
    probabilities: np.ndarray | None
    probe_images: np.ndarray
    probe_labels: np.ndarray
    class_names: list[str]
    epoch: int | None = None
    run_id: str | None = None
    source_run_id: str | None = None
    label: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str | None = None
    key: tuple[Any, ...] = ()
    live: bool = False
    batch: int | None = None
    n_batches: int | None = None
    at: float = 0.0
    paused: bool = False
    units: dict[str, int] = field(default_factory=dict)
    partial: bool = False

    @property
    def conv_layers(self) -> list[str]:
        """Names of the conv layers, in model order."""
        return [lf.name for lf in self.layers]

    @property
    def frozen_layers(self) -> list[str]:
        """Layers frozen as a whole."""
        return [lf.name for lf in self.layers if lf.layer_frozen]

    @property
    def frozen_filters(self) -> dict[str, list[int]]:
        """Layer -> indices of its single frozen filters (layers frozen as a whole left out)."""
        return {lf.name: [int(i) for i in np.flatnonzero(lf.frozen)] for lf in self.layers
                if not lf.layer_frozen and np.any(lf.frozen)}

    @property
    def lr(self) -> float | None:
        """The learning rate, when known."""
        v = self.metrics.get("lr")
        return None if v is None or _isna(v) else float(v)

    @classmethod
    def empty(cls, message: str) -> NetworkFrame:
        """A frame with nothing to draw but ``message``."""
        return cls(
            layers=[],
            probabilities=None,
            probe_images=np.zeros((0, 1, 1, 3), np.uint8),
            probe_labels=np.zeros(0, np.int64),
            class_names=[],
            message=message,
            key=("empty", message),
        )

    @property
    def n_probes(self) -> int:
        """Number of probe images."""
        return int(len(self.probe_images))

    def layer(self, name: str) -> LayerFrame | None:
        """The layer frame called ``name``, or None."""
        for lf in self.layers:
            if lf.name == name:
                return lf
        return None

    def class_name(self, k: int) -> str:
        """The name of class ``k`` (its number when unnamed)."""
        return self.class_names[k] if 0 <= k < len(self.class_names) else str(k)


def _mark_changes(layers: Sequence[LayerFrame], previous: dict[str, np.ndarray] | None) -> None:
    if not previous:
        return
    for lf in layers:
        before = previous.get(lf.name)
        if before is None:
            continue
        now = np.asarray(lf.uids)
        lf.added = ~np.isin(now, before)
        lf.deleted = [int(u) for u in np.asarray(before) if u not in set(now.tolist())]


def frame_from_live(
    snapshot: dict[str, Any],
    probe_images: np.ndarray,
    probe_labels: np.ndarray,
    class_names: Sequence[str],
    *,
    previous_uids: dict[str, np.ndarray] | None = None,
) -> NetworkFrame:
    """A `NetworkFrame` from the trainer's live snapshot (`revacnn.storage.live.read_live_snapshot`).

    Args:
        snapshot: the dict `read_live_snapshot` returns.
        probe_images: the session's probe images (``store.probes(session_id)[0]``).
        probe_labels: their labels.
        class_names: the session's class names.
        previous_uids: layer -> uids of an earlier frame, to mark added and deleted filters.

    Example:
        >>> snap = read_live_snapshot(store, run_id)
        >>> frame = frame_from_live(snap, *store.probes(sid), store.class_names(sid))
        >>> NetworkView(frame=frame)
    """
    meta = dict(snapshot.get("meta", {}))
    kernels = snapshot.get("kernels", {})
    acts = snapshot.get("activations", {})
    uids_meta = meta.get("uids", {}) or {}
    frozen_layers = set(meta.get("frozen_layers", []) or [])
    frozen_filters = meta.get("frozen_filters", {}) or {}
    layers = []
    for i, name in enumerate(acts.keys() or kernels.keys()):
        a = acts.get(name)
        k = kernels.get(name)
        n = a.shape[1] if a is not None else (k.shape[0] if k is not None else 0)
        uids = np.asarray(uids_meta.get(name, np.arange(n)), dtype=np.int64)[:n]
        if len(uids) < n:
            uids = np.arange(n, dtype=np.int64)
        if name in frozen_layers:
            frozen = np.ones(n, bool)
        else:
            frozen = np.isin(uids, np.asarray(frozen_filters.get(name, []), dtype=np.int64))
        measures = {}
        if a is not None and a.size:
            measures["act_mean"] = np.asarray(a, np.float32).mean(axis=(0, 2, 3))
        layers.append(
            LayerFrame(
                name=name, uids=uids, frozen=frozen, activations=a, kernel=k, measures=measures,
                layer_frozen=name in frozen_layers, index=i,
            )
        )
    _mark_changes(layers, previous_uids)
    epoch = meta.get("epoch")
    batch, nb = meta.get("batch"), meta.get("n_batches")
    label = f"live · epoch {epoch}" + (f" · batch {batch}/{nb}" if batch is not None else "")
    probs = snapshot.get("probabilities")
    if probs is not None and len(probs) != len(probe_images):
        probs = None
    units = {k: len(v) for k, v in uids_meta.items()}
    return NetworkFrame(
        layers=layers,
        probabilities=None if probs is None else np.asarray(probs, np.float32),
        probe_images=np.asarray(probe_images),
        probe_labels=np.asarray(probe_labels),
        class_names=list(class_names),
        epoch=None if epoch is None else int(epoch),
        run_id=meta.get("run_id"),
        source_run_id=meta.get("run_id"),
        label=label,
        metrics={"lr": meta.get("lr")},
        key=("live", meta.get("run_id"), epoch, batch, meta.get("published_at")),
        live=True, batch=None if batch is None else int(batch),
        n_batches=int(nb) if nb else None, at=float(meta.get("published_at") or 0.0),
        paused=bool(meta.get("paused", False)), units=units,
    )


def touched_layers(events: pd.DataFrame | None, upto: int | None, after: int | None = None) -> dict[str, str]:
    """The layers that applied filter surgery changed in epochs ``after < epoch <= upto``.

    A surgery event's ``args`` name every layer the change touched (``touched``: the plan's
    layers, recorded by the trainer); older events only name their target ``layer``.

    Args:
        events: event rows (``kind``, ``status``, ``epoch``, ``args`` JSON).
        upto: the last epoch included (None: nothing).
        after: the epoch before the first one included (default: ``upto - 1``).

    Returns:
        layer -> a short label of the changes (``"add-filters conv1"``; several joined by ``"; "``).

    Example:
        >>> touched_layers(bundle.events, 3)
        {'conv1': 'add-filters conv1', 'conv2': 'add-filters conv1'}
    """
    if events is None or upto is None or not len(events) or "kind" not in events:
        return {}
    lo = int(upto) - 1 if after is None else int(after)
    ev = events[events["kind"].isin(SURGERY_OPS) & (events["status"] == "applied")]
    out: dict[str, str] = {}
    for row in ev.to_dict("records"):
        e = row.get("epoch")
        if e is None or _isna(e) or not lo < int(e) <= int(upto):
            continue
        raw = row.get("args")
        try:
            args = json.loads(raw) if isinstance(raw, str) else dict(raw or {})
        except (TypeError, ValueError):
            args = {}
        target = str(args.get("layer", ""))
        names = args.get("touched") or ([target] if target else [])
        label = f"{row.get('kind')} {target}".strip()
        for name in names:
            name = str(name)
            out[name] = label if name not in out or label in out[name] else f"{out[name]}; {label}"
    return out


def latest_touched(events: pd.DataFrame | None) -> dict[str, str]:
    """The layers the run's most recent applied filter surgery changed (the live page's marks).

    They stay marked until the next surgery, however many epochs have passed since.

    Example:
        >>> latest_touched(run.events())
        {'conv2': 'delete-filters conv2', 'conv3': 'delete-filters conv2'}
    """
    if events is None or not len(events) or "kind" not in events:
        return {}
    ev = events[events["kind"].isin(SURGERY_OPS) & (events["status"] == "applied")]
    epochs = pd.to_numeric(ev["epoch"], errors="coerce").dropna() if len(ev) else ev.get("epoch")
    if epochs is None or not len(epochs):
        return {}
    last = int(epochs.max())
    return touched_layers(events, last, last - 1)


# ============================================================================ run bundle
@dataclass
class RunBundle:
    """Everything about one run that does not change with the epoch shown.

    Attributes:
        run_id, session_id, name, status, parent_run_id, fork_epoch: the run's row.
        timeline: ``(epoch, source_run_id)`` of the full history (ancestors before the fork).
        metrics: per-epoch metrics of the full history (the ``timeline`` view's rows).
        filters: the ``filters`` rows of the full history.
        layers: the ``layers`` rows of the full history.
        events: steering events of the full history, with an ``inherited`` column.
        diagnoses: the filter doctor's findings (``diagnoses`` rows) of the full history.
        marks: fork points and steering events for the player: dicts with ``epoch``, ``kind``
            (``fork``, ``event``, ``rejected``, ``child``) and ``label``.
        lineage: the run ids from the root down to this run.
        probe_images, probe_labels, class_names: the session's probes.
        stamp: changes whenever the run's records change.
        partial: True for a first-paint bundle (``ReplayData.bundle(..., light=True)``): its
            ``filters`` are empty (the largest table: a row per filter per epoch), so frames take
            the filters' uids and frozen flags from the epoch's arrays and have no measures until
            the full bundle replaces it.

    Example:
        >>> b = ReplayData.shared("store").bundle(run_id)
        >>> b.epochs[-1], b.metrics.val_accuracy.max()
    """

    run_id: str
    session_id: str
    name: str
    status: str
    parent_run_id: str | None
    fork_epoch: int | None
    timeline: list[tuple[int, str]]
    metrics: pd.DataFrame
    filters: pd.DataFrame
    layers: pd.DataFrame
    events: pd.DataFrame
    marks: list[dict[str, Any]]
    lineage: list[str]
    probe_images: np.ndarray
    probe_labels: np.ndarray
    class_names: list[str]
    stamp: tuple[Any, ...] = ()
    diagnoses: pd.DataFrame = field(default_factory=pd.DataFrame)
    partial: bool = False
    _by_epoch_layer: dict[tuple[int, str], dict[str, np.ndarray]] = field(default_factory=dict, repr=False)
    _spans: dict[tuple[int, str], tuple[int, int]] = field(default_factory=dict, repr=False)
    _order: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    _conv_layers: dict[int, list[str]] = field(default_factory=dict, repr=False)
    _layer_rows: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict, repr=False)
    _metrics_at: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # Index everything the epoch switch needs into plain numpy/dicts once per run, so that
        # showing an epoch does no pandas filtering.
        if not self.filters.empty:
            # one vectorised sort and a (epoch, layer) -> row-span index; the column slices of one
            # span are taken when first asked for (a run of 1,300 epochs x 768 filters has 1M rows)
            f = self.filters
            layer_codes, layer_names = pd.factorize(f["layer"], sort=False)
            epoch = f["epoch"].to_numpy(np.int64, na_value=-1)
            order = np.lexsort((f["filter"].to_numpy(np.int64, na_value=-1), layer_codes, epoch))
            self._order = order
            ep, lc = epoch[order], layer_codes[order]
            cut = np.flatnonzero((np.diff(ep) != 0) | (np.diff(lc) != 0)) + 1
            starts = np.concatenate(([0], cut))
            stops = np.concatenate((cut, [len(ep)]))
            names = [str(n) for n in layer_names]
            self._spans = {(int(ep[a]), names[int(lc[a])]): (int(a), int(b))
                           for a, b in zip(starts.tolist(), stops.tolist(), strict=True)}
        if not self.layers.empty:
            lay = self.layers
            if "layer_index" in lay:
                lay = lay.sort_values(["epoch", "layer_index"], kind="stable")
            for r in lay.to_dict("records"):
                self._layer_rows[(int(r["epoch"]), str(r["layer"]))] = r
                if r.get("kind") == "conv":
                    self._conv_layers.setdefault(int(r["epoch"]), []).append(str(r["layer"]))
        if not self.metrics.empty:
            for r in self.metrics.to_dict("records"):
                self._metrics_at[int(r["epoch"])] = {k: (None if _isna(v) else v) for k, v in r.items()}

    @property
    def epochs(self) -> list[int]:
        """Epochs of the full history, ascending."""
        return [e for e, _ in self.timeline]

    @property
    def label(self) -> str:
        """The run's name, or its id."""
        return self.name or self.run_id

    def source(self, epoch: int) -> str | None:
        """The run that recorded ``epoch`` of this run's history, or None."""
        for e, s in self.timeline:
            if e == epoch:
                return s
        return None

    def filter_rows(self, epoch: int, layer: str) -> dict[str, np.ndarray] | None:
        """The ``filters`` columns of one layer at one epoch (numpy arrays in filter-index order)."""
        key = (int(epoch), layer)
        hit = self._by_epoch_layer.get(key)
        if hit is None:
            span = self._spans.get(key)
            if span is None:
                return None
            sub = self.filters.iloc[self._order[span[0]:span[1]]]
            hit = self._by_epoch_layer[key] = {c: sub[c].to_numpy() for c in sub.columns if c != "run_id"}
        return hit

    def layer_row(self, epoch: int, layer: str) -> dict[str, Any] | None:
        """The ``layers`` row of one layer at one epoch, or None."""
        return self._layer_rows.get((int(epoch), layer))

    def metrics_at(self, epoch: int) -> dict[str, Any]:
        """The metrics of ``epoch`` (loss, accuracy, val_loss, val_accuracy …), or {}."""
        return self._metrics_at.get(int(epoch), {})

    def conv_layers(self, epoch: int) -> list[str] | None:
        """Names of the conv layers at ``epoch`` (from the ``layers`` table), or None."""
        return self._conv_layers.get(int(epoch))

    def units(self, epoch: int) -> dict[str, int]:
        """Every weighted layer at ``epoch`` -> its number of filters (units), from ``layers``."""
        return {name: int(r["n_filters"]) for (e, name), r in self._layer_rows.items()
                if e == int(epoch) and "n_filters" in r and not _isna(r["n_filters"])}

    def layer_frozen(self, epoch: int, layer: str) -> bool:
        """Whether ``layer`` was frozen as a whole at ``epoch``."""
        row = self._layer_rows.get((int(epoch), layer))
        return bool(row.get("frozen")) if row is not None and not _isna(row.get("frozen")) else False

    def touched(self, epoch: int | None) -> dict[str, str]:
        """Layers that filter surgery changed between the previous recorded epoch and ``epoch``.

        Example:
            >>> bundle.touched(3)
            {'conv1': 'add-filters conv1', 'conv2': 'add-filters conv1'}
        """
        eps = self.epochs
        if epoch is None or epoch not in eps:
            return {}
        i = eps.index(epoch)
        return touched_layers(self.events, epoch, eps[i - 1] if i else epoch - 1)

    def filter_history(self, layer: str, uid: int) -> pd.DataFrame:
        """One filter's rows over the full history (by uid), ascending by epoch."""
        if self.filters.empty:
            return self.filters
        f = self.filters
        return f[(f["layer"] == layer) & (f["filter_uid"] == int(uid))].sort_values("epoch")


# ============================================================================ watcher
class StoreWatcher:
    """The one poller of a server process: store changes for every page, and the runs live pages follow.

    One background thread per store. Every `interval_s` it takes the store's stamp
    (`Store.stamp`) and bumps `version` when runs, epochs, events or statuses changed; sessions
    compare `version` (an int) instead of each scanning the store. Runs that a live page follows
    (`follow`) are polled every `FEED_POLL_S` — every `FEED_POLL_HOT_S` for a while after a
    steering command was sent (`heat`) — and each change is pushed to the sessions that listen.

    Example:
        >>> w = StoreWatcher.shared("store")
        >>> v = w.version
        >>> feed = w.follow(run_id)     # a live page: feed.state is the run's read model
        >>> w.unfollow(feed)
    """

    FEED_POLL_S = 0.2
    FEED_POLL_HOT_S = 0.02
    HOT_S = 10.0

    _instances: dict[str, StoreWatcher] = {}
    _lock = threading.Lock()

    def __init__(self, root: Path, interval_s: float = 0.5) -> None:
        self.root: Any = store_key(root) if is_url(root) else Path(root)
        self.interval_s = interval_s
        self.version = 0
        self._stamp: Any = None
        self._store: Store | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._feeds: dict[str, Any] = {}
        self._flock = threading.Lock()
        self._stamp = self.scan()
        self._thread = threading.Thread(target=self._loop, name="revacnn-store-watcher", daemon=True)
        self._thread.start()

    @classmethod
    def shared(cls, root: str | os.PathLike[str], interval_s: float = 0.5) -> StoreWatcher:
        """The watcher of ``root`` (created on first use)."""
        key = store_key(root)
        with cls._lock:
            w = cls._instances.get(key)
            if w is None or not w._thread.is_alive():
                w = cls(key, interval_s)
                cls._instances[key] = w
            return w

    def scan(self) -> tuple[Any, ...]:
        """A cheap fingerprint of the store (`Store.stamp`); ``("no-store",)`` while there is none."""
        if self._store is None:
            try:
                self._store = open_store(self.root, mode="r")
            except RevacnnError:
                return ("no-store",)
        return self._store.stamp()

    def check(self) -> int:
        """Scan now; bump and return `version` when something changed."""
        stamp = self.scan()
        if stamp != self._stamp:
            self._stamp = stamp
            self.version += 1
        return self.version

    # ------------------------------------------------------------------ followed runs
    def follow(self, run_id: str) -> Any:
        """Follow ``run_id`` for a live page: its `revacnn.ui.feed.RunFeed` (shared by sessions)."""
        from .feed import RunFeed

        with self._flock:
            feed = self._feeds.get(run_id)
            if feed is None:
                feed = self._feeds[run_id] = RunFeed(ReplayData.shared(self.root), run_id)
            feed.subscribers += 1
        self._wake.set()  # the first state is read in this thread, off the event loop
        return feed

    def unfollow(self, feed: Any) -> None:
        """Stop following (the feed is dropped when its last session leaves)."""
        with self._flock:
            feed.subscribers -= 1
            if feed.subscribers <= 0 and self._feeds.get(feed.run_id) is feed:
                del self._feeds[feed.run_id]

    def followed(self) -> list[str]:
        """Run ids followed now."""
        with self._flock:
            return list(self._feeds)

    def heat(self, feed: Any) -> None:
        """Poll ``feed`` fast for a while (a steering command was just sent) and at once."""
        feed.hot_until = time.monotonic() + self.HOT_S
        self._wake.set()

    def _loop(self) -> None:
        last_scan = 0.0
        while not self._stop.is_set():
            with self._flock:
                feeds = list(self._feeds.values())
            now = time.monotonic()
            hot = any(f.hot_until > now for f in feeds)
            period = self.FEED_POLL_HOT_S if hot else self.FEED_POLL_S if feeds else self.interval_s
            self._wake.wait(period)
            self._wake.clear()
            for feed in feeds:
                try:
                    feed.poll()
                except Exception:  # noqa: BLE001 - keep polling whatever a poll meets
                    log.exception("live feed poll failed")
            if time.monotonic() - last_scan < self.interval_s:
                continue
            last_scan = time.monotonic()
            if not self._present():  # the store went away (a test's temporary folder): stop
                with self._lock:
                    if self._instances.get(str(self.root)) is self:
                        del self._instances[str(self.root)]
                return
            try:
                self.check()
            except Exception:  # noqa: BLE001 - keep polling whatever a scan meets
                log.debug("store scan failed", exc_info=True)

    def _present(self) -> bool:
        if self._store is None:
            self.scan()
        return self._store is not None and self._store.present()

    def stop(self) -> None:
        """Stop the thread."""
        self._stop.set()
        self._wake.set()


# ============================================================================ the reader
class _LRU:
    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
        return None

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()


def _isna(v: Any) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _run_async(coro: Any) -> Any:
    """Run a Zarr coroutine to completion from a (non-event-loop) thread."""
    try:
        from zarr.core.sync import sync
    except ImportError:  # pragma: no cover - other zarr layouts
        return asyncio.run(coro)
    return sync(coro)


async def _read_many(base: str, paths: Sequence[str]) -> dict[str, Any]:
    """Read whole arrays ``base/path`` concurrently; failures come back as exceptions."""
    from zarr.api import asynchronous as za

    async def one(p: str) -> Any:
        arr = await za.open_array(store=f"{base}/{p}", mode="r")
        return np.asarray(await arr.getitem(slice(None)))

    res = await asyncio.gather(*(one(p) for p in paths), return_exceptions=True)
    return dict(zip(paths, res, strict=True))


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


class ReplayData:
    """Cached access to one store for the apps: runs, per-run bundles, epoch frames, SQL.

    Args:
        path: the store's folder.

    Example:
        >>> data = ReplayData.shared("store")
        >>> rows = data.tree()
        >>> bundle = data.bundle(rows[0]["run_id"])
        >>> frame = data.frame(bundle, bundle.epochs[-1])
        >>> [lf.name for lf in frame.layers]
        ['conv1', 'conv2', 'conv3']
    """

    _instances: dict[str, ReplayData] = {}
    _ilock = threading.Lock()

    def __init__(self, path: str | os.PathLike[str]) -> None:
        key = store_key(path)
        self.path: Any = key if is_url(key) else Path(key)
        self._store: Store | None = None
        self._lock = threading.RLock()
        self._arrays = _LRU(96)
        self._frames = _LRU(64)
        self._bundles = _LRU(16)
        self._tables = _LRU(64)
        self._misc = _LRU(32)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="revacnn-prefetch")
        self._prefetching: set[Any] = set()

    @classmethod
    def shared(cls, path: str | os.PathLike[str]) -> ReplayData:
        """The process-wide reader of ``path`` (shared by every browser session)."""
        key = store_key(path)
        with cls._ilock:
            inst = cls._instances.get(key)
            if inst is None:
                inst = cls._instances[key] = cls(key)
            return inst

    # ------------------------------------------------------------------ store
    @property
    def store(self) -> Store:
        """The open store.

        Raises:
            StoreNotFoundError: there is no store at the path (yet).
        """
        with self._lock:
            if self._store is None:
                self._store = open_store(self.path, mode="r")
            return self._store

    def problem(self) -> str | None:
        """Why the store cannot be shown (missing, unreadable), or None when it can."""
        try:
            _ = self.store
        except StoreNotFoundError as exc:
            return str(exc)
        except RevacnnError as exc:
            return f"The store at {self.path} cannot be read: {_error_text(exc)}"
        return None

    @property
    def watcher(self) -> StoreWatcher:
        """The store's shared `StoreWatcher`."""
        return StoreWatcher.shared(self.path)

    def version(self) -> int:
        """The watcher's version: it changes when runs, epochs, events or statuses change."""
        return self.watcher.version

    # ------------------------------------------------------------------ runs
    def tree(self) -> list[dict[str, Any]]:
        """Sessions and their fork trees, depth-first.

        Each row is a dict; session rows have ``kind="session"`` (session_id, dataset, model,
        n_probes), run rows ``kind="run"`` (run_id, name, status, depth, parent_run_id,
        fork_epoch, last_epoch, best_val_accuracy, train_time_s).
        """
        key = ("tree", self.version())
        hit = self._misc.get(key)
        if hit is not None:
            return hit
        from ..storage.tree import tree_rows

        store = self.store
        sessions = store.sessions()
        runs = tree_rows(store) if len(store.run_ids()) else []
        out: list[dict[str, Any]] = []
        for s in sessions.to_dict("records"):
            out.append(
                {
                    "kind": "session",
                    "session_id": s["session_id"],
                    "dataset": s["dataset"],
                    "model": s["model"],
                    "n_probes": int(s["n_probes"]),
                }
            )
            for r in runs:
                if r["session_id"] != s["session_id"]:
                    continue
                out.append(
                    {
                        "kind": "run",
                        "run_id": r["run_id"],
                        "session_id": r["session_id"],
                        "name": None if pd.isna(r["name"]) else str(r["name"]),
                        "status": str(r["status"]),
                        "depth": int(r["depth"]),
                        "parent_run_id": r["parent_run_id"] if isinstance(r["parent_run_id"], str) else None,
                        "fork_epoch": None if pd.isna(r["fork_epoch"]) else int(r["fork_epoch"]),
                        "last_epoch": None if pd.isna(r["last_epoch"]) else int(r["last_epoch"]),
                        "best_val_accuracy": None
                        if pd.isna(r["best_val_accuracy"])
                        else float(r["best_val_accuracy"]),
                        "train_time_s": None if pd.isna(r["train_time_s"]) else float(r["train_time_s"]),
                    }
                )
        self._misc.put(key, out)
        return out

    def run_ids(self) -> list[str]:
        """Run ids in tree order."""
        return [r["run_id"] for r in self.tree() if r["kind"] == "run"]

    def _table(self, run_id: str, table: str, committed: tuple[int, ...]) -> pd.DataFrame:
        key = (run_id, table, committed)
        hit = self._tables.get(key)
        if hit is None:
            hit = self.store.run(run_id).table(table)
            self._tables.put(key, hit)
        return hit

    def bundle(self, run_id: str, *, fresh: bool = False, light: bool = False) -> RunBundle:
        """The `RunBundle` of ``run_id`` (re-read when the run's records change).

        Args:
            run_id: the run.
            fresh: check the run's records now rather than trusting the watcher's version (the
                live feed, which sees a commit before the watcher's next scan).
            light: the first page's bundle: everything but the ``filters`` rows (``partial``),
                unless the full bundle is cached and current. A run of 1,300 epochs x 768
                filters has a million such rows; the page reads them afterwards, in a thread.

        Raises:
            RunNotFoundError: no such run.
        """
        version = self.version()
        hit = self._bundles.get(run_id)
        if hit is not None and hit.stamp[3] == version and not fresh:
            return hit  # nothing in the store changed since it was read (the watcher says so)
        if light:
            lhit = self._bundles.get((run_id, "light"))
            if lhit is not None and lhit.stamp[3] == version and not fresh:
                return lhit
        store = self.store
        run = store.run(run_id)
        timeline = run.history()  # the one lineage (also the SQL view timeline's)
        status = run.status
        sources: dict[str, list[int]] = {}
        for e, s in timeline:
            sources.setdefault(s, []).append(e)
        n_events = {s: len(store.run_stamp(s)["events"]) for s in sources}
        if run_id not in n_events:
            n_events[run_id] = len(store.run_stamp(run_id)["events"])
        stamp = (tuple(timeline), status, tuple(sorted(n_events.items())), version)
        if hit is not None and hit.stamp[:3] == stamp[:3]:
            hit.stamp = stamp
            return hit
        bundle = self._load_bundle(run, timeline, status, sources, stamp, light=light)
        self._bundles.put((run_id, "light") if light else run_id, bundle)
        return bundle

    def _load_bundle(
        self, run: Any, timeline: list[tuple[int, str]], status: str,
        sources: dict[str, list[int]], stamp: tuple[Any, ...], *, light: bool = False,
    ) -> RunBundle:
        store = self.store
        frames: dict[str, list[pd.DataFrame]] = {"epochs": [], "layers": [], "diagnoses": []}
        if not light:
            frames["filters"] = []
        for src, epochs in sources.items():
            committed = tuple(store.run(src).epochs())
            for t in frames:
                try:
                    df = self._table(src, t, committed)
                except (KeyError, OSError) as exc:  # a store written before that table existed
                    if t != "diagnoses":
                        raise
                    log.debug("no diagnoses for %s: %s", src, exc)
                    continue
                if "epoch" in df:
                    frames[t].append(df[df["epoch"].isin(epochs)])

        def cat(parts: list[pd.DataFrame]) -> pd.DataFrame:
            parts = [p for p in parts if len(p)]
            return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

        epochs_df = cat(frames["epochs"])
        metrics = self._metrics(run.run_id, timeline, epochs_df)
        # lineage and fork points
        lineage: list[Any] = []
        r = run
        while r is not None:
            lineage.insert(0, r)
            r = r.parent
        marks: list[dict[str, Any]] = []
        for child in lineage[1:]:
            marks.append(
                {
                    "epoch": int(child.fork_epoch),
                    "kind": "fork",
                    "label": f"fork point: {child.name or child.run_id} branches from "
                    f"{child.parent_run_id} at epoch {child.fork_epoch}",
                }
            )
        # events of the full history: each ancestor's before the next fork point
        ev_parts = []
        for i, r in enumerate(lineage):
            ev = r.events()
            if i + 1 < len(lineage):
                upto = int(lineage[i + 1].fork_epoch)
                ev = ev[ev["epoch"] < upto]
            ev = ev.assign(inherited=r.run_id != run.run_id)
            ev_parts.append(ev)
        events = pd.concat([e for e in ev_parts if len(e)], ignore_index=True) if any(
            len(e) for e in ev_parts
        ) else (ev_parts[-1] if ev_parts else pd.DataFrame())
        for row in events.to_dict("records") if len(events) else []:
            ok = row.get("status") == "applied"
            marks.append(
                {
                    "epoch": int(row["epoch"]) if pd.notna(row.get("epoch")) else 0,
                    "kind": "event" if ok else "rejected",
                    "label": f"{row.get('kind')} {row.get('args')} — {row.get('status')}: "
                    f"{row.get('message') or ''}".strip(),
                }
            )
        # forks that branch from this run (children)
        try:
            runs = store.runs()
            kids = runs[runs["parent_run_id"] == run.run_id]
            for k in kids.to_dict("records"):
                marks.append(
                    {
                        "epoch": int(k["fork_epoch"]),
                        "kind": "child",
                        "label": f"fork {k['name'] or k['run_id']} branches here",
                    }
                )
        except RevacnnError:
            pass
        images, labels = store.probes(run.session_id)
        return RunBundle(
            run_id=run.run_id,
            session_id=run.session_id,
            name=run.name or "",
            status=status,
            parent_run_id=run.parent_run_id,
            fork_epoch=run.fork_epoch,
            timeline=timeline,
            metrics=metrics,
            filters=cat(frames.get("filters", [])),
            layers=cat(frames["layers"]),
            events=events,
            diagnoses=cat(frames["diagnoses"]),
            marks=sorted(marks, key=lambda m: m["epoch"]),
            lineage=[r.run_id for r in lineage],
            probe_images=images,
            probe_labels=labels,
            class_names=store.class_names(run.session_id),
            stamp=stamp,
            partial=light,
        )

    @staticmethod
    def _metrics(run_id: str, timeline: list[tuple[int, str]], epochs_df: pd.DataFrame) -> pd.DataFrame:
        cols = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "duration_s",
                "cumulative_time_s", "source_run_id", "inherited"]
        if epochs_df.empty:
            return pd.DataFrame(columns=cols)
        src = dict(timeline)
        df = epochs_df.copy()
        df = df[[df_src == src.get(int(e)) for e, df_src in zip(df["epoch"], df["run_id"], strict=True)]]
        df = df.rename(columns={"run_id": "source_run_id"})
        df["inherited"] = df["source_run_id"] != run_id
        df = df.sort_values("epoch").reset_index(drop=True)
        for c in cols:
            if c not in df:
                df[c] = np.nan
        return df

    # ------------------------------------------------------------------ epoch frames
    def _raw(self, source: str, epoch: int, conv: Sequence[str] | None,
             extra: Sequence[str] = ()) -> dict[str, Any]:
        """Read (or take from the cache) the arrays of one epoch record."""
        key = (source, int(epoch))
        cached = self._arrays.get(key)
        base = self.store.epoch_arrays(source, epoch)
        if cached is None:
            cached = {}
            if base is None:
                cached["__error__"] = (
                    f"The arrays of run {source} epoch {epoch} are missing "
                    f"({self.store.layout.epoch_arrays(source, epoch)} does not exist)"
                )
                self._arrays.put(key, cached)
                return cached
            if conv is None:
                conv = self._conv_from_group(source, epoch, cached)
            cached["__conv__"] = list(conv or [])
            want = [f"{n}/activations" for n in cached["__conv__"]]
            if cached["__conv__"]:
                want.append(f"{cached['__conv__'][0]}/kernel")
            want.append("predictions")
            want += [p for p in extra if p not in want]  # in the same concurrent read
            cached.update(_run_async(_read_many(base, want)))
            self._arrays.put(key, cached)
        missing = [p for p in extra if p not in cached]
        if missing and "__error__" not in cached:
            cached.update(_run_async(_read_many(base, missing)))
        return cached

    def _conv_from_group(self, source: str, epoch: int, into: dict[str, Any]) -> list[str] | None:
        from ..storage import EpochRecord

        try:
            rec = EpochRecord(self.store, source, epoch)
            return rec.conv_layers
        except RevacnnError as exc:
            into["__error__"] = _error_text(exc)
            return None
        except Exception as exc:  # noqa: BLE001 - corrupt metadata of any kind
            into["__error__"] = f"The arrays of run {source} epoch {epoch} are corrupt: {_error_text(exc)}"
            return None

    def frame(self, bundle: RunBundle, epoch: int, *, prefetch: bool = True) -> NetworkFrame:
        """The `NetworkFrame` of ``epoch`` of the run (never raises for missing or corrupt data).

        A missing or corrupt record gives a frame whose ``message`` says so; a layer whose arrays
        cannot be read gets an ``error`` and the other layers still show.
        """
        key = (bundle.run_id, bundle.stamp[:3], int(epoch), bundle.partial)
        hit = self._frames.get(key)
        if hit is not None:
            if prefetch:
                self.prefetch(bundle, epoch)
            return hit
        frame = self._build_frame(bundle, int(epoch))
        if frame.message is None or frame.layers:
            self._frames.put(key, frame)
        if prefetch:
            self.prefetch(bundle, epoch)
        return frame

    def _build_frame(self, bundle: RunBundle, epoch: int) -> NetworkFrame:
        source = bundle.source(epoch)
        base = NetworkFrame(
            layers=[], probabilities=None, probe_images=bundle.probe_images,
            probe_labels=bundle.probe_labels, class_names=bundle.class_names, epoch=epoch,
            run_id=bundle.run_id, source_run_id=source, label=f"epoch {epoch}",
            key=(bundle.run_id, epoch, bundle.stamp[:3], bundle.partial), partial=bundle.partial,
        )
        if source is None:
            span = f"{bundle.epochs[0]}..{bundle.epochs[-1]}" if bundle.epochs else "none yet"
            base.message = f"Run {bundle.run_id} has no committed epoch {epoch} (epochs: {span})."
            return base
        conv = bundle.conv_layers(epoch)
        # a partial bundle has no filters rows: read the uids and frozen flags with the activations
        extra = [f"{n}/{a}" for n in conv or [] for a in ("filter_uids", "frozen")] if bundle.partial else []
        try:
            raw = self._raw(source, epoch, conv, extra)
        except Exception as exc:  # noqa: BLE001 - a corrupt store must not break the page
            raw = {"__error__": f"The arrays of run {source} epoch {epoch} cannot be read: {_error_text(exc)}"}
        m = bundle.metrics_at(epoch)
        base.metrics = {k: m.get(k) for k in ("loss", "accuracy", "val_loss", "val_accuracy", "lr",
                                               "duration_s", "cumulative_time_s") if k in m}
        at, nb = m.get("committed_at"), m.get("n_batches")
        base.at = pd.Timestamp(at).timestamp() if at is not None and not _isna(at) else 0.0
        base.n_batches = int(nb) if nb is not None and not _isna(nb) and int(nb) > 0 else None
        base.units = bundle.units(epoch)
        if "__error__" in raw:
            base.message = raw["__error__"]
            return base
        probs = raw.get("predictions")
        base.probabilities = None if isinstance(probs, BaseException) else np.asarray(probs, np.float32)
        prev_uids: dict[str, np.ndarray] = {}
        eps = bundle.epochs
        i = eps.index(epoch)
        for j, name in enumerate(raw.get("__conv__", [])):
            rows = bundle.filter_rows(epoch, name)
            acts = raw.get(f"{name}/activations")
            err = None
            if isinstance(acts, BaseException):
                err = (f"The activations of {name} (run {source}, epoch {epoch}) are missing or "
                       f"corrupt: {_error_text(acts)}")
                acts = None
            kernel = raw.get(f"{name}/kernel")
            if isinstance(kernel, BaseException):
                kernel = None
            if rows is not None and len(rows["filter_uid"]):
                uids = rows["filter_uid"].astype(np.int64)
                frozen = rows["frozen"].astype(bool)
                measures = {m: rows[m].astype(np.float64) for m in MEASURES if m in rows}
                emb = np.stack([rows["tsne_x"], rows["tsne_y"]], axis=1).astype(np.float64)
                lemb = (np.stack([rows["layer_tsne_x"], rows["layer_tsne_y"]], axis=1).astype(np.float64)
                        if "layer_tsne_x" in rows else None)
            else:
                extra = [f"{name}/filter_uids", f"{name}/frozen"]
                raw2 = self._raw(source, epoch, None, extra)
                uids_a, frozen_a = raw2.get(extra[0]), raw2.get(extra[1])
                n = acts.shape[1] if acts is not None else 0
                uids = np.arange(n) if isinstance(uids_a, BaseException) or uids_a is None else uids_a
                frozen = (np.zeros(len(uids), bool) if isinstance(frozen_a, BaseException)
                          or frozen_a is None else frozen_a.astype(bool))
                measures, emb, lemb = {}, None, None
            if acts is not None and acts.shape[1] != len(uids):
                err = (f"{name}: {acts.shape[1]} activation maps but {len(uids)} filters recorded "
                       f"(run {source}, epoch {epoch}): the record is inconsistent")
                acts = None
            lf = LayerFrame(
                name=name, uids=uids, frozen=frozen, activations=acts, kernel=kernel,
                measures=measures, embedding=emb, layer_embedding=lemb,
                layer_frozen=bundle.layer_frozen(epoch, name), index=j, error=err,
            )
            lf.abs_max()  # computed here, in the prefetch thread for the neighbouring epochs
            base.layers.append(lf)
            if i > 0:
                prev = bundle.filter_rows(eps[i - 1], name)
                if prev is not None:
                    prev_uids[name] = prev["filter_uid"].astype(np.int64)
        _mark_changes(base.layers, prev_uids)
        return base

    async def aframe(self, bundle: RunBundle, epoch: int) -> NetworkFrame:
        """`frame` in a worker thread, for callers on the event loop."""
        return await asyncio.to_thread(self.frame, bundle, epoch)

    async def abundle(self, run_id: str) -> RunBundle:
        """`bundle` in a worker thread."""
        return await asyncio.to_thread(self.bundle, run_id)

    def background(self, fn: Any) -> None:
        """Run ``fn()`` in the prefetch thread, after the reads already queued there (errors are logged).

        Example:
            >>> data.background(lambda: data.frame(bundle, 4, prefetch=False))
        """
        def job() -> None:
            try:
                fn()
            except Exception:  # noqa: BLE001 - background work must never break a page
                log.debug("background job failed", exc_info=True)

        self._pool.submit(job)

    def prefetch(self, bundle: RunBundle, epoch: int) -> None:
        """Read the neighbouring epochs' arrays in the background (what the player shows next)."""
        eps = bundle.epochs
        if epoch not in eps:
            return
        i = eps.index(epoch)
        for j in (i + 1, i - 1, i + 2):
            if 0 <= j < len(eps):
                e = eps[j]
                src = bundle.source(e)
                key = (src, e)
                if src is None or self._arrays.get(key) is not None or key in self._prefetching:
                    continue
                self._prefetching.add(key)

                def job(src: str = src, e: int = e, key: Any = key) -> None:
                    try:
                        self._raw(src, e, bundle.conv_layers(e))
                    except Exception:  # noqa: BLE001
                        log.debug("prefetch failed", exc_info=True)
                    finally:
                        self._prefetching.discard(key)

                self._pool.submit(job)

    def diagnoses(self, run_id: str, epoch: int | None = None) -> pd.DataFrame:
        """The filter doctor's findings of ``run_id``'s history (a fork's include its ancestors').

        Read from the ``diagnoses`` Parquet tables of each run of the lineage, for the epochs that
        run recorded in the history (`Run.history`), like every other table of a `RunBundle`.

        Args:
            run_id: the run.
            epoch: only this epoch's rows (default: all).

        Example:
            >>> ReplayData.shared("store").diagnoses(run_id, epoch=3)[["layer", "kind"]]
        """
        df = self.bundle(run_id).diagnoses
        if epoch is not None and len(df):
            df = df[df["epoch"] == int(epoch)]
        return df

    def kernel(self, bundle: RunBundle, epoch: int, layer: str) -> np.ndarray | None:
        """The ``(F, kh, kw, c)`` kernel of ``layer`` at ``epoch`` (read on demand), or None."""
        source = bundle.source(epoch)
        if source is None:
            return None
        try:
            raw = self._raw(source, epoch, bundle.conv_layers(epoch), [f"{layer}/kernel"])
        except Exception:  # noqa: BLE001
            return None
        k = raw.get(f"{layer}/kernel")
        return None if k is None or isinstance(k, BaseException) else k

    # ------------------------------------------------------------------ SQL and clouds
    def sql(self, query: str, *, timeout_s: float = 10.0) -> pd.DataFrame:
        """Run a read-only query (see `Store.sql`).

        Raises:
            SQLError: refused, failed, or timed out.
        """
        try:
            store = self.store
        except StoreNotFoundError as exc:
            raise SQLError(str(exc)) from None
        return store.sql(query, timeout_s=timeout_s)

    async def asql(self, query: str, *, timeout_s: float = 10.0) -> pd.DataFrame:
        """`sql` in a worker thread."""
        return await asyncio.to_thread(self.sql, query, timeout_s=timeout_s)

    def cloud(self) -> pd.DataFrame:
        """Every filter of every epoch of every run: run_id, epoch, layer, filter_uid, positions, grad_l1."""
        key = ("cloud", self.version())
        hit = self._misc.get(key)
        if hit is None:
            hit = self.sql(
                "SELECT run_id, epoch, layer, filter_uid, tsne_x, tsne_y, layer_tsne_x, layer_tsne_y, "
                "grad_l1 FROM filters"
            )
            self._misc.put(key, hit)
        return hit


def timed(fn: Callable[[], _T]) -> tuple[_T, float]:
    """Call ``fn`` and return its result and the seconds it took.

    Example:
        >>> timed(lambda: 1)[0]
        1
    """
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t

