"""The recording worker: derives measures and embeddings from epoch snapshots and writes them, off the hot path."""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..storage import RunWriter
from .checkpoint import Checkpoint, to_bytes

log = logging.getLogger("revacnn.recorder")


@dataclass
class LayerSnapshot:
    """One weighted layer at the end of an epoch, as copied from the model (numpy)."""

    name: str
    kind: str  # conv | dense
    index: int
    kernel: np.ndarray  # Keras layout: (kh, kw, c_in, F) or (in, units)
    bias: np.ndarray | None
    grad_l1: np.ndarray  # (F,)
    uids: np.ndarray  # (F,) int64
    frozen_mask: np.ndarray  # (F,) bool, True where the filter (or whole layer) is frozen
    layer_frozen: bool
    activations: np.ndarray | None = None  # (P, H, W, F) float32, conv only
    rgb_input: bool = False
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. a separable conv's depthwise kernel


@dataclass
class EpochSnapshot:
    """Everything the worker needs to write one epoch record."""

    epoch: int
    metrics: dict[str, Any]
    layers: list[LayerSnapshot]
    probabilities: np.ndarray  # (P, classes)
    probe_labels: np.ndarray
    checkpoint: Checkpoint | None
    parents: dict[str, dict[int, int]] = field(default_factory=dict)  # layer -> new uid -> parent uid
    #: retention: write the checkpoint now; otherwise it is held until the next epoch, in case
    #: this epoch turns out to be the run's last (`Recorder.flush_checkpoint`)
    write_checkpoint: bool = True


