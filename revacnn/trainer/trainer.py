"""The recording trainer: a batch loop over a compiled step that records every epoch and obeys steering."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ..config import TrainConfig
from ..errors import StoreWriteError
from ..models import weighted_layers
from ..storage import RunWriter, Store
from .autofreeze import AutoFreezer
from .checkpoint import capture
from .recorder import EpochSnapshot, LayerSnapshot, Recorder
from .step import LayerSpec, StepState, build_eval_step, build_probe_step, build_train_step

log = logging.getLogger("revacnn.trainer")

EVAL_BATCH = 500


@dataclass
class TrainData:
    """Training and validation arrays (uint8 images, integer labels)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray


@dataclass
class TrainerState:
    """The trainer's own state, saved in every checkpoint.

    Attributes:
        epoch: the last recorded epoch.
        uids: per weighted layer, the stable uid of each filter (unit), in index order.
        next_uid: per layer, the next uid to hand out.
        frozen_layers: layers left out of the gradient computation.
        frozen_filters: per layer, uids of single frozen filters.
        cumulative_time_s: training seconds of this run's full history up to ``epoch``.
        convergence_peak: per conv layer, its largest relative weight change per epoch so far
            (``--auto-freeze`` judges convergence against it).
    """

    epoch: int = 0
    uids: dict[str, list[int]] = field(default_factory=dict)
    next_uid: dict[str, int] = field(default_factory=dict)
    frozen_layers: list[str] = field(default_factory=list)
    frozen_filters: dict[str, list[int]] = field(default_factory=dict)
    cumulative_time_s: float = 0.0
    convergence_peak: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "uids": self.uids,
            "next_uid": self.next_uid,
            "frozen_layers": list(self.frozen_layers),
            "frozen_filters": self.frozen_filters,
            "cumulative_time_s": self.cumulative_time_s,
            "convergence_peak": dict(self.convergence_peak),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainerState:
        return cls(
            epoch=int(d.get("epoch", 0)),
            uids={k: [int(u) for u in v] for k, v in d.get("uids", {}).items()},
            next_uid={k: int(v) for k, v in d.get("next_uid", {}).items()},
            frozen_layers=list(d.get("frozen_layers", [])),
            frozen_filters={k: [int(u) for u in v] for k, v in d.get("frozen_filters", {}).items()},
            cumulative_time_s=float(d.get("cumulative_time_s", 0.0)),
            convergence_peak={k: float(v) for k, v in d.get("convergence_peak", {}).items()},
        )


