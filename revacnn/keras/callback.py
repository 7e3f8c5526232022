"""`RevacnnCallback`: records every epoch of a user's own ``model.fit`` and obeys live steering.

It writes the same epoch records as `revacnn.fit` (epoch 0 at ``on_train_begin``, per-filter
gradient sums included, checkpoints with the compiled optimizer and loss). The gradient sums come
from the model's train step, which the callback replaces for the duration of the fit with one that
does what Keras' own does (forward, compiled loss, loss tracker, optimizer update, compiled
metrics) and also accumulates per-filter gradient L1 sums, leaves frozen layers out of the
gradient computation and keeps frozen filters bit-identical.

Under the user's own ``tf.distribute`` strategy (model and fit inside ``strategy.scope()``), the
replicas' gradients are all-reduced once, with the loss and hit counts, and the gradient sums
are of the global-batch gradient (`revacnn.trainer.distribute.replica_update`).

Steering that needs no new variables is obeyed at batch boundaries: freeze/unfreeze (layers and
filters; the train function is re-traced), set-lr, pause, resume, stop (``model.stop_training``).
Structural commands (add/delete/reinit filters) are rejected with a reason: fork the run, which
continues under `revacnn.fit`.
"""

from __future__ import annotations

import time
import types
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ..config import TrainConfig
from ..errors import ConfigError
from ..models.graph import recorded_layers, validate_model
from ..storage import RunWriter, Store, create_session, open_store
from ..trainer.fit import runtime_settings
from ..trainer.sources import class_indices
from ..trainer.step import LayerSpec, StepState, hits, per_filter_l1, trainable_split
from ..trainer.trainer import Trainer, TrainerState

_ACC_KEYS = ("accuracy", "acc", "sparse_categorical_accuracy", "categorical_accuracy", "binary_accuracy")


def _first(logs: dict[str, Any], keys: Sequence[str], prefix: str = "") -> float | None:
    for k in keys:
        v = logs.get(prefix + k)
        if v is not None:
            return float(v)
    return None


