"""The compiled step's annealing window (``--auto-freeze``): a per-layer update scale, checked against plain SGD by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ..conftest import tiny_cnn

LR = 0.05


def _setup(keras, tiny_data):
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = tiny_cnn(keras, bn=True)
    opt = keras.optimizers.SGD(LR)  # no momentum: one step moves every weight by exactly -lr * grad
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy())
    opt.build(model.trainable_variables)
    (x, y), _ = tiny_data
    return model, opt, tf.constant(x[:64].astype("float32") / 255.0), tf.constant(y[:64])


def _reference_grads(keras, model, x, y, names):
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    vs = [v for n in names for v in model.get_layer(n).trainable_variables]
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    return [g.numpy() for g in tape.gradient(loss, vs)], [v.numpy().copy() for v in vs]


@pytest.mark.parametrize("window, iteration, scale", [
    ((10.0, 20.0), 15, 0.5),  # half-way through the window: cosine 0.5
    ((10.0, 20.0), 12, 0.5 * (1 + math.cos(math.pi * 0.2))),
    ((10.0, 20.0), 10, 1.0),  # its first step: full rate
    ((10.0, 20.0), 20, 0.0),  # its end and after: nothing
    ((10.0, 20.0), 25, 0.0),
    ((10.0, 20.0), 3, 1.0),  # before it
])
def test_anneal_scale_is_a_cosine_over_the_window(window, iteration, scale):
    import tensorflow as tf

    from revacnn.trainer.step import anneal_scale

    got = float(anneal_scale(tf.constant(iteration, tf.int64), tf.Variable(window, dtype=tf.float64)))
    assert got == pytest.approx(scale, abs=1e-12)


def test_an_annealed_layer_and_its_batchnorm_move_by_the_scale_the_others_by_the_full_rate(keras_mod, tiny_data):
    import tensorflow as tf

    from revacnn.models.graph import recorded_layers
    from revacnn.trainer.step import LayerSpec, StepState, build_train_step

    keras = keras_mod
    model, opt, x, y = _setup(keras, tiny_data)
    recs = recorded_layers(model)
    # iteration 0, window [-2, 2]: t = 0.5, so conv2 (and its BatchNorm bn2) move at half the rate
    window = tf.Variable([-2.0, 2.0], dtype=tf.float64)

    specs = [LayerSpec(r, False, None, window if r.name == "conv2" else None) for r in recs]
    step, _ = build_train_step(model, opt, specs, StepState(specs))
    names = ["conv1", "conv2", "bn2", "dense1"]
    grads, before = _reference_grads(keras, model, x, y, names)
    step(x, y)
    after = [v.numpy() for n in names for v in model.get_layer(n).trainable_variables]
    owners = [n for n in names for _ in model.get_layer(n).trainable_variables]
    for owner, g, b, a in zip(owners, grads, before, after, strict=True):
        s = 0.5 if owner in ("conv2", "bn2") else 1.0
        np.testing.assert_allclose(a, b - s * LR * g, rtol=1e-5, atol=1e-7, err_msg=owner)


def test_at_scale_zero_the_layer_stays_bit_exact_and_an_idle_window_changes_nothing(keras_mod, tiny_data):
    import tensorflow as tf

    from revacnn.models.graph import recorded_layers
    from revacnn.trainer.step import ANNEAL_IDLE, LayerSpec, StepState, build_train_step

    keras = keras_mod
    model, opt, x, y = _setup(keras, tiny_data)
    twin, twin_opt, _, _ = _setup(keras, tiny_data)
    twin.set_weights(model.get_weights())
    window = tf.Variable([ANNEAL_IDLE, ANNEAL_IDLE], dtype=tf.float64)
    specs = [LayerSpec(r, False, None, window if r.name == "conv2" else None) for r in recorded_layers(model)]
    step, _ = build_train_step(model, opt, specs, StepState(specs))
    plain = [LayerSpec(r, False, None) for r in recorded_layers(twin)]
    twin_step, _ = build_train_step(twin, twin_opt, plain, StepState(plain))
    for _ in range(3):  # idle window: bit-identical to the step without one
        step(x, y)
        twin_step(x, y)
    for a, b in zip(model.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    window.assign([0.0, 3.0])  # ended (iteration 3): scale 0, and moving the window re-traced nothing
    kernel = model.get_layer("conv2").kernel.numpy().copy()
    gamma = model.get_layer("bn2").gamma.numpy().copy()
    conv1 = model.get_layer("conv1").kernel.numpy().copy()
    for _ in range(3):
        step(x, y)
    np.testing.assert_array_equal(model.get_layer("conv2").kernel.numpy(), kernel)
    np.testing.assert_array_equal(model.get_layer("bn2").gamma.numpy(), gamma)
    assert not np.array_equal(model.get_layer("conv1").kernel.numpy(), conv1)  # the others still train
    assert step.experimental_get_tracing_count() == 1