class Trainer:
    """Trains a Keras model batch by batch, records every epoch into a store, and obeys steering.

    Use `revacnn.fit` or the CLI rather than this class directly.
    """

    def __init__(
        self,
        *,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        loss_fn: Any,
        data: TrainData,
        probe_images: np.ndarray,
        probe_labels: np.ndarray,
        writer: RunWriter,
        config: TrainConfig,
        state: TrainerState | None = None,
        tracker_state: dict[str, Any] | None = None,
        doctor_state: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.data = data
        self.config = config
        self.writer = writer
        self.store: Store = writer.store
        self.run_id = writer.run_id
        self.progress = progress
        self.probe_images = np.asarray(probe_images, np.uint8)
        self.probe_labels = np.asarray(probe_labels)
        self.state = state or TrainerState()
        for layer in weighted_layers(model):
            if layer.name not in self.state.uids:
                n = int(layer.kernel.shape[-1])
                self.state.uids[layer.name] = list(range(n))
                self.state.next_uid[layer.name] = n
        self.rgb_first = model.input_shape[-1] == 3
        self._x = tf.constant(np.asarray(data.x_train, np.uint8))
        self._y = tf.constant(np.asarray(data.y_train, np.int32))
        self._xv = np.asarray(data.x_val, np.uint8)
        self._yv = np.asarray(data.y_val, np.int32)
        self.recorder = Recorder(
            writer,
            embeddings=config.embeddings,
            embedding_features=config.embedding_features,
            tracker_state=tracker_state,
            doctor_state=doctor_state,
            seed=config.seed,
        )
        self.paused = False
        self.stop_requested = False
        self.batch = 0
        self.n_batches = 0
        self.batch_history: list[tuple[int, int, float, float, float]] = []
        self._last_live = 0.0  # wall clock of the last live snapshot (time.time)
        self._t_live = time.perf_counter()  # its monotonic twin; the live period spans epochs
        self._pending_parents: dict[str, dict[int, int]] = {}
        from ..steering.channel import CommandQueue

        self.commands = CommandQueue(self.store, self.run_id)
        self.auto_freezer = AutoFreezer() if config.auto_freeze else None
        self.rebuild()

    # ------------------------------------------------------------------ structure
    def rebuild(self, *, carry: bool = False) -> None:
        """(Re)trace the compiled steps for the current model, frozen sets and variables.

        With ``carry``, the epoch's running sums (metrics, per-filter grad L1 by uid) survive.
        """
        saved = None
        if carry and hasattr(self, "step_state"):
            old = self.step_state
            saved = (
                {k: dict(zip(self._acc_uids[k], v.numpy().tolist(), strict=False)) for k, v in old.grad_l1.items()},
                old.loss_sum.numpy(), old.correct.numpy(), old.seen.numpy(),
            )
        specs = []
        for layer in weighted_layers(self.model):
            frozen_uids = set(self.state.frozen_filters.get(layer.name, []))
            mask = None
            if frozen_uids:
                mask = np.array([u in frozen_uids for u in self.state.uids[layer.name]], bool)
            specs.append(LayerSpec(layer, layer.name in self.state.frozen_layers, mask))
        self.specs = specs
        self.step_state = StepState(specs)
        self._step = build_train_step(
            self.model, self.optimizer, self.loss_fn, self._x, self._y, specs, self.step_state
        )
        self._eval = build_eval_step(self.model, self.loss_fn)
        self._probe = build_probe_step(self.model)
        self._acc_uids = {name: list(self.state.uids[name]) for name in self.step_state.grad_l1}
        if saved is not None:
            grads, loss_sum, correct, seen = saved
            for name, var in self.step_state.grad_l1.items():
                by_uid = grads.get(name, {})
                var.assign(np.array([by_uid.get(u, 0.0) for u in self.state.uids[name]], np.float32))
            self.step_state.loss_sum.assign(loss_sum)
            self.step_state.correct.assign(correct)
            self.step_state.seen.assign(seen)

    def swap(self, result: Any) -> None:
        """Adopt the model and optimizer of a surgery result, remapping filter uids, then re-trace.

        A group change (`GraphSurgeryResult.changed`) remaps every layer whose filters changed:
        kept filters keep their uids, new ones get the layer's next uids.
        """
        changed = getattr(result, "changed", None) or {result.layer: result.kept}
        for name, kept in changed.items():
            if name not in self.state.uids:
                continue
            old_uids = self.state.uids[name]
            new_uids = []
            for k in np.asarray(kept).tolist():
                if k >= 0:
                    new_uids.append(old_uids[k])
                else:
                    new_uids.append(self.state.next_uid[name])
                    self.state.next_uid[name] += 1
            self.state.uids[name] = new_uids
            if name in self.state.frozen_filters:
                live = set(new_uids)
                self.state.frozen_filters[name] = [u for u in self.state.frozen_filters[name] if u in live]
        self.model = result.model
        self.optimizer = result.optimizer
        self.rebuild(carry=True)

    def frozen_mask(self, layer_name: str) -> np.ndarray:
        uids = self.state.uids[layer_name]
        if layer_name in self.state.frozen_layers:
            return np.ones(len(uids), bool)
        fz = set(self.state.frozen_filters.get(layer_name, []))
        return np.array([u in fz for u in uids], bool)

    @property
    def lr(self) -> float:
        return float(np.asarray(self.optimizer.learning_rate))

    # ------------------------------------------------------------------ recording
    def evaluate(self) -> tuple[float, float]:
        """Validation loss and accuracy."""
        n = len(self._yv)
        if n == 0:
            return float("nan"), float("nan")
        loss = 0.0
        hits = 0
        for i in range(0, n, EVAL_BATCH):
            batch_loss, h = self._eval(self._xv[i : i + EVAL_BATCH], self._yv[i : i + EVAL_BATCH])
            loss += float(batch_loss)
            hits += int(h)
        return loss / n, hits / n

    def probe(self) -> tuple[list[np.ndarray], np.ndarray]:
        outs, probs = self._probe(self.probe_images)
        return [o.numpy() for o in outs], probs.numpy()

    def snapshot(self, epoch: int, metrics: dict[str, Any], *, checkpoint: bool = True) -> EpochSnapshot:
        """Copy what the epoch record needs out of the model (fast; the worker does the rest)."""
        acts, probs = self.probe()
        grads = self.step_state.take_grad_l1()
        layers = []
        ci = 0
        for idx, layer in enumerate(weighted_layers(self.model)):
            is_conv = isinstance(layer, keras.layers.Conv2D)
            name = layer.name
            layers.append(
                LayerSnapshot(
                    name=name,
                    kind="conv" if is_conv else "dense",
                    index=idx,
                    kernel=layer.kernel.numpy(),
                    bias=layer.bias.numpy() if layer.bias is not None else None,
                    grad_l1=grads.get(name, np.zeros(int(layer.kernel.shape[-1]), np.float32)),
                    uids=np.asarray(self.state.uids[name], np.int64),
                    frozen_mask=self.frozen_mask(name),
                    layer_frozen=name in self.state.frozen_layers,
                    activations=acts[ci] if is_conv else None,
                    rgb_input=is_conv and ci == 0 and self.rgb_first,
                )
            )
            ci += int(is_conv)
        ckpt = None
        if checkpoint:
            self.state.epoch = epoch
            ckpt = capture(self.model, self.optimizer, {"trainer": self.state.to_dict(), "config": self.config.to_dict()})
        parents, self._pending_parents = self._pending_parents, {}
        return EpochSnapshot(
            epoch=epoch,
            metrics=metrics,
            layers=layers,
            probabilities=probs,
            probe_labels=self.probe_labels,
            checkpoint=ckpt,
            parents=parents,
        )

    def record(self, epoch: int, *, train_loss: float | None, train_acc: float | None, duration: float,
               n_batches: int) -> None:
        val_loss, val_acc = self.evaluate()
        metrics = {
            "loss": train_loss,
            "accuracy": train_acc,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "lr": self.lr,
            "duration_s": duration,
            "cumulative_time_s": self.state.cumulative_time_s,
            "n_batches": n_batches,
            "step": int(np.asarray(self.optimizer.iterations)),
        }
        if self.auto_freezer is not None and n_batches:
            # before the snapshot: the epoch's record and checkpoint already hold the freeze
            self.auto_freezer.check(self, epoch, n_batches)
        self.recorder.submit(self.snapshot(epoch, metrics))

    # ------------------------------------------------------------------ loop
    def order(self, epoch: int) -> np.ndarray:
        """The data order of ``epoch``: a permutation fixed by (seed, epoch), so forks replay it."""
        return np.random.default_rng([int(self.config.seed), int(epoch)]).permutation(len(self.data.y_train)).astype(np.int32)

    def run(self, *, start_epoch: int, epochs: int, record_start: bool = True,
            start_train_metrics: tuple[float | None, float | None] = (None, None)) -> str:
        """Record ``start_epoch`` (if asked), then train epochs ``start_epoch+1 .. epochs``.

        Returns:
            The final status: ``finished``, ``stopped`` or ``failed``.
        """
        status = "failed"
        message = None
        try:
            if self.auto_freezer is not None:
                self.auto_freezer.prime(self)  # the model as it starts is "the previous epoch"
            if record_start:
                loss0, acc0 = start_train_metrics
                self.record(start_epoch, train_loss=loss0, train_acc=acc0, duration=0.0, n_batches=0)
            for epoch in range(start_epoch + 1, epochs + 1):
                if not self._train_epoch(epoch):
                    status = "stopped"
                    break
            else:
                status = "finished"
            self.recorder.close()  # the last epochs' writes must have succeeded too
            self._check_store()
        except KeyboardInterrupt:
            status, message = "stopped", "interrupted by the user (Ctrl-C)"
            raise
        except StoreWriteError as exc:
            status, message = "failed", str(exc)
            raise
        except Exception as exc:
            status, message = "failed", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.recorder.close()
            if self.recorder.errors and message is None:
                message = "; ".join(self.recorder.errors[-3:])
            if not self.recorder.fatal:  # a full disk would fail compaction too
                try:
                    self.writer.compact()
                except Exception:
                    log.exception("compaction failed")
            try:
                self.writer.set_status(status, message)
            except OSError as exc:
                log.error("status of %s not written: %s", self.run_id, exc)
        return status

    def _check_store(self) -> None:
        """Raise `StoreWriteError` once the recorder found the store unwritable (a full disk)."""
        if self.recorder.fatal:
            raise StoreWriteError(self.recorder.fatal)

    def _train_epoch(self, epoch: int) -> bool:
        order = self.order(epoch)
        bs = self.config.batch_size
        n = len(order)
        self.n_batches = nb = (n + bs - 1) // bs
        self.step_state.reset_metrics()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=nb, desc=f"epoch {epoch}/{self.config.epochs}", unit="batch", leave=True,
                       file=sys.stderr, dynamic_ncols=True)
        live_every = self.config.live_every_s
        train_time = 0.0
        t0 = time.perf_counter()
        self.epoch_in_progress = epoch
        try:
            for b in range(nb):
                self.batch = b
                self._between_batches(epoch, b)
                if self.stop_requested:
                    return False
                t_step = time.perf_counter()
                self._step(order[b * bs : (b + 1) * bs])
                train_time += time.perf_counter() - t_step
                if bar is not None and (b % 10 == 0 or b == nb - 1):
                    bar.update(b + 1 - bar.n)
                    seen = max(int(self.step_state.seen.numpy()), 1)
                    bar.set_postfix(loss=f"{float(self.step_state.loss_sum.numpy()) / seen:.4f}",
                                    acc=f"{int(self.step_state.correct.numpy()) / seen:.3f}", refresh=False)
                # The period spans epochs: a wall-clock clock kept on the trainer, not per epoch,
                # so epochs shorter than ``live_every_s`` still publish.
                if live_every and time.perf_counter() - self._t_live >= live_every:
                    self._publish_live(epoch, b + 1, nb)
                self.writer.heartbeat()
        finally:
            if bar is not None:
                bar.close()
        self.batch = nb
        self._between_batches(epoch, nb)  # commands sent during the last batch apply before the record
        if live_every:
            self._publish_live(epoch, nb, nb)  # one at every epoch's end: the page never lags the record
        del t0
        seen = max(int(self.step_state.seen.numpy()), 1)
        train_loss = float(self.step_state.loss_sum.numpy()) / seen
        train_acc = int(self.step_state.correct.numpy()) / seen
        self.state.cumulative_time_s += train_time
        self.record(epoch, train_loss=train_loss, train_acc=train_acc, duration=train_time, n_batches=nb)
        return not self.stop_requested

    def _between_batches(self, epoch: int, batch: int) -> None:
        """Apply pending steering commands; while paused, wait here (still answering commands)."""
        from .steer import apply_pending

        self._check_store()
        apply_pending(self, epoch, batch)
        while self.paused and not self.stop_requested:
            self.writer.heartbeat(paused=True)
            time.sleep(0.05)
            apply_pending(self, epoch, batch)
            self._publish_live(epoch, batch, self.n_batches, throttle=True)

    # ------------------------------------------------------------------ live
    def _publish_live(self, epoch: int, batch: int, n_batches: int, *, throttle: bool = False) -> None:
        if throttle and time.time() - self._last_live < max(self.config.live_every_s, 0.5):
            return
        self._last_live = time.time()
        self._t_live = time.perf_counter()
        seen = int(self.step_state.seen.numpy())
        loss = float(self.step_state.loss_sum.numpy()) / max(seen, 1)
        acc = int(self.step_state.correct.numpy()) / max(seen, 1)
        self.batch_history.append((epoch, batch, loss, acc, time.time()))
        del self.batch_history[:-5000]
        acts, probs = self.probe()
        kernels = {}
        for layer in weighted_layers(self.model):
            if isinstance(layer, keras.layers.Conv2D):
                kernels[layer.name] = np.moveaxis(layer.kernel.numpy(), -1, 0)
        from ..storage.live import write_live_snapshot

        meta = {
            "run_id": self.run_id,
            "epoch": epoch,
            "batch": batch,
            "n_batches": n_batches,
            "lr": self.lr,
            "paused": self.paused,
            "frozen_layers": list(self.state.frozen_layers),
            "uids": self.state.uids,
            "frozen_filters": self.state.frozen_filters,
            "published_at": time.time(),
        }
        conv_names = list(kernels)
        self.recorder.call(
            write_live_snapshot, self.store, self.run_id, meta, kernels,
            {n: np.moveaxis(a, -1, 1).astype(np.float16) for n, a in zip(conv_names, acts, strict=False)},
            probs, list(self.batch_history),
        )
