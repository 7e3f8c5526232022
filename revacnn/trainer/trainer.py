"""The recording trainer: a batch loop over a compiled step that records every epoch and obeys steering."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from ..config import TrainConfig
from ..errors import ConfigError, StoreWriteError
from ..models.graph import RecordedLayer, recorded_layers
from ..storage import RunWriter, Store
from .autofreeze import AutoFreezer
from .checkpoint import capture
from .recorder import EpochSnapshot, LayerSnapshot, Recorder
from .sources import ArraySource, Source, as_source
from .step import (
    ANNEAL_IDLE,
    LayerSpec,
    StepCache,
    StepState,
    as_probabilities,
    build_eval_step,
    build_probe_step,
)

log = logging.getLogger("revacnn.trainer")

EVAL_BATCH = 500

LIVE_CPU_SHARE = 0.05
"""At most this share of the time goes into live snapshots: each one's cost (the probe pass,
copies on the training thread, the worker's write) spaces the next one by cost / share, so a
large model's snapshots come less often than ``live_every_s`` (resnet20 on 2 cores: ~0.25 s each,
so every ~5 s) while a small one's keep the period. One at every epoch's end is always written."""


@dataclass
class TrainData:
    """Training and validation data as the user gave it (see `revacnn.trainer.sources`).

    Example:
        >>> data = TrainData.arrays(x, y, x_val, y_val)
        >>> data = TrainData(as_source(train_ds, "data"), as_source(val_ds, "validation_data"))
    """

    train: Source
    val: Source | None = None

    @classmethod
    def arrays(cls, x: Any, y: Any, x_val: Any = None, y_val: Any = None) -> TrainData:
        val = ArraySource(x_val, y_val, "x_val") if x_val is not None and len(x_val) else None
        return cls(ArraySource(x, y, "x"), val)

    @classmethod
    def of(cls, data: Any, validation_data: Any = None) -> TrainData:
        """From what a user passes to ``fit``: arrays, datasets, or a `TrainData`."""
        if isinstance(data, TrainData):
            return data
        val = as_source(validation_data, "validation_data") if validation_data is not None else None
        return cls(as_source(data, "data"), val)


def ensure_compiled(model: keras.Model, optimizer: keras.optimizers.Optimizer, loss: Any = None) -> None:
    """Compile ``model`` with ``optimizer`` unless it already is; keep its own loss and metrics.

    An uncompiled model gets ``loss`` (default sparse categorical cross-entropy).
    """
    if getattr(model, "compiled", False) and getattr(model, "optimizer", None) is optimizer:
        return
    if getattr(model, "compiled", False) and getattr(model, "_compile_loss", None) is not None:
        cc = model.get_compile_config()
        cfg = keras.saving.deserialize_keras_object({k: v for k, v in cc.items() if k != "optimizer"})
        model.compile(optimizer=optimizer, **cfg)
        return
    model.compile(optimizer=optimizer, loss=loss or keras.losses.SparseCategoricalCrossentropy())


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
        convergence_streak: per conv layer, how many epochs in a row it has read `converged`
            (``--auto-freeze`` waits for `AUTO_FREEZE_PATIENCE` of them).
        annealing: per conv layer that ``--auto-freeze`` is annealing, its window ``[start, end]``
            in optimizer iterations (its updates are scaled from 1 down to 0 over it, then it freezes).
    """

    epoch: int = 0
    uids: dict[str, list[int]] = field(default_factory=dict)
    next_uid: dict[str, int] = field(default_factory=dict)
    frozen_layers: list[str] = field(default_factory=list)
    frozen_filters: dict[str, list[int]] = field(default_factory=dict)
    cumulative_time_s: float = 0.0
    convergence_peak: dict[str, float] = field(default_factory=dict)
    convergence_streak: dict[str, int] = field(default_factory=dict)
    annealing: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "uids": self.uids,
            "next_uid": self.next_uid,
            "frozen_layers": list(self.frozen_layers),
            "frozen_filters": self.frozen_filters,
            "cumulative_time_s": self.cumulative_time_s,
            "convergence_peak": dict(self.convergence_peak),
            "convergence_streak": dict(self.convergence_streak),
            "annealing": {k: list(v) for k, v in self.annealing.items()},
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
            convergence_streak={k: int(v) for k, v in d.get("convergence_streak", {}).items()},
            annealing={k: [int(a), int(b)] for k, (a, b) in d.get("annealing", {}).items()},
        )