class _FitCore(Trainer):
    """The recording half of `Trainer`, driven by Keras' own fit loop instead of the batch loop."""

    supports_surgery = False

    def __init__(self, model: keras.Model, writer: RunWriter, config: TrainConfig, probe_images: np.ndarray,
                 probe_labels: np.ndarray) -> None:
        from ..trainer.recorder import Recorder

        self.model = model
        self.optimizer = model.optimizer
        self.strategy = None  # the user's fit distributes; this process records (one host)
        self.sync = None
        self.chief = True
        self.config = config
        self.writer = writer
        self.store: Store = writer.store
        self.run_id = writer.run_id
        self.progress = False
        self.probe_images = np.asarray(probe_images)
        self.probe_labels = np.asarray(probe_labels)
        self.state = TrainerState()
        self.recs = recorded_layers(model)
        for r in self.recs:
            self.state.uids[r.name] = list(range(r.n_filters))
            self.state.next_uid[r.name] = r.n_filters
        self.recorder = Recorder(writer, embeddings=config.embeddings, embedding_features=config.embedding_features,
                                 seed=config.seed)
        self._init_loop_state()
        self.val: tuple[float, float] = (float("nan"), float("nan"))
        self.auto_freezer = None  # the user's fit decides; auto-freeze runs under revacnn.fit only
        self.user_callbacks: list[Any] = []
        self.end_message: str | None = None
        self.rebuild()

    def rebuild(self, *, carry: bool = False) -> None:
        """Recompute the frozen sets and accumulators; the wrapped train step is re-traced."""
        saved = None
        if carry and hasattr(self, "step_state"):
            old = self.step_state
            saved = ({k: v.numpy() for k, v in old.grad_l1.items()}, old.loss_sum.numpy(), old.correct.numpy(),
                     old.seen.numpy())
        specs = []
        for r in self.recs:
            fz = set(self.state.frozen_filters.get(r.name, []))
            mask = np.array([u in fz for u in self.state.uids[r.name]], bool) if fz else None
            specs.append(LayerSpec(r, r.name in self.state.frozen_layers, mask))
        self.specs = specs
        self.step_state = StepState(specs)
        self._probe = _probe_fn(self.model, self.recs)
        if saved is not None:
            grads, loss_sum, correct, seen = saved
            for name, var in self.step_state.grad_l1.items():
                var.assign(grads[name])
            self.step_state.loss_sum.assign(loss_sum)
            self.step_state.correct.assign(correct)
            self.step_state.seen.assign(seen)
        if getattr(self.model, "train_function", None) is not None:
            self.model.make_train_function(force=True)  # re-trace with the new frozen sets

    def evaluate(self) -> tuple[float, float]:
        return self.val

    def make_train_step(self) -> Any:
        core = self

        def train_step(model: keras.Model, data: Any) -> Any:
            from keras.src.losses import loss as loss_module

            x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
            train_vars = trainable_split(model, core.specs)
            var_pos = {id(v): i for i, v in enumerate(train_vars)}
            restore = []
            acc = []
            for s in core.specs:
                if s.frozen or id(s.rec.kernel_var) not in var_pos:
                    continue
                ki = var_pos[id(s.rec.kernel_var)]
                bv = s.rec.bias_var
                bi = var_pos.get(id(bv)) if bv is not None else None
                acc.append((s.rec, ki, bi, core.step_state.grad_l1[s.rec.name]))
                if s.frozen_mask is not None and s.frozen_mask.any():
                    for var, gi in ((s.rec.kernel_var, ki), (bv, bi)):
                        if var is not None and gi is not None:
                            restore.append((var, gi, tf.identity(var.value), tf.constant(s.rec.filter_mask(var, s.frozen_mask))))
            with tf.GradientTape() as tape:
                y_pred = model(x, training=True)
                loss = model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sw, training=True)
                n = tf.shape(tf.nest.flatten(x)[0])[0]
                model._loss_tracker.update_state(loss_module.unscale_loss_for_distribution(loss), sample_weight=n)
                scaled = model.optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, train_vars)
            for _v, gi, _saved, m in restore:
                grads[gi] = tf.where(m, tf.zeros_like(grads[gi]), grads[gi])
            ctx = tf.distribute.get_replica_context()
            if ctx is not None and ctx.num_replicas_in_sync > 1:  # the user's fit runs under a strategy
                from ..trainer.distribute import replica_update

                replica_update(ctx, model, core.step_state, acc, restore, grads, train_vars, loss, n, y, y_pred)
                return model.compute_metrics(x, y, y_pred, sample_weight=sw)
            model.optimizer.apply(grads, train_vars)
            for var, _gi, saved, m in restore:
                var.assign(tf.where(m, saved, var))
            for rec, ki, bi, accumulator in acc:
                accumulator.assign_add(per_filter_l1(rec, grads[ki], grads[bi] if bi is not None else None))
            st = core.step_state
            st.loss_sum.assign_add(tf.cast(loss, tf.float64) * tf.cast(n, tf.float64))
            st.correct.assign_add(hits(y, y_pred))
            st.seen.assign_add(tf.cast(n, tf.int64))
            return model.compute_metrics(x, y, y_pred, sample_weight=sw)

        return train_step


def _probe_fn(model: keras.Model, recs: Any) -> Any:
    from ..trainer.step import build_probe_step

    return build_probe_step(model, recs)


