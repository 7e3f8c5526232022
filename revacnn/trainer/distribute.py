"""Training under tf.distribute: the replicated train step, the chief's command broadcast, workers' heartbeats.

The trainer runs the same batch loop under a strategy; only the step and the command hand-over
change:

- Every process produces the same *global* batch (arrays: the (seed, epoch) order; datasets: the
  dataset's own batches), and each replica takes its contiguous slice of it
  (`distribute_batch`). The global batch is therefore exactly the one a single-device run sees.
- The replica step (`build_distributed_step`) computes the compiled loss on its slice, weighted so
  that the replicas' losses sum to the *global-batch* loss (Keras' 1/num_replicas convention,
  exact for uneven slices too), all-reduces the gradients (SUM) together with the loss and
  hit counts in one collective, and hands the reduced gradients to the optimizer (which then
  does not reduce them again). The per-filter gradient L1 is taken of the reduced gradient, so
  the recorded ``grad_l1`` has the single-device definition: the L1 of the gradient of the
  global-batch loss. Frozen filters are restored in cross-replica context (every replica's copy).
- Under `tf.distribute.MultiWorkerMirroredStrategy` with several workers, only the chief (task 0)
  reads the command queue; `CommandSync.exchange` broadcasts its commands to every worker at each
  batch boundary, so that every replica applies a command at the same step. Workers other than
  the chief write nothing to the store but a heartbeat (`WorkerWriter`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ..errors import ConfigError
from ..storage import RunWriter, Store
from .step import LayerSpec, StepState, compiled_loss, hits, per_filter_l1, trainable_split

log = logging.getLogger("revacnn.trainer")

#: ``--strategy`` names
STRATEGIES = ("none", "mirrored", "multiworker")

#: seconds a collective may wait for a peer before the run counts as interrupted
#: (``$REVACNN_COLLECTIVE_TIMEOUT_S``; it must exceed the chief's longest epoch record)
def collective_timeout_s() -> float:
    """Seconds a cross-worker collective waits for a lost peer (``$REVACNN_COLLECTIVE_TIMEOUT_S``, 300)."""
    try:
        return float(os.environ.get("REVACNN_COLLECTIVE_TIMEOUT_S", "300"))
    except ValueError:
        return 300.0


_MADE: dict[str, tf.distribute.Strategy] = {}


def make_strategy(name: str | None) -> tf.distribute.Strategy | None:
    """The strategy ``--strategy NAME`` names: None for ``none``; create it before any other TF work.

    ``multiworker`` reads the cluster from ``$TF_CONFIG``. One object per name and process: two
    strategies over the same devices would reuse each other's collective keys.

    Example:
        >>> strategy = make_strategy("mirrored")  # every local GPU (or the logical CPUs)
    """
    if name in (None, "none"):
        return None
    if name in _MADE:
        return _MADE[name]
    _MADE[name] = made = _make(name)
    return made


def _make(name: str) -> tf.distribute.Strategy:
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        if not os.environ.get("TF_CONFIG"):
            raise ConfigError("Received: --strategy multiworker without $TF_CONFIG (expected the cluster "
                              'spec, e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                              '"task": {"type": "worker", "index": 0}})')
        opts = tf.distribute.experimental.CommunicationOptions(timeout_seconds=collective_timeout_s())
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=opts)
    raise ConfigError(f"Received: strategy={name!r} (expected one of {', '.join(STRATEGIES)})")


def describe(strategy: tf.distribute.Strategy | None) -> dict[str, Any]:
    """``{"kind", "replicas", "workers", "task"}`` of a strategy (None: one device), recorded with the run."""
    if strategy is None:
        return {"kind": "none", "replicas": 1, "workers": 1, "task": 0}
    workers, task = 1, 0
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is not None:
        spec = resolver.cluster_spec().as_dict()
        workers = max(1, sum(len(v) for k, v in spec.items() if k in ("chief", "worker")))
        task = int(resolver.task_id or 0)
        if resolver.task_type == "worker" and "chief" in spec:
            task += len(spec["chief"])
    kind = "multiworker" if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) else (
        "mirrored" if isinstance(strategy, tf.distribute.MirroredStrategy) else type(strategy).__name__)
    return {"kind": kind, "replicas": int(strategy.num_replicas_in_sync), "workers": workers, "task": task}


def is_chief(strategy: tf.distribute.Strategy | None) -> bool:
    """Whether this process is the one that writes the store (task 0; always, without several workers)."""
    return describe(strategy)["task"] == 0


def scope(strategy: tf.distribute.Strategy | None) -> Any:
    """``strategy.scope()``, or a no-op context without a strategy."""
    return strategy.scope() if strategy is not None else nullcontext()


def check_distributed(model: keras.Model, optimizer: keras.optimizers.Optimizer,
                      strategy: tf.distribute.Strategy) -> None:
    """Raise `ConfigError` unless ``model``'s variables and ``optimizer`` belong to ``strategy``."""
    v = next(iter(model.trainable_variables), None)
    inner = getattr(v, "value", v)
    if v is not None and not strategy.extended.variable_created_in_scope(inner):
        raise ConfigError(
            "Received: a model built outside strategy.scope() (expected its variables created under the "
            "strategy: build and compile the model inside `with strategy.scope():`)"
        )
    own = getattr(optimizer, "_distribution_strategy", strategy)
    if own is not None and own is not strategy:
        raise ConfigError(
            "Received: an optimizer created outside strategy.scope() (expected it created, like the "
            "model, inside `with strategy.scope():`)"
        )


