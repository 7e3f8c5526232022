"""The compiled train step: forward, the compiled loss, gradients of the unfrozen variables, update, in-step sums."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ..models.graph import GraphProbe, RecordedLayer

# Steering re-traces the step on purpose (that is how freezing saves time); don't warn about it.
tf.get_logger().setLevel("ERROR")


@dataclass
class LayerSpec:
    """What the step needs to know about one recorded (conv or dense) layer."""

    rec: RecordedLayer
    frozen: bool  # the whole layer: left out of the gradient computation
    frozen_mask: np.ndarray | None  # (F,) bool: single frozen filters (kept bit-identical)
    #: ``(2,)`` float64 ``[start, end]`` optimizer iterations of an update-scale annealing window
    #: (`anneal_scale`; `--auto-freeze`), or None: the layer's updates are never scaled
    anneal: tf.Variable | None = None

    @property
    def layer(self) -> keras.layers.Layer:
        return self.rec.layer


class StepState:
    """Non-trainable accumulators the step writes into: per-filter grad L1 and running metrics."""

    def __init__(self, specs: Sequence[LayerSpec]) -> None:
        self.grad_l1 = {
            s.rec.name: tf.Variable(tf.zeros([s.rec.n_filters], tf.float32), trainable=False)
            for s in specs
        }
        self.loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        self.correct = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.seen = tf.Variable(0, dtype=tf.int64, trainable=False)

    def reset(self) -> None:
        """Zero everything: the metrics and the per-filter gradient sums."""
        self.reset_metrics()
        for v in self.grad_l1.values():
            v.assign(tf.zeros_like(v))

    def reset_metrics(self) -> None:
        self.loss_sum.assign(0.0)
        self.correct.assign(0)
        self.seen.assign(0)

    def metrics(self) -> tuple[float, float]:
        """(mean loss, accuracy) of the examples seen since the last reset."""
        seen = max(int(self.seen.numpy()), 1)
        return float(self.loss_sum.numpy()) / seen, int(self.correct.numpy()) / seen

    def take_grad_l1(self) -> dict[str, np.ndarray]:
        """Read and zero the per-filter gradient sums."""
        out = {}
        for name, v in self.grad_l1.items():
            out[name] = v.numpy().copy()
            v.assign(tf.zeros_like(v))
        return out


def hits(y: tf.Tensor, pred: tf.Tensor) -> tf.Tensor:
    """Correct predictions in a batch (int64), for integer or one-hot labels and any class count."""
    pred = tf.convert_to_tensor(pred)
    y = tf.convert_to_tensor(y)
    if pred.shape[-1] == 1:  # one sigmoid/logit unit
        lo = tf.reduce_min(pred)
        thresh = tf.where(lo < 0.0, tf.constant(0.0, pred.dtype), tf.constant(0.5, pred.dtype))
        p = tf.reshape(pred > thresh, [-1])
        t = tf.reshape(tf.cast(y, tf.float32) > 0.5, [-1])
    else:
        p = tf.argmax(pred, axis=-1, output_type=tf.int32)
        if y.shape.rank == pred.shape.rank and y.shape[-1] == pred.shape[-1]:
            t = tf.argmax(y, axis=-1, output_type=tf.int32)
        else:
            t = tf.reshape(tf.cast(y, tf.int32), tf.shape(p))
    return tf.reduce_sum(tf.cast(tf.equal(p, t), tf.int64))


def per_filter_l1(rec: RecordedLayer, g_kernel: tf.Tensor, g_bias: tf.Tensor | None) -> tf.Tensor:
    """``(F,)`` L1 norm of the gradient of each filter's kernel (and bias)."""
    rank = len(g_kernel.shape)
    g = tf.reduce_sum(tf.abs(g_kernel), axis=list(range(rank - (2 if rec.ctype == "depthwise" else 1))))
    g = tf.reshape(g, [-1])
    if g_bias is not None:
        g = g + tf.abs(g_bias)
    return g


ANNEAL_IDLE: float = 1e30
"""The start (and end) of an annealing window that has not begun: the scale stays 1."""