class Trainer:
    """Trains a Keras model batch by batch, records every epoch into a store, and obeys steering.

    The model trains as compiled: its own loss (`keras.Model.compute_loss`, regularisation
    included) and ``optimizer`` (built once over all trainable variables). Use `revacnn.fit` or
    the CLI rather than this class directly.
    """

    #: opt-in: add/delete-filters are prepared (new model built, steps traced) in a background
    #: thread while the old model trains, and swapped in at a later batch (`revacnn.trainer.steer`).
    #: Off by default: the contract applies a command at the next batch boundary, and on two
    #: loaded cores the preparation competes with training (sent -> applied grew 6.4 s -> 18.7 s).
    background_surgery: bool = False

    def __init__(
        self,
        *,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        data: TrainData,
        probe_images: np.ndarray,
        probe_labels: np.ndarray,
        writer: RunWriter,
        config: TrainConfig,
        loss_fn: Any = None,
        state: TrainerState | None = None,
        tracker_state: dict[str, Any] | None = None,
        doctor_state: dict[str, Any] | None = None,
        progress: bool = True,
        callbacks: Sequence[keras.callbacks.Callback] | None = None,
        strategy: Any = None,
        sync: Any = None,
    ) -> None:
        from .distribute import describe

        self.model = model
        self.optimizer = optimizer
        #: a tf.distribute strategy (None: one device); `sync` broadcasts commands across workers
        self.strategy = strategy
        self.sync = sync
        self.chief = describe(strategy)["task"] == 0
        with self.scope():
            ensure_compiled(model, optimizer, loss_fn)
            if not optimizer.built:
                optimizer.build(model.trainable_variables)
        self.data = data
        self.config = config
        self.writer = writer
        self.store: Store = writer.store
        self.run_id = writer.run_id
        self.progress = progress
        self.probe_images = np.asarray(probe_images)
        self.probe_labels = np.asarray(probe_labels)
        self.state = state or TrainerState()
        self.recs: list[RecordedLayer] = recorded_layers(model)
        for r in self.recs:
            if r.name not in self.state.uids:
                self.state.uids[r.name] = list(range(r.n_filters))
                self.state.next_uid[r.name] = r.n_filters
        self.user_callbacks = list(callbacks or [])
        self.callbacks = keras.callbacks.CallbackList(
            self.user_callbacks, add_history=False, add_progbar=False, model=model
        )
        self._batch_hooks = any(
            type(cb).on_train_batch_end is not keras.callbacks.Callback.on_train_batch_end
            or type(cb).on_train_batch_begin is not keras.callbacks.Callback.on_train_batch_begin
            for cb in self.user_callbacks
        )
        self.end_message: str | None = None
        if self.chief:
            self.recorder = Recorder(
                writer,
                embeddings=config.embeddings,
                embedding_features=config.embedding_features,
                tracker_state=tracker_state,
                doctor_state=doctor_state,
                seed=config.seed,
            )
        else:  # a worker other than the chief records nothing; its heartbeat reports its replicas
            from .distribute import NullRecorder, worker_state

            self.recorder = NullRecorder()
            self.applied: list[list[Any]] = []  # [command id, op, epoch, batch] of every command applied
            if hasattr(writer, "state_fn"):
                writer.state_fn = lambda: worker_state(self)
        self._init_loop_state()
        self.auto_freezer = AutoFreezer() if config.auto_freeze else None
        self.rebuild()

    def _init_loop_state(self) -> None:
        """The per-run loop state both drivers share (this batch loop and the Keras callback's)."""
        from ..steering.channel import CommandQueue

        self.paused = False
        self.stop_requested = False
        self.batch = 0
        self.n_batches = 0
        self.batch_history: list[tuple[int, int, float, float, float]] = []
        self._last_live = 0.0  # wall clock of the last live snapshot (time.time)
        self._t_live = time.perf_counter()  # its monotonic twin; the live period spans epochs
        self._live_gap = 0.0  # the least spacing of live snapshots their cost allows (LIVE_CPU_SHARE)
        self._live_write_s = 0.0  # the worker's CPU seconds for the last live snapshot's write
        self._anneal_windows: dict[str, Any] = {}  # conv layer -> its annealing-window variable
        self._pending_parents: dict[str, dict[int, int]] = {}
        self.commands = CommandQueue(self.store, self.run_id)

    # ------------------------------------------------------------------ structure
    def scope(self) -> Any:
        """The strategy's scope (variables made inside are replicated); a no-op on one device."""
        from .distribute import scope

        return scope(self.strategy)

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
        self.recs = recorded_layers(self.model)
        specs = []
        for r in self.recs:
            frozen_uids = set(self.state.frozen_filters.get(r.name, []))
            mask = None
            if frozen_uids:
                mask = np.array([u in frozen_uids for u in self.state.uids[r.name]], bool)
            specs.append(LayerSpec(r, r.name in self.state.frozen_layers, mask, self._anneal_window(r)))
        self.specs = specs
        if self.strategy is not None:
            from .distribute import build_distributed_step

            self.step_state = StepState(specs)
            self._step = build_distributed_step(self.strategy, self.model, self.optimizer, specs, self.step_state)
            src = self.data.train
            if isinstance(src, ArraySource):
                self._step_idx = lambda idx: self._step(src.x[idx], src.y[idx])
            self._eval = build_eval_step(self.model)
            self._probe = build_probe_step(self.model, self.recs)
        else:
            x_all = y_all = None
            if isinstance(self.data.train, ArraySource):
                x_all, y_all = self.data.train.device()
            # traced steps by frozen set: unfreezing back, or reinit, re-traces nothing (step.StepCache)
            cache = self.__dict__.setdefault("_step_cache", StepCache())
            traced, _hit = cache.steps(self.model, self.optimizer, specs, x_all=x_all, y_all=y_all)
            self.step_state = traced.state
            if saved is None:
                self.step_state.reset()
            self._step, self._step_idx = traced.step, traced.step_idx
            self._eval = cache.eval_step(self.model)
            self._probe = cache.probe_step(self.model, self.recs)
        self._acc_uids = {name: list(self.state.uids[name]) for name in self.step_state.grad_l1}
        if saved is not None:
            grads, loss_sum, correct, seen = saved
            for name, var in self.step_state.grad_l1.items():
                by_uid = grads.get(name, {})
                var.assign(np.array([by_uid.get(u, 0.0) for u in self.state.uids[name]], np.float32))
            self.step_state.loss_sum.assign(loss_sum)
            self.step_state.correct.assign(correct)
            self.step_state.seen.assign(seen)

    def _anneal_window(self, rec: RecordedLayer) -> Any:
        """The annealing-window variable of a conv layer under ``--auto-freeze`` (one host), else None.

        Every conv layer the auto-freezer may freeze (all but the last) gets one from the start, idle
        (`ANNEAL_IDLE`, scale 1), so that starting or ending an annealing re-traces nothing; its
        value is set here from `TrainerState.annealing`, which travels with the checkpoints.
        """
        if self.auto_freezer is None or self.strategy is not None or rec.kind != "conv":
            return None
        convs = [r.name for r in self.recs if r.kind == "conv"]
        if rec.name == convs[-1]:
            return None
        import tensorflow as tf

        windows = self._anneal_windows
        if rec.name not in windows:
            windows[rec.name] = tf.Variable([ANNEAL_IDLE, ANNEAL_IDLE], dtype=tf.float64, trainable=False,
                                            name=f"anneal_{rec.name}")
        start, end = self.state.annealing.get(rec.name, (ANNEAL_IDLE, ANNEAL_IDLE))
        windows[rec.name].assign([float(start), float(end)])
        return windows[rec.name]

    def set_anneal(self, layer: str, window: tuple[int, int] | None) -> bool:
        """Start (``[start, end]`` iterations) or clear (None) a layer's annealing window; re-traces nothing.

        Returns:
            False when the layer has no window variable (not auto-freezable, or a distributed run),
            so the caller freezes it at once instead.
        """
        var = self._anneal_windows.get(layer)
        if window is None:
            self.state.annealing.pop(layer, None)
            if var is not None:
                var.assign([ANNEAL_IDLE, ANNEAL_IDLE])
            return var is not None
        if var is None:
            return False
        self.state.annealing[layer] = [int(window[0]), int(window[1])]
        var.assign([float(window[0]), float(window[1])])
        return True

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
        old = getattr(self, "model", None)
        prepared = getattr(result.model, "compiled", False) and getattr(result.model, "optimizer", None) is result.optimizer
        if result.optimizer is not None and not prepared:  # (a prepared model is compiled already)
            self._compile_like(old, result.model, result.optimizer)
        self.model = result.model
        self.optimizer = result.optimizer
        self.model.stop_training = False
        if getattr(self, "callbacks", None) is not None:
            self.callbacks.set_model(self.model)
        self.rebuild(carry=True)

    def _compile_like(self, old: keras.Model | None, model: keras.Model, optimizer: Any) -> None:
        """Compile ``model`` with ``optimizer`` and the loss and metrics ``old`` was compiled with."""
        cc = old.get_compile_config() if getattr(old, "compiled", False) else {}
        cfg = keras.saving.deserialize_keras_object({k: v for k, v in cc.items() if k != "optimizer"})
        if cfg.get("loss") is None:
            cfg["loss"] = keras.losses.SparseCategoricalCrossentropy()
        with self.scope():
            model.compile(optimizer=optimizer, **cfg)

    def prepare_swap(self, command: dict[str, Any], frozen: Sequence[str]) -> tuple[Any, StepCache]:
        """Build and trace the model of a surgery without touching the training (a background thread).

        Applies ``command`` (`revacnn.steering.graph.apply`) to the model as it is now, compiles
        the result like the current model, traces its train step for the frozen set ``frozen``,
        its eval and probe steps, and calls each once on real data (TensorFlow optimises a graph
        on its first call). That call trains the new model and its optimizer on one batch and
        writes the new step's sums: `adopt` overwrites all of it at the swap.

        Returns:
            ``(result, cache)``: the `GraphSurgeryResult` and the `StepCache` holding its steps.
        """
        import tensorflow as tf

        from ..steering import graph

        with self.scope():
            res = graph.apply(self.model, self.optimizer, command, frozen=frozen)
        self._compile_like(self.model, res.model, res.optimizer)
        recs = recorded_layers(res.model)
        specs = [LayerSpec(r, r.name in frozen, None) for r in recs]
        src = self.data.train
        x_all, y_all = src.device()
        cache = StepCache()
        traced, _ = cache.steps(res.model, res.optimizer, specs, x_all=x_all, y_all=y_all)
        n = min(int(self.config.batch_size), len(src.x))
        float(traced.step_idx(tf.range(n, dtype=tf.int32)))
        cache.probe_step(res.model, recs)(self.probe_images)
        if self.data.val is not None:
            for x, y in self.data.val.eval_batches(EVAL_BATCH):
                cache.eval_step(res.model)(x, y)
                break
        return res, cache

    def adopt(self, prepared: Any, cache: StepCache, fresh: Any) -> None:
        """Swap in a model prepared by `prepare_swap`, with the values of ``fresh``.

        ``fresh`` is the same surgery applied to the model as it is now: every variable of the
        prepared model and optimizer takes its value, so the result equals ``swap(fresh)``, but
        the steps traced in the background are used. When the two do not match variable for
        variable (they always should), ``fresh`` is swapped in instead.
        """
        pairs = list(zip(prepared.model.variables, fresh.model.variables, strict=False))
        pairs += list(zip(prepared.optimizer.variables, fresh.optimizer.variables, strict=False))
        same = (
            len(prepared.model.variables) == len(fresh.model.variables)
            and len(prepared.optimizer.variables) == len(fresh.optimizer.variables)
            and all(a.shape == b.shape and a.dtype == b.dtype for a, b in pairs)
        )
        if not same:
            log.warning("the prepared model does not match the surgery; swapping synchronously")
            self.swap(fresh)
            return
        for a, b in pairs:
            a.assign(b.value)
        import dataclasses

        self._step_cache = cache
        self.swap(dataclasses.replace(fresh, model=prepared.model, optimizer=prepared.optimizer))

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
        """Validation loss and accuracy (NaN without validation data)."""
        if self.data.val is None or not self.chief:
            return float("nan"), float("nan")
        loss = 0.0
        hits = 0
        n = 0
        for x, y in self.data.val.eval_batches(EVAL_BATCH):
            batch_loss, h, k = self._eval(x, y)
            loss += float(batch_loss)
            hits += int(h)
            n += int(k)
        if n == 0:
            return float("nan"), float("nan")
        return loss / n, hits / n

    def probe(self) -> tuple[list[np.ndarray], np.ndarray]:
        outs, out = self._probe(self.probe_images)
        return [o.numpy() for o in outs], as_probabilities(np.asarray(out))

    def snapshot(self, epoch: int, metrics: dict[str, Any], *, checkpoint: bool = True) -> EpochSnapshot:
        """Copy what the epoch record needs out of the model (fast; the worker does the rest)."""
        acts, probs = self.probe()
        grads = self.step_state.take_grad_l1()
        layers = []
        ci = 0
        for idx, r in enumerate(self.recs):
            is_conv = r.kind == "conv"
            layers.append(
                LayerSnapshot(
                    name=r.name,
                    kind=r.kind,
                    index=idx,
                    kernel=r.kernel(),
                    bias=r.bias(),
                    grad_l1=grads.get(r.name, np.zeros(r.n_filters, np.float32)),
                    uids=np.asarray(self.state.uids[r.name], np.int64),
                    frozen_mask=self.frozen_mask(r.name),
                    layer_frozen=r.name in self.state.frozen_layers,
                    activations=acts[ci] if is_conv else None,
                    rgb_input=r.rgb_input,
                    extra=r.extra_arrays(),
                )
            )
            ci += int(is_conv)
        ckpt = None
        if checkpoint:
            self.state.epoch = epoch
            ckpt = capture(self.model, self.optimizer, {"trainer": self.state.to_dict(), "config": self.config.to_dict()})
        from ..storage.checkpoints import due

        every = int(getattr(self.config, "checkpoint_every", 1) or 1)
        first = getattr(self, "_first_epoch", None)
        write = due(epoch, every, first=-1 if first is None else first,
                    last=getattr(self, "_last_epoch", self.config.epochs))
        parents, self._pending_parents = self._pending_parents, {}
        return EpochSnapshot(
            epoch=epoch,
            metrics=metrics,
            layers=layers,
            probabilities=probs,
            probe_labels=self.probe_labels,
            checkpoint=ckpt,
            parents=parents,
            write_checkpoint=write,
        )

    def record(self, epoch: int, *, train_loss: float | None, train_acc: float | None, duration: float,
               n_batches: int, lr: float | None = None) -> dict[str, Any]:
        """Evaluate, then hand epoch ``epoch``'s snapshot to the worker; return the epoch's metrics."""
        val_loss, val_acc = self.evaluate()
        metrics = {
            "loss": train_loss,
            "accuracy": train_acc,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "lr": self.lr if lr is None else lr,
            "duration_s": duration,
            "cumulative_time_s": self.state.cumulative_time_s,
            "n_batches": n_batches,
            "step": int(np.asarray(self.optimizer.iterations)),
        }
        if not self.chief:  # the chief records; the other workers only keep in step
            return metrics
        if self.auto_freezer is not None and n_batches:
            # before the snapshot: the epoch's record and checkpoint already hold the freeze
            self.auto_freezer.check(self, epoch, n_batches)
        self.recorder.submit(self.snapshot(epoch, metrics))
        return metrics

    # ------------------------------------------------------------------ loop
    def order(self, epoch: int) -> np.ndarray:
        """The data order of ``epoch`` for array data: a permutation fixed by (seed, epoch)."""
        src = self.data.train
        if not isinstance(src, ArraySource):
            raise ConfigError(f"Received: {src.kind} training data (a fixed order exists for arrays only)")
        return src.order(self.config.seed, epoch)

    def run(self, *, start_epoch: int, epochs: int, record_start: bool = True,
            start_train_metrics: tuple[float | None, float | None] = (None, None)) -> str:
        """Record ``start_epoch`` (if asked), then train epochs ``start_epoch+1 .. epochs``.

        Callbacks see Keras' epoch indices (``epoch - 1`` for the recorded epoch ``epoch``), as
        ``model.fit(initial_epoch=start_epoch, epochs=epochs)`` would call them. When a callback
        sets ``model.stop_training`` (EarlyStopping), the run ends after that epoch's record with
        status ``finished`` and a message naming the epoch.

        Returns:
            The final status: ``finished``, ``stopped`` or ``failed``.
        """
        status = "failed"
        message = None
        self.model.stop_training = False
        self.callbacks.set_params({"epochs": epochs, "steps": self._n_batches(), "verbose": 0})
        if record_start:
            self._first_epoch = start_epoch  # a run's first record (0, a fork point) is checkpointed
        self._last_epoch = epochs
        try:
            self.callbacks.on_train_begin()
            if self.auto_freezer is not None:
                self.auto_freezer.prime(self)  # the model as it starts is "the previous epoch"
            if record_start:
                loss0, acc0 = start_train_metrics
                self.record(start_epoch, train_loss=loss0, train_acc=acc0, duration=0.0, n_batches=0)
            status = "finished"
            for epoch in range(start_epoch + 1, epochs + 1):
                if not self._train_epoch(epoch):
                    status = "stopped"
                    break
                if getattr(self.model, "stop_training", False):
                    message = self.end_message = (
                        f"ended early after epoch {epoch} of {epochs} by a callback (model.stop_training)"
                    )
                    break
            self.callbacks.on_train_end()
            self.recorder.flush_checkpoint()  # retention: an early end keeps its last checkpoint
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
            from .distribute import lost_peer

            if self.sync is not None and lost_peer(exc):
                status = "interrupted"
                message = f"a worker of the cluster was lost ({type(exc).__name__}); resume the run"
            raise
        finally:
            from .steer import finish_background

            finish_background(self)  # a surgery in preparation: its thread ends, its command stays queued
            # retention: the last recorded epoch keeps its checkpoint, however the run ends
            self.recorder.flush_checkpoint()
            if not self.chief:
                self.writer.heartbeat(every_s=0.0, done=True, status=status)
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

    def _n_batches(self) -> int | None:
        return self.data.train.n_batches(self.config.batch_size)

    def _batches(self, epoch: int) -> Iterator[Any]:
        src = self.data.train
        if isinstance(src, ArraySource):
            order = src.order(self.config.seed, epoch)
            bs = self.config.batch_size
            for b in range(src.n_batches(bs)):
                yield (order[b * bs : (b + 1) * bs],)
        else:
            yield from src.epoch_batches(epoch)

    def _check_store(self) -> None:
        """Raise `StoreWriteError` once the recorder found the store unwritable (a full disk)."""
        if self.recorder.fatal:
            raise StoreWriteError(self.recorder.fatal)

    def _train_epoch(self, epoch: int) -> bool:
        nb = self._n_batches()
        self.n_batches = nb or 0
        self.step_state.reset_metrics()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=nb, desc=f"epoch {epoch}/{self.config.epochs}", unit="batch", leave=True,
                       file=sys.stderr, dynamic_ncols=True)
        live_every = self.config.live_every_s
        train_time = 0.0
        self.epoch_in_progress = epoch
        self.callbacks.on_epoch_begin(epoch - 1)
        b = -1
        try:
            it = self._batches(epoch)
            while True:
                b += 1
                self.batch = b
                self._between_batches(epoch, b)
                if self.stop_requested:
                    return False
                t_step = time.perf_counter()
                batch = next(it, None)
                if batch is None:
                    train_time += time.perf_counter() - t_step
                    break
                if self._batch_hooks:
                    self.callbacks.on_train_batch_begin(b)
                if len(batch) == 1:
                    self._step_idx(batch[0])
                else:
                    self._step(batch[0], batch[1])
                train_time += time.perf_counter() - t_step
                if self._batch_hooks:
                    loss, acc = self.step_state.metrics()
                    self.callbacks.on_train_batch_end(b, {"loss": loss, "accuracy": acc})
                if bar is not None and (b % 10 == 0 or b == (nb or 0) - 1):
                    bar.update(b + 1 - bar.n)
                    loss, acc = self.step_state.metrics()
                    bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}", refresh=False)
                # The period spans epochs: a wall-clock clock kept on the trainer, not per epoch,
                # so epochs shorter than ``live_every_s`` still publish.
                if live_every and time.perf_counter() - self._t_live >= max(live_every, self._live_gap):
                    self._publish_live(epoch, b + 1, nb or b + 1)
                self.writer.heartbeat()
        finally:
            if bar is not None:
                bar.close()
        nb = b
        self.n_batches = nb
        self.batch = nb
        self._between_batches(epoch, nb)  # commands sent during the last batch apply before the record
        from .steer import apply_pending

        apply_pending(self, epoch, nb, wait=True)  # and a surgery still in preparation
        if live_every:
            self._publish_live(epoch, nb, nb)  # one at every epoch's end: the page never lags the record
        train_loss, train_acc = self.step_state.metrics()
        self.state.cumulative_time_s += train_time
        metrics = self.record(epoch, train_loss=train_loss, train_acc=train_acc, duration=train_time,
                              n_batches=nb)
        logs = {k: metrics[k] for k in ("loss", "accuracy", "val_loss", "val_accuracy")}
        if self.data.val is None:
            logs = {"loss": logs["loss"], "accuracy": logs["accuracy"]}
        logs["learning_rate"] = metrics["lr"]
        self.callbacks.on_epoch_end(epoch - 1, logs)
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
        if not self.chief:
            return
        if throttle and time.time() - self._last_live < max(self.config.live_every_s, 0.5):
            return
        self._last_live = time.time()
        self._t_live = t0 = time.perf_counter()
        loss, acc = self.step_state.metrics()
        self.batch_history.append((epoch, batch, loss, acc, time.time()))
        del self.batch_history[:-5000]
        acts, probs = self.probe()
        kernels = {r.name: np.moveaxis(r.kernel(), -1, 0) for r in self.recs if r.kind == "conv"}
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

        def write(*args: Any) -> None:
            c = time.thread_time()
            try:
                write_live_snapshot(*args)
            finally:
                self._live_write_s = time.thread_time() - c

        self.recorder.call(
            write, self.store, self.run_id, meta, kernels,
            {n: np.moveaxis(a, -1, 1).astype(np.float16) for n, a in zip(conv_names, acts, strict=False)},
            probs, list(self.batch_history),
        )
        # the next one waits until this one's cost is LIVE_CPU_SHARE of the time (the write's
        # cost is the previous snapshot's, known by now)
        cost = time.perf_counter() - t0 + self._live_write_s
        self._live_gap = cost / LIVE_CPU_SHARE