@contextmanager
def _optimizer_takes_reduced(optimizer: keras.optimizers.Optimizer):
    """While tracing: the optimizer applies the gradients it gets as they are (already all-reduced)."""
    had = "_all_reduce_sum_gradients" in vars(optimizer)
    old = vars(optimizer).get("_all_reduce_sum_gradients")
    optimizer._all_reduce_sum_gradients = lambda grads_and_vars: list(grads_and_vars)
    try:
        yield
    finally:
        if had:
            optimizer._all_reduce_sum_gradients = old
        else:
            del optimizer._all_reduce_sum_gradients


def distribute_batch(strategy: tf.distribute.Strategy, *arrays: Any) -> tuple[Any, ...]:
    """Split a global batch into per-replica values: replica ``r`` gets the ``r``-th contiguous slice.

    Slices follow `numpy.array_split` (sizes differ by at most one), over the global replica ids,
    so every worker must pass the same global batch.
    """
    n = int(arrays[0].shape[0])
    R = strategy.num_replicas_in_sync
    bounds = np.cumsum([0] + [len(part) for part in np.array_split(np.arange(n), R)])

    def value_fn(ctx: tf.distribute.DistributedValues) -> tuple[tf.Tensor, ...]:
        r = ctx.replica_id_in_sync_group
        return tuple(tf.convert_to_tensor(a[bounds[r]: bounds[r + 1]]) for a in arrays)

    return strategy.experimental_distribute_values_from_function(value_fn)


def build_distributed_step(
    strategy: tf.distribute.Strategy,
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    specs: Sequence[LayerSpec],
    state: StepState | None,
) -> Callable[[Any, Any], None]:
    """``step(x, y)`` on a global batch: one replicated update; with ``state``, the in-step sums too.

    ``state`` None is training without recording (the benchmark's baseline: Keras' own replicated
    update, the optimizer all-reducing the gradients). With ``state``, the gradients, loss and hit
    counts are all-reduced in one collective; ``state``'s accumulators (plain variables of this
    process) get the reduced per-filter gradient L1 and metric sums.
    """
    loss_fn = compiled_loss(model, training=True)
    train_vars = trainable_split(model, specs)
    var_pos = {id(v): i for i, v in enumerate(train_vars)}
    acc: list[tuple[Any, int, int | None, tf.Variable]] = []
    restore: list[tuple[Any, tf.Tensor, tf.Tensor]] = []
    masks: dict[int, tf.Tensor] = {}  # gradient index -> frozen-filter mask
    for s in specs:
        rec = s.rec
        kvar, bvar = rec.kernel_var, rec.bias_var
        if s.frozen or id(kvar) not in var_pos:
            continue
        ki = var_pos[id(kvar)]
        bi = var_pos.get(id(bvar)) if bvar is not None else None
        if state is not None:
            acc.append((rec, ki, bi, state.grad_l1[rec.name]))
        if s.frozen_mask is not None and s.frozen_mask.any():
            for var, gi in ((kvar, ki), (bvar, bi)):
                if var is not None and gi is not None:
                    m = tf.constant(rec.filter_mask(var, s.frozen_mask))
                    restore.append((var, tf.constant(np.asarray(var.numpy())), m))
                    masks[gi] = m

    def replica_fn(x: Any, y: Any, n_global: tf.Tensor) -> Any:
        ctx = tf.distribute.get_replica_context()
        R = ctx.num_replicas_in_sync
        n = tf.shape(tf.nest.flatten(x)[0])[0]
        n_f = tf.cast(n, tf.float32)
        with tf.GradientTape() as tape:
            pred = model(x, training=True)
            loss = loss_fn(x, y, pred)  # Keras: this slice's mean loss / R
            if state is not None:
                # the replicas' losses sum to the global-batch loss, however uneven the slices
                obj = loss * tf.cast(R, loss.dtype) * tf.cast(n_f / n_global, loss.dtype)
            else:
                obj = loss
        grads = tape.gradient(obj, train_vars)
        for gi in masks:
            grads[gi] = tf.where(masks[gi], tf.zeros_like(grads[gi]), grads[gi])
        if state is None:
            optimizer.apply(grads, train_vars)  # Keras all-reduces (SUM) the replicas' gradients
            return ()
        mean_loss = tf.cast(loss, tf.float32) * tf.cast(R, tf.float32)  # this slice's mean loss
        extras = tf.stack([mean_loss * n_f, tf.cast(hits(y, pred), tf.float32), n_f])
        reduced = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [*grads, extras])
        grads, extras = list(reduced[:-1]), reduced[-1]
        optimizer.apply(grads, train_vars)
        l1 = [per_filter_l1(rec, grads[ki], grads[bi] if bi is not None else None) for rec, ki, bi, _ in acc]
        return l1, extras

    @tf.function(jit_compile=False, reduce_retracing=True)
    def step(x: Any, y: Any, n_global: tf.Tensor) -> None:
        with _optimizer_takes_reduced(optimizer) if state is not None else nullcontext():
            out = strategy.run(replica_fn, args=(x, y, n_global))
        for var, saved, m in restore:
            var.assign(tf.where(m, saved, var))
        if state is None:
            return
        l1, extras = out
        first = strategy.experimental_local_results
        for (_rec, _ki, _bi, accumulator), v in zip(acc, l1, strict=True):
            accumulator.assign_add(first(v)[0])
        e = first(extras)[0]
        state.loss_sum.assign_add(tf.cast(e[0], tf.float64))
        state.correct.assign_add(tf.cast(tf.round(e[1]), tf.int64))
        state.seen.assign_add(tf.cast(tf.round(e[2]), tf.int64))

    def run_step(x: Any, y: Any) -> None:
        dx, dy = distribute_batch(strategy, x, y)
        step(dx, dy, tf.constant(float(np.shape(x)[0]), tf.float32))

    return run_step