def anneal_scale(iteration: tf.Tensor, window: tf.Variable) -> tf.Tensor:
    """The update scale of a layer at ``iteration``: 1 before its window, cosine down to 0 at its end.

    ``window`` holds ``[start, end]`` optimizer iterations; the scale is
    ``0.5 * (1 + cos(pi * t))`` with ``t = (iteration - start) / (end - start)`` clipped to [0, 1]
    (FreezeOut's per-layer cosine annealing, over the window only), so it is exactly 1 before
    ``start`` (and while the window is `ANNEAL_IDLE`) and exactly 0 from ``end`` on.
    """
    it = tf.cast(iteration, tf.float64)
    t = tf.clip_by_value((it - window[0]) / tf.maximum(window[1] - window[0], 1.0), 0.0, 1.0)
    return tf.where(t >= 1.0, tf.constant(0.0, tf.float64), 0.5 * (1.0 + tf.cos(np.pi * t)))


def own_normalizers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """The BatchNormalization layers that normalize ``layer``'s output and nothing else.

    A frozen conv leaves its BatchNorm's scale and offset out of the gradient too: the conv+BN unit
    then computes a fixed function of its input (up to the moving statistics), and backpropagation
    below a frozen stage stops, which is what makes freezing a stage of a residual net save time.
    """
    out = []
    try:
        for node in getattr(layer, "_outbound_nodes", []):
            op = getattr(node, "operation", None)
            if not isinstance(op, keras.layers.BatchNormalization) or op in out:
                continue
            # every call of the BN (a model built twice, a clone) takes this layer's output alone
            parents = [p.operation for n in op._inbound_nodes for p in n.parent_nodes]
            if parents and all(p is layer for p in parents):
                out.append(op)
    except Exception:  # a graph Keras does not expose: freeze the layer alone
        return []
    return out


def trainable_split(model: keras.Model, specs: Sequence[LayerSpec]) -> list[Any]:
    """The trainable variables that get gradients: all of the model's but the frozen layers'
    (a frozen layer's own BatchNorm included, see `own_normalizers`)."""
    frozen = set()
    for s in specs:
        if s.frozen:
            frozen |= {id(v) for v in s.layer.trainable_variables}
            frozen |= {id(v) for bn in own_normalizers(s.layer) for v in bn.trainable_variables}
    return [v for v in model.trainable_variables if id(v) not in frozen]


def _plain_adam(optimizer: Any, variables: Sequence[Any]) -> bool:
    """Whether ``optimizer`` is a plain `keras.optimizers.Adam` that `apply_adam` reproduces exactly."""
    if type(optimizer) is not keras.optimizers.Adam or tf.distribute.has_strategy():
        return False
    plain = (
        not optimizer.amsgrad
        and optimizer.clipnorm is None
        and optimizer.clipvalue is None
        and optimizer.global_clipnorm is None
        and not optimizer.weight_decay
        and not optimizer.use_ema
        and not optimizer.gradient_accumulation_steps
        and optimizer.loss_scale_factor is None
        and all(isinstance(b, (int, float)) for b in (optimizer.beta_1, optimizer.beta_2, optimizer.epsilon))
    )
    return plain and all(
        v.dtype == "float32" and v.constraint is None and not getattr(v, "overwrite_with_gradient", False)
        for v in variables
    )