class RevacnnCallback(keras.callbacks.Callback):
    """Record a user's own ``model.fit`` into a revacnn store, and obey live steering.

    Args:
        store: a `Store` or a path (default ``$REVACNN_STORE`` or ``./store``).
        probes: an ``(x, y)`` pair of probe images (fed to the model as given) and labels.
        name: the run's name.
        seed: the run's seed (recorded; the data order is the user's own).
        class_names: names of the classes, for the app.
        embeddings: compute t-SNE embeddings of the filters (in a worker).
        live_every_s: period of the live snapshot for the live app (0 disables it).
        batch_size: the fit's batch size, recorded so that a fork of the run on arrays under
            `revacnn.fit` uses it (default 32, Keras' own default).

    Attributes:
        run_id: the recorded run's id (set at ``on_train_begin``).

    Example:
        >>> from revacnn.keras import RevacnnCallback
        >>> model.fit(train_ds, validation_data=val_ds, epochs=30,
        ...           callbacks=[RevacnnCallback(store="store", probes=(xv[:16], yv[:16]), name="resnet20")])
    """

    def __init__(self, store: Store | str | None = None, probes: tuple[Any, Any] | None = None, *,
                 name: str | None = None, seed: int = 0, class_names: Sequence[str] | None = None,
                 embeddings: bool = True, live_every_s: float = 1.0, batch_size: int = 32) -> None:
        super().__init__()
        if not (isinstance(probes, (tuple, list)) and len(probes) == 2 and len(probes[0]) == len(probes[1])
                and len(probes[0]) > 0):
            raise ConfigError(
                f"Received: probes={type(probes).__name__} (expected an (x, y) pair of probe images and labels, "
                "e.g. probes=(x_val[:16], y_val[:16]): a callback does not see the data)"
            )
        self._store_arg = store
        self.probes = (np.asarray(probes[0]), np.asarray(probes[1]))
        self.name = name
        self.seed = int(seed)
        self.class_names = list(class_names) if class_names else None
        self.embeddings = embeddings
        self.live_every_s = float(live_every_s)
        self.batch_size = int(batch_size)
        self.run_id: str | None = None
        self.core: _FitCore | None = None
        self._t_epoch = 0.0
        self._batches = 0

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        model = self.model
        validate_model(model)
        from ..trainer.distribute import describe

        strategy = getattr(model, "distribute_strategy", None)
        if strategy is not None and describe(strategy)["workers"] > 1:
            raise ConfigError(
                "Received: RevacnnCallback in a model.fit under MultiWorkerMirroredStrategy with "
                f"{describe(strategy)['workers']} workers (expected one host: MirroredStrategy; train on "
                "several hosts with `revacnn train --strategy multiworker` or revacnn.fit(strategy=...))"
            )
        if getattr(model, "optimizer", None) is None:
            raise ConfigError("Received: an uncompiled model (RevacnnCallback records model.fit: compile it first)")
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        st = self._store_arg if isinstance(self._store_arg, Store) else open_store(self._store_arg)
        params = self.params or {}
        px, py = self.probes
        labels = class_indices(py)
        n_classes = int(model.output_shape[-1])
        cfg = TrainConfig(
            dataset="custom", model="custom", epochs=int(params.get("epochs") or 0), batch_size=self.batch_size,
            lr=float(np.asarray(model.optimizer.learning_rate)), optimizer=type(model.optimizer).__name__.lower(),
            train_size=None, val_size=None, probes=len(labels), seed=self.seed, name=self.name,
            embeddings=self.embeddings, live_every_s=self.live_every_s, runtime=runtime_settings(),
            extra={"recorded_by": "RevacnnCallback", "steps_per_epoch": params.get("steps")},
        )
        names = self.class_names or [str(i) for i in range(max(n_classes, 2))]
        sid = create_session(st, dataset="custom", model=model.name, probe_images=px, probe_labels=labels,
                             probe_indices=np.arange(len(labels)), class_names=names, config=cfg.to_dict())
        writer = RunWriter.create(st, session_id=sid, config=cfg.to_dict(), name=self.name)
        self.run_id = writer.run_id
        self.core = core = _FitCore(model, writer, cfg, px, labels)
        model.train_step = types.MethodType(core.make_train_step(), model)
        model.make_train_function(force=True)  # traced again, with the wrapped step
        core.record(0, train_loss=None, train_acc=None, duration=0.0, n_batches=0)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        assert self.core is not None
        self.core.step_state.reset_metrics()
        self.core.epoch_in_progress = epoch + 1
        self._batches = 0
        self._t_epoch = time.perf_counter()

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        core = self.core
        assert core is not None
        core.batch = batch
        core._between_batches(epoch=core.epoch_in_progress, batch=batch)
        if core.stop_requested:
            self.model.stop_training = True

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        core = self.core
        assert core is not None
        self._batches = batch + 1
        core.writer.heartbeat()
        if self.live_every_s and time.perf_counter() - core._t_live >= max(self.live_every_s,
                                                                            getattr(core, "_live_gap", 0.0)):
            core._publish_live(core.epoch_in_progress, batch + 1, int((self.params or {}).get("steps") or 0))

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        core = self.core
        assert core is not None
        logs = dict(logs or {})
        core._between_batches(epoch=epoch + 1, batch=self._batches)
        duration = time.perf_counter() - self._t_epoch
        core.state.cumulative_time_s += duration
        own_loss, own_acc = core.step_state.metrics()
        loss = _first(logs, ("loss",))
        acc = _first(logs, _ACC_KEYS)
        core.val = (_first(logs, ("loss",), "val_") or float("nan"), _first(logs, _ACC_KEYS, "val_") or float("nan"))
        steps = int((self.params or {}).get("steps") or self._batches)
        core.record(epoch + 1, train_loss=own_loss if loss is None else loss,
                    train_acc=own_acc if acc is None else acc, duration=duration, n_batches=steps)
        if core.stop_requested:
            self.model.stop_training = True

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        core = self.core
        if core is None:
            return
        try:
            if "train_step" in vars(self.model):
                del self.model.train_step
            self.model.train_function = None
        finally:
            core.recorder.close()
            message = "; ".join(core.recorder.errors[-3:]) if core.recorder.errors else None
            try:
                core.writer.compact()
            finally:
                core.writer.set_status("stopped" if core.stop_requested else "finished", message)