def replica_update(ctx: Any, model: keras.Model, state: StepState, acc: Sequence[tuple[Any, int, int | None, Any]],
                   restore: Sequence[tuple[Any, int, Any, Any]], grads: list[Any], train_vars: list[Any],
                   loss: tf.Tensor, n: tf.Tensor, y: Any, pred: Any) -> None:
    """The update of a train step running in a replica context (a user's ``model.fit`` under a strategy).

    ``grads`` are this replica's gradients of its Keras-scaled loss (``loss``, the slice's mean
    / num_replicas); they, the loss and the hit counts are all-reduced in one collective, the
    optimizer applies the reduced gradients (without reducing them again), frozen filters are
    restored on every replica (``restore``: variable, gradient index, saved value, mask), and the
    first replica adds the reduced per-filter L1 (``acc``: layer, kernel and bias gradient index,
    accumulator) and metric sums to ``state``'s plain variables.
    """
    R = ctx.num_replicas_in_sync
    n_f = tf.cast(n, tf.float32)
    mean_loss = tf.cast(loss, tf.float32) * tf.cast(R, tf.float32)
    extras = tf.stack([mean_loss * n_f, tf.cast(hits(y, pred), tf.float32), n_f])
    reduced = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [*grads, extras])
    grads, extras = list(reduced[:-1]), reduced[-1]
    with _optimizer_takes_reduced(model.optimizer):
        model.optimizer.apply(grads, train_vars)
    for var, _gi, saved, m in restore:
        new = tf.where(m, saved, var)

        def put(strategy: tf.distribute.Strategy, value: Any, var: Any = var) -> None:
            inner = var.value if isinstance(var, keras.Variable) else var  # the tf.distribute variable
            strategy.extended.update(inner, lambda v, t: v.assign(t), args=(value,), group=False)

        ctx.merge_call(put, args=(new,))

    def add() -> tf.Tensor:
        for rec, ki, bi, accumulator in acc:
            accumulator.assign_add(per_filter_l1(rec, grads[ki], grads[bi] if bi is not None else None))
        state.loss_sum.assign_add(tf.cast(extras[0], tf.float64))
        state.correct.assign_add(tf.cast(tf.round(extras[1]), tf.int64))
        state.seen.assign_add(tf.cast(tf.round(extras[2]), tf.int64))
        return tf.constant(True)

    tf.cond(tf.equal(ctx.replica_id_in_sync_group, 0), add, lambda: tf.constant(False))