def apply_adam(optimizer: Any, grads: Sequence[Any], variables: Sequence[Any]) -> bool:
    """Apply a plain Adam update with a smaller traced graph than ``optimizer.apply``; False if not plain.

    The same float32 operations, in the same order and with the same constants, as Keras'
    ``Adam.update_step`` (so the result is bit-identical; `tests/trainer/test_step_cache.py`
    checks it against ``optimizer.apply``), but the learning rate, step and bias corrections are
    traced once instead of once per variable, and the raw TensorFlow ops skip Keras' per-op
    dispatch and its per-variable distribution-strategy wrapper. For resnet20 the traced train
    step shrinks from ≈ 4,900 to ≈ 3,600 graph nodes, which shortens both the Python trace and
    the first call (Grappler) after every surgery or freeze. Any other optimizer, or Adam with
    amsgrad, clipping, weight decay, EMA, gradient accumulation, loss scaling, a constrained or
    non-float32 variable, or a missing gradient, returns False: the caller uses ``optimizer.apply``.

    Args:
        optimizer: The optimizer the model was compiled with (built over ``variables``).
        grads: One gradient per variable.
        variables: The variables to update.

    Returns:
        Whether the update was applied (traced).
    """
    if not _plain_adam(optimizer, variables) or any(g is None for g in grads) or not grads:
        return False
    if any(isinstance(g, tf.IndexedSlices) for g in grads):
        return False
    f32 = tf.float32
    lr = tf.cast(optimizer.learning_rate, f32)  # a schedule is evaluated at the current iteration
    local_step = tf.cast(optimizer.iterations + 1, f32)
    beta_1_power = tf.pow(tf.constant(optimizer.beta_1, f32), local_step)
    beta_2_power = tf.pow(tf.constant(optimizer.beta_2, f32), local_step)
    alpha = lr * tf.sqrt(1 - beta_2_power) / (1 - beta_1_power)
    one_minus_b1 = tf.constant(1 - optimizer.beta_1, f32)
    one_minus_b2 = tf.constant(1 - optimizer.beta_2, f32)
    eps = tf.constant(optimizer.epsilon, f32)
    for g, var in zip(grads, variables, strict=True):
        i = optimizer._get_variable_index(var)
        m = optimizer._momentums[i].value
        v = optimizer._velocities[i].value
        g = tf.cast(g, f32)
        m.assign_add((g - m) * one_minus_b1)
        v.assign_add((tf.square(g) - v) * one_minus_b2)
        var.value.assign_sub((m * alpha) / (tf.sqrt(v) + eps))
    optimizer._iterations.assign_add(1)
    return True


def make_update(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    specs: Sequence[LayerSpec],
    state: StepState,
    loss_fn: Callable[[Any, Any, Any], tf.Tensor],
) -> Callable[[Any, Any], tf.Tensor]:
    """The untraced body of a train step: ``update(x, y) -> loss`` (trace it inside a tf.function).

    Frozen layers' variables are not in the gradient computation at all (that is what saves
    time). Frozen single filters get zero gradient and are restored after the update, so they
    stay bit-identical under any optimizer (Adam's momentum would otherwise move them).
    The per-filter gradient L1 of every unfrozen recorded layer is accumulated in the step.
    A layer with an annealing window (`LayerSpec.anneal`; its own BatchNorm's scale and offset
    too) moves by `anneal_scale` times the optimizer's update: ``v <- v_old + s * (v_new - v_old)``,
    a per-layer learning-rate factor for any optimizer (the moments still see the full gradient,
    as a smaller learning rate would leave them). At ``s == 1`` the new value is kept as the
    optimizer made it (bit-identical to a step without the window); at ``s == 0`` the old one.
    The window is a variable, so moving it re-traces nothing.
    """
    train_vars = trainable_split(model, specs)
    var_pos = {id(v): i for i, v in enumerate(train_vars)}
    acc = []  # (rec, kernel index, bias index or None, accumulator)
    restore = []  # (variable, grad index, saved value, broadcast mask)
    for s in specs:
        if s.frozen:
            continue
        rec = s.rec
        kvar, bvar = rec.kernel_var, rec.bias_var
        if id(kvar) not in var_pos:  # the layer is not trainable at all (layer.trainable=False)
            continue
        ki = var_pos[id(kvar)]
        bi = var_pos.get(id(bvar)) if bvar is not None else None
        acc.append((rec, ki, bi, state.grad_l1[rec.name]))
        if s.frozen_mask is not None and s.frozen_mask.any():
            for var, gi in ((kvar, ki), (bvar, bi)):
                if var is None or gi is None:
                    continue
                m = tf.constant(rec.filter_mask(var, s.frozen_mask))
                restore.append((var, gi, tf.constant(var.numpy()), m))
    annealed = []  # (window, [variables it scales])
    for s in specs:
        if s.frozen or s.anneal is None:
            continue
        own = [*s.layer.trainable_variables, *(v for bn in own_normalizers(s.layer) for v in bn.trainable_variables)]
        scaled = [v for v in own if id(v) in var_pos]
        if scaled:
            annealed.append((s.anneal, scaled))

    def update(x: Any, y: Any) -> tf.Tensor:
        with tf.GradientTape() as tape:
            pred = model(x, training=True)
            loss = loss_fn(x, y, pred)
        grads = tape.gradient(loss, train_vars)
        for _var, gi, _, m in restore:
            grads[gi] = tf.where(m, tf.zeros_like(grads[gi]), grads[gi])
        scales = [anneal_scale(optimizer.iterations, window) for window, _ in annealed]
        olds = [[tf.identity(v) for v in scaled] for _, scaled in annealed]
        if not apply_adam(optimizer, grads, train_vars):
            optimizer.apply(grads, train_vars)
        for var, _, saved, m in restore:
            var.assign(tf.where(m, saved, var))
        for scale, (_, scaled), old in zip(scales, annealed, olds, strict=True):
            for var, o in zip(scaled, old, strict=True):
                sv = tf.cast(scale, var.dtype)
                var.assign(tf.where(scale >= 1.0, var, tf.where(scale <= 0.0, o, o + sv * (var - o))))
        for rec, ki, bi, accumulator in acc:
            accumulator.assign_add(per_filter_l1(rec, grads[ki], grads[bi] if bi is not None else None))
        n = tf.shape(tf.nest.flatten(x)[0])[0]
        state.loss_sum.assign_add(tf.cast(loss, tf.float64) * tf.cast(n, tf.float64))
        state.correct.assign_add(hits(y, pred))
        state.seen.assign_add(tf.cast(n, tf.int64))
        return loss

    return update