class Recorder:
    """Writes epoch records in a background thread, in order.

    Training hands over a snapshot (numpy copies) and goes on; the worker computes weight
    norms and changes, pattern measures and t-SNE embeddings, writes the arrays, the table rows,
    the checkpoint, and commits the epoch last. A failing embedding is logged and recorded as
    NaN; a failing write is logged and that epoch stays uncommitted; neither stops training.
    """

    def __init__(
        self,
        writer: RunWriter,
        *,
        embeddings: bool = True,
        embedding_features: str = "weights",
        tracker_state: dict[str, Any] | None = None,
        prev_kernels: dict[str, dict[int, np.ndarray]] | None = None,
        doctor_state: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        self.writer = writer
        self.embeddings = embeddings
        self.embedding_features = embedding_features
        self.tracker = None
        if embeddings:
            try:
                from ..analysis import EmbeddingTracker

                self.tracker = EmbeddingTracker(seed=seed)
                if tracker_state:
                    self.tracker.load_state_dict(tracker_state)
                self._use_tsne_process(self.tracker)
            except Exception:  # analysis unavailable: record without embeddings
                log.exception("embeddings disabled")
                self.tracker = None
        self._prev: dict[str, dict[int, np.ndarray]] = prev_kernels or {}
        # The doctor's memory: each layer's largest per-epoch relative change so far, the initial
        # kernel of every filter of a layer that sees RGB (by uid), the last epoch's activations.
        # The first two travel with each checkpoint, so forks and resumes judge as the parent did.
        doctor_state = doctor_state or {}
        self._peak: dict[str, float] = dict(doctor_state.get("peak", {}))
        self._init: dict[str, dict[int, np.ndarray]] = {
            layer: {int(u): np.asarray(k, np.float32) for u, k in by_uid.items()}
            for layer, by_uid in doctor_state.get("init", {}).items()
        }
        self._prev_acts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._queue: queue.Queue[Any] = queue.Queue()
        self._held: tuple[int, Checkpoint, dict[str, Any]] | None = None
        self._tsne_pool: ThreadPoolExecutor | None = None
        self.errors: list[str] = []
        #: set when the store cannot be written (a full disk …): the trainer stops with `failed`
        self.fatal: str | None = None
        #: seconds each epoch's writes took (checkpoint, arrays, rows, commit), for benchmarks
        self.write_s: list[float] = []
        self.committed: list[int] = []
        self.last_commit_at: float | None = None
        self._thread = threading.Thread(target=self._loop, name="revacnn-recorder", daemon=True)
        self._thread.start()

    @staticmethod
    def _use_tsne_process(tracker: Any) -> None:
        """Run the tracker's t-SNE optimisations in the shared child process (off this process' GIL).

        ``REVACNN_TSNE_PROCESS=0`` keeps them in the embedding thread (the earlier behaviour, same
        positions). The child starts now, so it has loaded openTSNE by the first epoch's end.
        """
        from ..analysis.tsne_process import child_enabled, shared_process

        if child_enabled():
            tracker.runner = shared_process(nice=WORKER_NICE)
            try:
                tracker.runner.start()
            except OSError as exc:  # cannot start a process: the first call falls back, with a warning
                log.warning("t-SNE child process not started: %s", exc)

    # ------------------------------------------------------------------ API
    def submit(self, snap: EpochSnapshot) -> None:
        self._queue.put(("epoch", snap))

    def call(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` on the worker, in order with the epoch writes (e.g. a live snapshot)."""
        self._queue.put(("call", (fn, args)))

    def pending(self) -> int:
        return self._queue.qsize()

    def tracker_state(self) -> dict[str, Any] | None:
        return self.tracker.state_dict() if self.tracker is not None else None

    def doctor_state(self) -> dict[str, Any]:
        """What the doctor remembers across epochs (JSON-able), saved with each checkpoint."""
        return {
            "peak": dict(self._peak),
            "init": {layer: {str(u): k.tolist() for u, k in by_uid.items()}
                     for layer, by_uid in self._init.items()},
        }

    def flush_checkpoint(self) -> None:
        """Queue the write of the last committed epoch's held checkpoint (retention: a run's last epoch)."""
        self._queue.put(("call", (self._write_held, ())))

    def _write_held(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self.fatal:
            epoch, ckpt, arrays = held
            self.writer.write_checkpoint(epoch, to_bytes(ckpt, _record_lookup(arrays)))
            self.writer.sync()

    def close(self, timeout: float | None = None) -> None:
        """Finish every queued write, then stop the worker."""
        self._queue.put(("stop", None))
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker
    def _loop(self) -> None:
        lower_thread_priority()
        while True:
            kind, item = self._queue.get()
            if kind == "stop":
                if self._tsne_pool is not None:
                    self._tsne_pool.shutdown(wait=True)
                    self._tsne_pool = None
                return
            if kind == "epoch" and self.fatal:
                continue  # the store cannot be written: the trainer stops at its next batch
            try:
                with single_threaded_blas():
                    if kind == "epoch":
                        self._write_epoch(item)
                    else:
                        fn, args = item
                        fn(*args)
            except OSError as exc:
                if kind == "epoch" and exc.errno in _FATAL_ERRNOS:
                    self.fatal = self._fatal_message(item.epoch, exc)
                    continue
                msg = f"{kind} failed: {type(exc).__name__}: {exc}"
                log.exception(msg)
                self.errors.append(msg)
            except Exception as exc:  # never kill training
                msg = f"{kind} failed: {type(exc).__name__}: {exc}"
                log.exception(msg)
                self.errors.append(msg)

    def _fatal_message(self, epoch: int, exc: OSError) -> str:
        run_id = self.writer.run_id
        c = self.committed
        kept = ("no epoch was committed" if not c else f"epoch {c[0]} is committed and intact"
                if len(c) == 1 else f"epochs {c[0]}..{c[-1]} are committed and intact")
        return (f"Cannot write epoch {epoch} of run {run_id} to the store: {exc.strerror or exc} "
                f"({exc.filename or self.writer.layout.root}). Training stopped; {kept}. "
                f"Free space, then `revacnn resume {run_id}`")

    def _write_epoch(self, snap: EpochSnapshot) -> None:
        from .. import analysis

        epoch = snap.epoch
        arrays: dict[str, dict[str, Any]] = {}
        layer_rows: list[dict[str, Any]] = []
        filter_rows: dict[str, list[Any]] = {k: [] for k in _FILTER_COLS}
        diag_rows: list[dict[str, Any]] = []
        lr = snap.metrics.get("lr")
        trained = bool(snap.metrics.get("n_batches"))  # epoch 0 and a fork point train nothing
        # The t-SNE embeddings (most of the worker's time) run on their own thread while this one
        # derives the measures and the doctor's findings; they are joined before anything is written.
        conv_sigs = self._signatures(snap)
        tsne = self._start_embeddings(snap, conv_sigs)
        for L in snap.layers:
            F = len(L.uids)
            if L.kind == "conv":
                k = np.moveaxis(L.kernel, -1, 0)  # (F, kh, kw, c_in)
            else:
                k = L.kernel.T  # (units, in)
            flat = k.reshape(F, -1)
            if L.bias is not None:
                flat_b = np.concatenate([flat, L.bias[:, None]], axis=1)
            else:
                flat_b = flat
            weight_l2 = np.sqrt((flat_b.astype(np.float64) ** 2).sum(axis=1))
            prev = self._prev.get(L.name, {})
            change = np.zeros(F, dtype=np.float64)
            for i, uid in enumerate(L.uids.tolist()):
                p = prev.get(uid)
                if p is not None and p.shape == flat_b[i].shape:
                    change[i] = np.abs(flat_b[i].astype(np.float64) - p).sum()
            self._prev[L.name] = {
                int(u): flat_b[i].astype(np.float64) for i, u in enumerate(L.uids.tolist())
            }
            row: dict[str, Any] = {
                "run_id": self.writer.run_id,
                "epoch": epoch,
                "layer": L.name,
                "kind": L.kind,
                "n_filters": F,
                "frozen": bool(L.layer_frozen),
                "n_frozen_filters": int(L.frozen_mask.sum()),
                "grad_l1": float(L.grad_l1.sum()),
                "weight_l2": float(np.sqrt((weight_l2**2).sum())),
                "layer_index": L.index,
                "weight_change_l1": float(change.sum()),
                "n_params": int(flat_b.size),
            }
            entry: dict[str, Any] = {
                "bias": L.bias if L.bias is not None else np.zeros(F, np.float32),
                "grad_l1": L.grad_l1.astype(np.float32),
                "weight_change_l1": change.astype(np.float32),
                "weight_l2": weight_l2.astype(np.float32),
                "filter_uids": L.uids.astype(np.int64),
                "frozen": L.frozen_mask.astype(np.uint8),
                "_attrs": {"kind": L.kind, "index": L.index, "frozen": bool(L.layer_frozen)},
                **L.extra,
            }
            if L.kind == "conv":
                entry["kernel"] = k.astype(np.float32)
                acts = np.moveaxis(L.activations, -1, 1) if L.activations is not None else None  # (P,F,H,W)
                score = _safe(lambda: analysis.cluster_score(flat))  # noqa: B023
                diag_rows += self._diagnose(epoch, L, k, prev if trained else {}, acts, lr, trained, score)
                act_mean = acts.mean(axis=(0, 2, 3)) if acts is not None else np.full(F, np.nan)
                act_max = acts.max(axis=(0, 2, 3)) if acts is not None else np.full(F, np.nan)
                if acts is not None:
                    entry["activations"] = acts.astype(np.float16)
                entry["act_mean"] = act_mean.astype(np.float32)
                row["act_mean"] = float(np.mean(act_mean))
                row["cluster_score"] = score
                shares = dom = None
                if L.rgb_input and k.shape[-1] == 3:
                    shares = analysis.rgb_shares(k)
                    dom = analysis.dominant_channel(shares)
                    row["rgb_mono_fraction"] = float(np.mean(dom >= 0))
                for i in range(F):
                    filter_rows["layer"].append(L.name)
                    filter_rows["filter"].append(i)
                    filter_rows["filter_uid"].append(int(L.uids[i]))
                    filter_rows["frozen"].append(bool(L.frozen_mask[i]))
                    filter_rows["grad_l1"].append(float(L.grad_l1[i]))
                    filter_rows["weight_l2"].append(float(weight_l2[i]))
                    filter_rows["weight_change_l1"].append(float(change[i]))
                    filter_rows["act_mean"].append(float(act_mean[i]))
                    filter_rows["act_max"].append(float(act_max[i]))
                    filter_rows["dominant_channel"].append(None if dom is None else int(dom[i]))
                    for c, key in enumerate(("share_r", "share_g", "share_b")):
                        filter_rows[key].append(None if shares is None else float(shares[i, c]))
            arrays[L.name] = entry
            layer_rows.append(row)

        embeddings, layer_xy = tsne.result() if tsne is not None else ({}, {})
        for source, key, col in ((embeddings, "embedding", "tsne"), (layer_xy, "layer_embedding", "layer_tsne")):
            xs: list[Any] = []
            ys: list[Any] = []
            for L in snap.layers:
                if L.kind != "conv":
                    continue
                xy = source.get(L.name)
                if xy is None:
                    xy = np.full((len(L.uids), 2), np.nan, np.float32)
                arrays[L.name][key] = xy
                xs.extend(_nan_none(v) for v in xy[:, 0])
                ys.extend(_nan_none(v) for v in xy[:, 1])
            filter_rows[f"{col}_x"] = xs
            filter_rows[f"{col}_y"] = ys
        n_rows = len(filter_rows["layer"])
        filter_rows["run_id"] = [self.writer.run_id] * n_rows
        filter_rows["epoch"] = [epoch] * n_rows

        probs = np.asarray(snap.probabilities, np.float32)
        pred = probs.argmax(axis=1)
        pred_rows = {
            "run_id": [self.writer.run_id] * len(pred),
            "epoch": [epoch] * len(pred),
            "probe": list(range(len(pred))),
            "predicted": pred.tolist(),
            "confidence": probs.max(axis=1).astype(np.float64).tolist(),
            "label": snap.probe_labels.astype(int).tolist(),
            "correct": (pred == snap.probe_labels).tolist(),
        }
        w = self.writer
        t_write = time.perf_counter()
        held = None
        if snap.checkpoint is not None:
            snap.checkpoint.state["tracker"] = _copy_state(self.tracker_state())
            snap.checkpoint.state["doctor"] = _copy_state(self.doctor_state())
            if snap.write_checkpoint:
                w.write_checkpoint(epoch, to_bytes(snap.checkpoint, _record_lookup(arrays)))
            else:
                held = (epoch, snap.checkpoint, arrays)
        w.write_arrays(epoch, arrays, {"metrics": _jsonable(snap.metrics)}, extra={"predictions": probs})
        w.write_rows("layers", epoch, layer_rows)
        w.write_rows("filters", epoch, filter_rows)
        w.write_rows("predictions", epoch, pred_rows)
        w.write_rows("diagnoses", epoch, diag_rows)
        w.commit(epoch, snap.metrics)
        self._held = held
        self.write_s.append(time.perf_counter() - t_write)
        self.committed.append(epoch)
        self.last_commit_at = time.time()


    def _signatures(self, snap: EpochSnapshot) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """Each conv layer's activation signatures (the layer-level embedding's features)."""
        from .. import analysis

        out = []
        if self.tracker is None:
            return out
        for L in snap.layers:
            if L.kind == "conv" and L.activations is not None:
                sig = analysis.activation_signature(np.moveaxis(L.activations, -1, 1))
                # per-layer scale, so that layers do not separate by activation magnitude alone
                sig = sig / (float(np.abs(sig).max()) + 1e-12)
                out.append((L.name, L.uids, sig))
        return out

    def _start_embeddings(self, snap: EpochSnapshot,
                          conv_sigs: list[tuple[str, np.ndarray, np.ndarray]]) -> Future[Any] | None:
        """Start the epoch's t-SNE embeddings on the embedding thread (in the order they always ran)."""
        if self.tracker is None:
            return None
        if self._tsne_pool is None:
            self._tsne_pool = ThreadPoolExecutor(1, thread_name_prefix="revacnn-tsne",
                                                 initializer=lower_thread_priority)
        return self._tsne_pool.submit(self._embed_epoch, snap, conv_sigs)

    def _embed_epoch(self, snap: EpochSnapshot, conv_sigs: list[tuple[str, np.ndarray, np.ndarray]],
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Every conv layer's embedding, then the layer-level one; a failing one is NaN, logged."""

        with single_threaded_blas():
            return self._embed_all(snap, conv_sigs)

    def _embed_all(self, snap: EpochSnapshot, conv_sigs: list[tuple[str, np.ndarray, np.ndarray]],
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        from .. import analysis

        tracker = self.tracker
        assert tracker is not None
        epoch = snap.epoch
        embeddings: dict[str, np.ndarray] = {}
        items: list[tuple[str, np.ndarray, np.ndarray, dict[int, int] | None]] = []
        for L in snap.layers:
            if L.kind != "conv":
                continue
            try:
                if self.embedding_features != "gradients":
                    acts = np.moveaxis(L.activations, -1, 1) if L.activations is not None else None
                    feats = analysis.filter_features(self.embedding_features, kernel=np.moveaxis(L.kernel, -1, 0),
                                                     activations=acts, grad=None)
                else:
                    feats = L.grad_l1[:, None]
                items.append((L.name, L.uids, np.asarray(feats, np.float64), snap.parents.get(L.name)))
            except Exception as exc:
                log.warning("embedding of %s epoch %d failed: %s", L.name, epoch, exc)
                self.errors.append(f"embedding {L.name} epoch {epoch}: {exc}")
        # All layers in one call (layers of one size share a vectorised optimisation); when one
        # of them fails, each layer on its own, so that only the failing one is missing.
        try:
            for (name, *_), xy in zip(items, tracker.embed_many(items), strict=True):
                embeddings[name] = xy
        except Exception:
            for name, uids, feats, parents in items:
                try:
                    embeddings[name] = tracker.embed(name, uids, feats, parents=parents)
                except Exception as exc:
                    log.warning("embedding of %s epoch %d failed: %s", name, epoch, exc)
                    self.errors.append(f"embedding {name} epoch {epoch}: {exc}")
        # Layer level: every conv filter of every layer in one embedding, from activation signatures.
        layer_xy: dict[str, np.ndarray] = {}
        if conv_sigs:
            try:
                keys = np.concatenate([[_global_uid(i, u) for u in uids] for i, (_, uids, _) in enumerate(conv_sigs)])
                feats = np.concatenate([s for _, _, s in conv_sigs], axis=0)
                xy = tracker.embed("__all__", keys, feats.astype(np.float64)).astype(np.float32)
                start = 0
                for name, uids, _ in conv_sigs:
                    layer_xy[name] = xy[start : start + len(uids)]
                    start += len(uids)
            except Exception as exc:
                log.warning("layer-level embedding epoch %d failed: %s", epoch, exc)
                self.errors.append(f"layer-level embedding epoch {epoch}: {exc}")
        return embeddings, layer_xy

    def _diagnose(self, epoch: int, L: LayerSnapshot, k: np.ndarray, prev: dict[int, np.ndarray],
                  acts: np.ndarray | None, lr: Any, trained: bool,
                  cluster: float | None = None) -> list[dict[str, Any]]:
        """The doctor's findings for one conv layer, as ``diagnoses`` rows; never raises.

        A record that trained nothing (epoch 0, a fork point) has no epoch-over-epoch change to
        judge, so `converged` is not asked there; nor is the gradient part of `dead`.
        """
        from ..analysis.doctor import LayerArrays, diagnose_layer, relative_change

        try:
            uids = [int(u) for u in L.uids.tolist()]
            sees_rgb = bool(L.rgb_input and k.shape[-1] == 3)
            init_kernel = None
            if sees_rgb:
                init = self._init.setdefault(L.name, {})
                for i, u in enumerate(uids):
                    init.setdefault(u, k[i].astype(np.float32))
                init_kernel = np.stack([init[u] for u in uids])
            flat_prev = [prev.get(u) for u in uids]
            prev_kernel = None
            if flat_prev and all(p is not None and p.size == k[0].size + (L.bias is not None) for p in flat_prev):
                prev_kernel = np.stack([p[: k[0].size] for p in flat_prev]).reshape(k.shape)
            prev_acts = None
            old = self._prev_acts.get(L.name)
            if trained and old is not None and acts is not None and np.array_equal(old[0], L.uids):
                prev_acts = old[1]
            if acts is not None:
                self._prev_acts[L.name] = (L.uids.copy(), acts.astype(np.float32))
            arrays = LayerArrays(
                name=L.name, kernel=k, bias=L.bias, activations=acts,
                grad_l1=L.grad_l1 if trained and float(np.sum(L.grad_l1)) > 0 else None,
                uids=uids, prev_kernel=prev_kernel, prev_activations=prev_acts,
                init_kernel=init_kernel, frozen=bool(L.layer_frozen), sees_rgb=sees_rgb,
                lr=float(lr) if isinstance(lr, (int, float)) else None,
                peak_change=self._peak.get(L.name),
                cluster_score=cluster,  # the layers table's, computed once (same kernel rows)
            )
            if prev_kernel is not None:
                change = relative_change(k, prev_kernel)
                if np.isfinite(change):
                    self._peak[L.name] = max(self._peak.get(L.name, 0.0), change)
            rows = []
            for d in diagnose_layer(arrays):
                row = d.to_row()
                row["suggestion"] = None if d.suggestion is None else json.dumps(d.suggestion)
                rows.append({"run_id": self.writer.run_id, "epoch": epoch, **row})
            return rows
        except Exception as exc:  # a failing diagnosis never stops the record
            log.warning("diagnosis of %s epoch %d failed: %s", L.name, epoch, exc)
            self.errors.append(f"diagnosis {L.name} epoch {epoch}: {exc}")
            return []


#: write errors that mean the store cannot take the record: training stops as `failed`
_FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}

_FILTER_COLS = (
    "layer",
    "filter",
    "filter_uid",
    "frozen",
    "grad_l1",
    "weight_l2",
    "weight_change_l1",
    "act_mean",
    "act_max",
    "tsne_x",
    "tsne_y",
    "dominant_channel",
    "share_r",
    "share_g",
    "share_b",
)


#: How many ``nice`` steps below training the worker threads run (Linux threads have their own),
#: from ``REVACNN_WORKER_NICE``; 0 (the default) leaves them equal. On a machine of its own, 5
#: lets training keep the cores while the worker writes the previous epoch; on a shared machine
#: it queues the worker behind every other job (measured at load 19 on 2 cores: 1.2 s of worker
#: CPU took 20 s to commit), so it is not the default.
WORKER_NICE = int(os.environ.get("REVACNN_WORKER_NICE", "0") or 0)


def lower_thread_priority(nice: int | None = None) -> bool:
    """Run the calling thread ``nice`` steps below the main thread's CPU priority, so training keeps the cores.

    The recording worker and its embedding thread call it: on 2 cores they otherwise take time
    slices from the training thread as an equal. Only the calling thread changes (Linux gives
    each thread its own nice value); elsewhere, or where refused, nothing happens.

    Args:
        nice: steps below the main thread; None: `WORKER_NICE`.

    Returns:
        Whether the priority was lowered.

    Example:
        >>> import threading
        >>> t = threading.Thread(target=lower_thread_priority); t.start(); t.join()
    """
    nice = WORKER_NICE if nice is None else int(nice)
    if nice <= 0 or not hasattr(os, "setpriority") or not sys.platform.startswith("linux"):
        return False
    try:
        tid = threading.get_native_id()
        target = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + nice)  # relative to the main thread
        if os.getpriority(os.PRIO_PROCESS, tid) < target:  # (a thread started by a lowered one inherits it)
            os.setpriority(os.PRIO_PROCESS, tid, target)
        return True
    except OSError:
        return False


_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter: Any = None
_blas_controller: Any = None


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """numpy's BLAS (OpenBLAS, MKL) on one thread while the recording worker's threads compute.

    The worker's matrix products are small (a layer's 64 filters, 16 probes): a multi-threaded
    BLAS spends more time waking and spinning its threads than computing, and the spinning takes
    the cores from training. Measured on the 2-core machine: a (64 x 576) Gram matrix 1.36 ms
    wall, 0.83 ms CPU with OpenBLAS' 2 threads, 0.24 / 0.14 ms with one. The limit is process-wide
    (BLAS has no per-thread setting), held while any worker thread is inside, and restored when
    the last one leaves; TensorFlow's own thread pools are not affected. Without threadpoolctl,
    nothing changes.

    Example:
        >>> with single_threaded_blas():
        ...     _ = np.ones((4, 4)) @ np.ones((4, 4))
    """
    global _blas_users, _blas_limiter, _blas_controller
    with _blas_lock:
        _blas_users += 1
        if _blas_users == 1:
            try:
                if _blas_controller is None:
                    from threadpoolctl import ThreadpoolController

                    _blas_controller = ThreadpoolController()
                _blas_limiter = _blas_controller.limit(limits=1, user_api="blas")
            except Exception:  # no threadpoolctl, or a BLAS it cannot drive: leave it
                _blas_limiter = None
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0 and _blas_limiter is not None:
                try:
                    _blas_limiter.restore_original_limits()
                finally:
                    _blas_limiter = None


def _global_uid(layer_index: int, uid: int) -> int:
    return layer_index * 1_000_000 + int(uid)


def _nan_none(v: Any) -> float | None:
    f = float(v)
    return None if np.isnan(f) else f


def _safe(fn: Any) -> float | None:
    try:
        v = float(fn())
        return None if np.isnan(v) else v
    except Exception as exc:
        log.warning("measure failed: %s", exc)
        return None


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, np.generic):
            v = v.item()
        if hasattr(v, "isoformat"):
            v = v.isoformat()
        if isinstance(v, float) and np.isnan(v):
            v = None
        out[k] = v
    return out


def _copy_state(state: Any) -> Any:
    """A deep, JSON-able copy of a tracker or doctor state (a held checkpoint must not see later epochs)."""
    if state is None:
        return None
    return json.loads(json.dumps(state, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _record_lookup(arrays: dict[str, dict[str, Any]]) -> Any:
    """``record(layer, key)`` over the arrays an epoch record is written from (None where absent)."""

    def record(layer: str, key: str) -> np.ndarray | None:
        v = arrays.get(layer, {}).get(key)
        return None if v is None else np.asarray(v)

    return record