class CommandSync:
    """Broadcasts the chief's steering commands to every worker at a batch boundary.

    One small all-reduce per batch (the payload length, the chief's replica 0 contributing it);
    a second one carries the commands' JSON bytes when there are any.

    Example:
        >>> sync = CommandSync(strategy)
        >>> cmds = sync.exchange(queue_commands if chief else None)
    """

    def __init__(self, strategy: tf.distribute.Strategy) -> None:
        self.strategy = strategy

        def replica_sum(t: tf.Tensor) -> tf.Tensor:
            ctx = tf.distribute.get_replica_context()
            mine = tf.where(tf.equal(ctx.replica_id_in_sync_group, 0), t, tf.zeros_like(t))
            return ctx.all_reduce(tf.distribute.ReduceOp.SUM, mine)

        @tf.function(reduce_retracing=True)
        def bcast(t: tf.Tensor) -> tf.Tensor:
            out = strategy.run(replica_sum, args=(t,))
            return strategy.experimental_local_results(out)[0]

        self._bcast = bcast

    def broadcast(self, payload: bytes | None) -> bytes:
        """The chief's ``payload`` on every worker (others pass None)."""
        data = payload or b""
        n = int(self._bcast(tf.constant([len(data)], tf.int32)).numpy()[0])
        if n == 0:
            return b""
        size = 1 << max(8, (n - 1).bit_length())  # a few padded sizes: a few traces
        buf = np.zeros(size, np.int32)
        if payload:
            buf[:n] = np.frombuffer(data, np.uint8)
        out = self._bcast(tf.constant(buf)).numpy()[:n]
        return out.astype(np.uint8).tobytes()

    def exchange(self, commands: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        """The chief's commands (JSON dicts) on every worker, in its order."""
        raw = self.broadcast(json.dumps(commands).encode() if commands else None)
        return json.loads(raw.decode()) if raw else []


class WorkerWriter(RunWriter):
    """The writer of a worker that is not the chief: it writes only its heartbeat.

    ``runs/<run>/workers/worker-<task>.json`` (pid, host, heartbeat time); epoch records, events,
    status and compaction are the chief's.
    """

    def __init__(self, store: Store, run_id: str, task: int) -> None:
        super().__init__(store, run_id, durable=False)
        self.task = int(task)
        #: what the heartbeat reports about this worker's replicas (set by the trainer)
        self.state_fn: Callable[[], dict[str, Any]] | None = None

    def _noop(self, *args: Any, **kwargs: Any) -> None:
        return None

    acquire = release = set_status = write_arrays = write_rows = commit = write_checkpoint = _noop  # type: ignore[assignment]
    discard_after = write_event = compact = _noop  # type: ignore[assignment]

    def find_event(self, event_id: str) -> dict[str, Any] | None:
        return None

    def heartbeat(self, *, every_s: float = 2.0, **extra: Any) -> None:
        from ..storage import atomic_write_json
        from ..storage.lease import owner_info

        now = time.time()
        if now - self._last_beat < every_s:
            return
        self._last_beat = now
        path = self.layout.run_dir(self.run_id) / "workers" / f"worker-{self.task}.json"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            state = self.state_fn() if self.state_fn is not None else {}
            atomic_write_json(path, {**owner_info(), **state, **extra, "task": self.task, "heartbeat_at": now},
                              durable=False)
        except OSError as exc:
            log.warning("worker heartbeat of %s not written: %s", self.run_id, exc)


def worker_state(trainer: Any) -> dict[str, Any]:
    """What a worker's heartbeat says about its replicas: step, lr, frozen layers, applied commands,
    and the L1 of each recorded layer's kernel (equal to the chief's record when in step)."""
    return {
        "epoch": int(getattr(trainer, "epoch_in_progress", 0) or 0),
        "batch": int(trainer.batch),
        "step": int(np.asarray(trainer.optimizer.iterations)),
        "lr": trainer.lr,
        "frozen_layers": list(trainer.state.frozen_layers),
        "n_filters": {r.name: int(r.n_filters) for r in trainer.recs},
        "kernel_l1": {r.name: float(np.abs(r.kernel()).astype(np.float64).sum()) for r in trainer.recs},
        "applied": list(getattr(trainer, "applied", [])),
    }


def broadcast_run_id(sync: CommandSync, run_id: str | None) -> str:
    """The chief's run id on every worker."""
    return sync.broadcast(run_id.encode() if run_id else None).decode()


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` means a worker of the cluster was lost (a collective failed or timed out)."""
    return isinstance(exc, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                            tf.errors.CancelledError, tf.errors.AbortedError))


class NullRecorder:
    """The recorder of a worker that is not the chief: it takes every call and writes nothing."""

    errors: list[str] = []
    fatal: str | None = None
    _prev: Any = None

    def submit(self, snapshot: Any) -> None:
        return None

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        return None

    def flush_checkpoint(self) -> None:
        return None

    def close(self) -> None:
        return None