def compiled_loss(model: keras.Model, *, training: bool) -> Callable[[Any, Any, Any], tf.Tensor]:
    """``loss(x, y, pred)``: the model's compiled loss plus its regularisation losses."""

    def loss(x: Any, y: Any, pred: Any) -> tf.Tensor:
        return model.compute_loss(x=x, y=y, y_pred=pred, training=training)

    return loss


def build_train_step(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    specs: Sequence[LayerSpec],
    state: StepState,
    *,
    x_all: tf.Tensor | None = None,
    y_all: tf.Tensor | None = None,
) -> tuple[Callable[[Any, Any], tf.Tensor], Callable[[tf.Tensor], tf.Tensor] | None]:
    """Trace train steps for the model as compiled (its loss, the given optimizer).

    Returns:
        ``(step(x, y) -> loss, step_idx(indices) -> loss)``: the first takes a batch as given
        (a dataset's), the second gathers a batch of device-resident arrays ``x_all``/``y_all``
        by indices (None when no arrays are given). Both are `tf.function`s.
    """
    update = make_update(model, optimizer, specs, state, compiled_loss(model, training=True))

    @tf.function(jit_compile=False, reduce_retracing=True)
    def step(x: Any, y: Any) -> tf.Tensor:
        return update(x, y)

    step_idx = None
    if x_all is not None:

        @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)], jit_compile=False)
        def step_idx(idx: tf.Tensor) -> tf.Tensor:
            return update(tf.gather(x_all, idx), tf.gather(y_all, idx))

    return step, step_idx


