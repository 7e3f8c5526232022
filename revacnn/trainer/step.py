"""The compiled train step: forward, loss, gradients of the unfrozen variables, update, and in-step sums."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

# Steering re-traces the step on purpose (that is how freezing saves time); don't warn about it.
tf.get_logger().setLevel("ERROR")


@dataclass
class LayerSpec:
    """What the step needs to know about one weighted (conv or dense) layer."""

    layer: keras.layers.Layer
    frozen: bool  # the whole layer: left out of the gradient computation
    frozen_mask: np.ndarray | None  # (F,) bool: single frozen filters (kept bit-identical)


class StepState:
    """Non-trainable accumulators the step writes into: per-filter grad L1 and running metrics."""

    def __init__(self, specs: Sequence[LayerSpec]) -> None:
        self.grad_l1 = {
            s.layer.name: tf.Variable(tf.zeros([_n_out(s.layer)], tf.float32), trainable=False)
            for s in specs
        }
        self.loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        self.correct = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.seen = tf.Variable(0, dtype=tf.int64, trainable=False)

    def reset_metrics(self) -> None:
        self.loss_sum.assign(0.0)
        self.correct.assign(0)
        self.seen.assign(0)

    def take_grad_l1(self) -> dict[str, np.ndarray]:
        """Read and zero the per-filter gradient sums."""
        out = {}
        for name, v in self.grad_l1.items():
            out[name] = v.numpy().copy()
            v.assign(tf.zeros_like(v))
        return out


def _n_out(layer: keras.layers.Layer) -> int:
    return int(layer.kernel.shape[-1])


def build_train_step(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    loss_fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
    x_all: tf.Tensor,
    y_all: tf.Tensor,
    specs: Sequence[LayerSpec],
    state: StepState,
    scale: float = 1.0 / 255.0,
) -> Callable[[tf.Tensor], tf.Tensor]:
    """Trace a train step over batch indices into ``x_all``/``y_all``.

    Frozen layers' variables are not in the gradient computation at all (that is what saves
    time). Frozen single filters get zero gradient and are restored after the update, so they
    stay bit-identical under any optimizer (Adam's momentum would otherwise move them).
    The per-filter gradient L1 of every unfrozen weighted layer is accumulated in the step.

    Returns:
        ``step(indices) -> loss``, a `tf.function`.
    """
    frozen_layers = {s.layer.name for s in specs if s.frozen}
    train_vars = [
        v for layer in model.layers if layer.name not in frozen_layers for v in layer.trainable_variables
    ]
    var_pos = {id(v): i for i, v in enumerate(train_vars)}
    acc = []  # (kernel index, bias index or None, accumulator)
    restore = []  # (variable, grad index, saved value, broadcast mask)
    for s in specs:
        if s.frozen:
            continue
        layer = s.layer
        ki = var_pos[id(layer.kernel)]
        bi = var_pos[id(layer.bias)] if getattr(layer, "bias", None) is not None else None
        acc.append((ki, bi, state.grad_l1[layer.name], len(layer.kernel.shape)))
        if s.frozen_mask is not None and s.frozen_mask.any():
            m = tf.constant(s.frozen_mask)
            restore.append((layer.kernel, ki, tf.constant(layer.kernel.numpy()), m))
            if bi is not None:
                restore.append((layer.bias, bi, tf.constant(layer.bias.numpy()), m))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)], jit_compile=False)
    def step(idx: tf.Tensor) -> tf.Tensor:
        x = tf.cast(tf.gather(x_all, idx), tf.float32) * scale
        y = tf.gather(y_all, idx)
        with tf.GradientTape() as tape:
            pred = model(x, training=True)
            loss = loss_fn(y, pred)
            if model.losses:
                loss = loss + tf.add_n(model.losses)
        grads = tape.gradient(loss, train_vars)
        for _var, gi, _, m in restore:
            grads[gi] = tf.where(m, tf.zeros_like(grads[gi]), grads[gi])
        optimizer.apply(grads, train_vars)
        for var, _, saved, m in restore:
            var.assign(tf.where(m, saved, var))
        for ki, bi, accumulator, rank in acc:
            g = tf.reduce_sum(tf.abs(grads[ki]), axis=list(range(rank - 1)))
            if bi is not None:
                g = g + tf.abs(grads[bi])
            accumulator.assign_add(g)
        n = tf.shape(idx)[0]
        state.loss_sum.assign_add(tf.cast(loss, tf.float64) * tf.cast(n, tf.float64))
        hit = tf.equal(tf.argmax(pred, axis=-1, output_type=tf.int32), tf.cast(y, tf.int32))
        state.correct.assign_add(tf.reduce_sum(tf.cast(hit, tf.int64)))
        state.seen.assign_add(tf.cast(n, tf.int64))
        return loss

    return step


def build_eval_step(
    model: keras.Model, loss_fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor], scale: float = 1.0 / 255.0
) -> Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """``eval(x_uint8, y) -> (loss_sum, n_correct)`` in inference mode."""

    @tf.function(jit_compile=False, reduce_retracing=True)
    def evaluate(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        pred = model(tf.cast(x, tf.float32) * scale, training=False)
        n = tf.cast(tf.shape(x)[0], tf.float64)
        loss = tf.cast(loss_fn(y, pred), tf.float64) * n
        hit = tf.equal(tf.argmax(pred, axis=-1, output_type=tf.int32), tf.cast(y, tf.int32))
        return loss, tf.reduce_sum(tf.cast(hit, tf.int64))

    return evaluate


def build_probe_step(
    model: keras.Model, scale: float = 1.0 / 255.0
) -> Callable[[tf.Tensor], tuple[list[tf.Tensor], tf.Tensor]]:
    """``probe(x_uint8) -> ([post-activation output of each conv layer], probabilities)``.

    A conv layer's output is taken after its own activation, or after an Activation/ReLU layer that
    directly follows it.
    """
    layers = list(model.layers)
    take = []
    for i, layer in enumerate(layers):
        if isinstance(layer, keras.layers.Conv2D):
            j = i
            if i + 1 < len(layers) and isinstance(layers[i + 1], (keras.layers.Activation, keras.layers.ReLU)):
                j = i + 1
            take.append(j)

    @tf.function(jit_compile=False, reduce_retracing=True)
    def probe(x: tf.Tensor) -> tuple[list[tf.Tensor], tf.Tensor]:
        h = tf.cast(x, tf.float32) * scale
        outs = []
        for i, layer in enumerate(layers):
            h = layer(h, training=False)
            if i in take:
                outs.append(h)
        return outs, h

    return probe