def build_eval_step(model: keras.Model) -> Callable[[Any, Any], tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
    """``eval(x, y) -> (loss_sum, n_correct, n)`` in inference mode, with the compiled loss."""
    loss_fn = compiled_loss(model, training=False)

    @tf.function(jit_compile=False, reduce_retracing=True)
    def evaluate(x: Any, y: Any) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        pred = model(x, training=False)
        n = tf.shape(tf.nest.flatten(x)[0])[0]
        loss = tf.cast(loss_fn(x, y, pred), tf.float64) * tf.cast(n, tf.float64)
        return loss, hits(y, pred), tf.cast(n, tf.int64)

    return evaluate


def build_probe_step(
    model: keras.Model, layers: Sequence[RecordedLayer]
) -> Callable[[Any], tuple[list[tf.Tensor], tf.Tensor]]:
    """``probe(x) -> ([post-activation output of each conv layer], model output)``, from the graph itself."""
    gp = GraphProbe(model, layers)

    @tf.function(jit_compile=False, reduce_retracing=True)
    def probe(x: Any) -> tuple[list[tf.Tensor], tf.Tensor]:
        return gp(x)

    return probe


# ---------------------------------------------------------------- traced steps, cached (steering speed)
@dataclass
class TracedSteps:
    """One frozen set's train steps (see `build_train_step`) and the accumulators they write into."""

    state: StepState
    step: Callable[[Any, Any], tf.Tensor]
    step_idx: Callable[[tf.Tensor], tf.Tensor] | None


class StepCache:
    """The traced steps of one model and optimizer, so that steering re-traces only what changed.

    * Train steps are kept per frozen set of whole layers (the LRU ``limit`` most recent):
      unfreezing back to a set seen before, or a command that leaves the set as it was
      (``reinit-filters``, which changes values in place), reuses the traced step and its
      accumulators instead of tracing the step again. A frozen set with single frozen filters
      is never cached: its step holds the frozen filters' values as constants.
    * The eval and probe functions do not depend on what is frozen: they are made once per model.
    * Any other model, optimizer or training arrays (after surgery) clear the cache.

    Example:
        >>> cache = StepCache()
        >>> traced, hit = cache.steps(model, optimizer, specs)  # hit: no new tf.function traced
        >>> evaluate, probe = cache.eval_step(model), cache.probe_step(model, recs)
    """

    def __init__(self, limit: int = 8) -> None:
        self.limit = limit
        self._owner: tuple[Any, ...] = ()
        self._steps: dict[tuple[str, ...], TracedSteps] = {}
        self._eval: Callable[[Any, Any], tuple[tf.Tensor, tf.Tensor, tf.Tensor]] | None = None
        self._probe: Callable[[Any], tuple[list[tf.Tensor], tf.Tensor]] | None = None

    def _check_owner(self, *owner: Any) -> None:
        if len(owner) != len(self._owner) or any(a is not b for a, b in zip(owner, self._owner, strict=False)):
            self._owner, self._steps, self._eval, self._probe = owner, {}, None, None

    @staticmethod
    def key(specs: Sequence[LayerSpec]) -> tuple[str, ...] | None:
        """The frozen layers' names (then ``"anneal:NAME"`` of layers with an annealing window), or
        None when single filters are frozen (not cacheable)."""
        if any(s.frozen_mask is not None and s.frozen_mask.any() for s in specs if not s.frozen):
            return None
        frozen = tuple(sorted(s.rec.name for s in specs if s.frozen))
        return frozen + tuple(sorted(f"anneal:{s.rec.name}" for s in specs if not s.frozen and s.anneal is not None))

    def steps(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        specs: Sequence[LayerSpec],
        *,
        x_all: tf.Tensor | None = None,
        y_all: tf.Tensor | None = None,
    ) -> tuple[TracedSteps, bool]:
        """The train steps for ``specs``: ``(steps, hit)``, ``hit`` when they were traced before."""
        self._check_owner(model, optimizer, x_all, y_all)
        key = self.key(specs)
        if key is not None and key in self._steps:
            traced = self._steps.pop(key)
            self._steps[key] = traced  # most recently used last
            return traced, True
        state = StepState(specs)
        step, step_idx = build_train_step(model, optimizer, specs, state, x_all=x_all, y_all=y_all)
        traced = TracedSteps(state, step, step_idx)
        if key is not None:
            self._steps[key] = traced
            while len(self._steps) > self.limit:
                self._steps.pop(next(iter(self._steps)))
        return traced, False

    def eval_step(self, model: keras.Model) -> Callable[[Any, Any], tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
        """`build_eval_step` of ``model``, made once per model."""
        if not self._owner or self._owner[0] is not model:
            self._check_owner(model)
        if self._eval is None:
            self._eval = build_eval_step(model)
        return self._eval

    def probe_step(
        self, model: keras.Model, layers: Sequence[RecordedLayer]
    ) -> Callable[[Any], tuple[list[tf.Tensor], tf.Tensor]]:
        """`build_probe_step` of ``model``, made once per model."""
        if not self._owner or self._owner[0] is not model:
            self._check_owner(model)
        if self._probe is None:
            self._probe = build_probe_step(model, layers)
        return self._probe


def as_probabilities(out: np.ndarray) -> np.ndarray:
    """The model's output as class probabilities (a softmax over logits; one sigmoid unit -> two classes)."""
    out = np.asarray(out, np.float64)
    if out.ndim == 1:
        out = out[:, None]
    if out.shape[-1] == 1:
        p = out[:, 0]
        if p.min() < 0 or p.max() > 1:
            p = 1.0 / (1.0 + np.exp(-p))
        return np.stack([1 - p, p], axis=1).astype(np.float32)
    if out.min() < 0 or not np.allclose(out.sum(axis=1), 1.0, atol=1e-3):
        z = out - out.max(axis=1, keepdims=True)
        e = np.exp(z)
        out = e / e.sum(axis=1, keepdims=True)
    return out.astype(np.float32)
