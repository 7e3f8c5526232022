"""Traced steps cached by frozen set (step.StepCache): reuse after unfreezing back, equal to a fresh tape."""

from __future__ import annotations

import numpy as np
import pytest

from ..conftest import tiny_cnn


def _models(keras, bn: bool):
    keras.utils.set_random_seed(0)
    a = tiny_cnn(keras, bn=bn)
    b = tiny_cnn(keras, bn=bn)
    b.set_weights(a.get_weights())
    out = []
    for m in (a, b):
        opt = keras.optimizers.Adam(1e-2)
        m.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy())
        opt.build(m.trainable_variables)
        out.append((m, opt))
    return out


def test_cached_steps_follow_a_reference_tape_through_freeze_unfreeze_freeze(keras_mod, tiny_data):
    import tensorflow as tf

    from revacnn.models.graph import recorded_layers
    from revacnn.trainer.step import LayerSpec, StepCache, own_normalizers

    keras = keras_mod
    (x, y), _ = tiny_data
    x = tf.constant(x[:64].astype("float32") / 255.0)
    y = tf.constant(y[:64])
    (model, opt), (ref, ref_opt) = _models(keras, bn=True)
    recs = recorded_layers(model)
    cache = StepCache()
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    def ref_step(frozen: set[str]) -> None:  # the reference: its own tape over the unfrozen variables
        skip = {id(v) for n in frozen for v in ref.get_layer(n).trainable_variables}
        skip |= {id(v) for n in frozen for bn in own_normalizers(ref.get_layer(n)) for v in bn.trainable_variables}
        train = [v for v in ref.trainable_variables if id(v) not in skip]
        with tf.GradientTape() as tape:
            loss = loss_fn(y, ref(x, training=True))
        ref_opt.apply(tape.gradient(loss, train), train)

    hits, grads = [], []
    schedule = [{"conv2"}, set(), {"conv2"}, set()]  # the 3rd and 4th sets were traced before
    for frozen in schedule:
        specs = [LayerSpec(r, r.name in frozen, None) for r in recs]
        traced, hit = cache.steps(model, opt, specs)
        hits.append(hit)
        before = model.get_layer("conv2").kernel.numpy().copy()
        gamma = model.get_layer("bn2").gamma.numpy().copy()
        for _ in range(2):
            traced.step(x, y)
            ref_step(frozen)
        if frozen:  # frozen: bit-identical, its BatchNorm's scale too
            np.testing.assert_array_equal(model.get_layer("conv2").kernel.numpy(), before)
            np.testing.assert_array_equal(model.get_layer("bn2").gamma.numpy(), gamma)
            assert "conv2" not in [n for n, v in traced.state.take_grad_l1().items() if v.any()]
        else:
            grads.append(traced.state.take_grad_l1()["conv2"])
        for w, w_ref in zip(model.get_weights(), ref.get_weights(), strict=True):
            np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-6)
    assert hits == [False, False, True, True]
    assert all(g.any() for g in grads)


def test_frozen_filters_and_other_models_are_not_cached(keras_mod):
    from revacnn.models.graph import recorded_layers
    from revacnn.trainer.step import LayerSpec, StepCache

    (model, opt), (other, other_opt) = _models(keras_mod, bn=False)
    recs = recorded_layers(model)
    cache = StepCache()
    mask = np.zeros(recs[0].n_filters, bool)
    mask[0] = True
    filt = [LayerSpec(r, False, mask if i == 0 else None) for i, r in enumerate(recs)]
    assert not cache.steps(model, opt, filt)[1]
    assert not cache.steps(model, opt, filt)[1]  # the frozen filters' values are constants of the step
    plain = [LayerSpec(r, False, None) for r in recs]
    assert not cache.steps(model, opt, plain)[1]
    assert cache.steps(model, opt, plain)[1]
    evaluate = cache.eval_step(model)
    assert cache.eval_step(model) is evaluate
    other_recs = recorded_layers(other)
    assert not cache.steps(other, other_opt, [LayerSpec(r, False, None) for r in other_recs])[1]
    assert cache.eval_step(other) is not evaluate


def _ref_fit_steps(keras, tf, model, opt, x, y, steps: int, skip: set[str] = frozenset()) -> None:
    """The reference: a tape over the unfrozen variables and Keras' own ``optimizer.apply``."""
    from revacnn.trainer.step import own_normalizers

    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    out = {id(v) for n in skip for v in model.get_layer(n).trainable_variables}
    out |= {id(v) for n in skip for bn in own_normalizers(model.get_layer(n)) for v in bn.trainable_variables}
    train = [v for v in model.trainable_variables if id(v) not in out]

    @tf.function
    def step() -> None:
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        opt.apply(tape.gradient(loss, train), train)

    for _ in range(steps):
        step()


@pytest.mark.parametrize(
    "make_opt, frozen",
    [
        (lambda k: k.optimizers.Adam(1e-2), set()),
        (lambda k: k.optimizers.Adam(1e-2), {"conv1"}),
        (lambda k: k.optimizers.Adam(k.optimizers.schedules.ExponentialDecay(1e-2, 2, 0.5), beta_1=0.8), set()),
        (lambda k: k.optimizers.Adam(1e-2, amsgrad=True), set()),  # not plain: Keras' own apply
        (lambda k: k.optimizers.SGD(1e-2, momentum=0.9), set()),  # another optimizer: Keras' own apply
        # (Keras' apply in a different graph than the reference's: equal up to float rounding)
    ],
    ids=["adam", "adam-frozen-conv1", "adam-schedule", "adam-amsgrad", "sgd"],
)
def test_train_step_updates_bit_identical_to_keras_optimizer_apply(keras_mod, tiny_data, make_opt, frozen):
    """The step's own Adam path (`step.apply_adam`) and the fallback equal Keras' ``optimizer.apply``
    bit for bit: weights, BatchNorm statistics, every optimizer variable (moments, iterations)."""
    import tensorflow as tf

    from revacnn.models.graph import recorded_layers
    from revacnn.trainer.step import LayerSpec, StepCache

    keras = keras_mod
    (x, y), _ = tiny_data
    x = tf.constant(x[:32].astype("float32") / 255.0)
    y = tf.constant(y[:32])
    pairs = []
    for _ in range(2):
        keras.utils.set_random_seed(0)
        m = tiny_cnn(keras, bn=True)
        opt = make_opt(keras)
        m.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy())
        opt.build(m.trainable_variables)
        pairs.append((m, opt))
    (model, opt), (ref, ref_opt) = pairs
    start = model.get_weights()
    specs = [LayerSpec(r, r.name in frozen, None) for r in recorded_layers(model)]
    traced, _ = StepCache().steps(model, opt, specs)
    for _ in range(5):
        traced.step(x, y)
    _ref_fit_steps(keras, tf, ref, ref_opt, x, y, 5, skip=frozen)
    assert int(opt.iterations.numpy()) == 5
    exact = isinstance(opt, keras.optimizers.Adam)
    same = np.testing.assert_array_equal if exact else lambda a, b, **kw: np.testing.assert_allclose(
        a, b, rtol=1e-5, atol=1e-8, **kw)
    for w, w_ref in zip(model.get_weights(), ref.get_weights(), strict=True):
        same(w, w_ref)
    for v, v_ref in zip(opt.variables, ref_opt.variables, strict=True):
        same(np.asarray(v), np.asarray(v_ref), err_msg=v.path)
    moved = [not np.array_equal(a, b) for a, b in zip(model.get_weights(), start, strict=True)]
    assert sum(moved) >= 4  # it trained (kernels, biases, BatchNorm)


def test_plain_adam_is_recognised_and_the_rest_falls_back(keras_mod, monkeypatch):
    """`apply_adam` takes only an Adam that it reproduces exactly, and traces a smaller graph than Keras'."""
    from revacnn.models.graph import recorded_layers
    from revacnn.trainer import step as step_mod
    from revacnn.trainer.step import LayerSpec, StepState, _plain_adam, build_train_step

    keras = keras_mod
    keras.utils.set_random_seed(0)
    model = tiny_cnn(keras, bn=True)
    variables = model.trainable_variables
    assert _plain_adam(keras.optimizers.Adam(1e-3), variables)
    for opt in (keras.optimizers.Adam(1e-3, amsgrad=True), keras.optimizers.Adam(1e-3, clipnorm=1.0),
                keras.optimizers.Adam(1e-3, weight_decay=1e-4), keras.optimizers.AdamW(1e-3),
                keras.optimizers.Adam(1e-3, use_ema=True), keras.optimizers.RMSprop(1e-3)):
        assert not _plain_adam(opt, variables), opt
    import tensorflow as tf

    nodes = {}
    for name in ("own", "keras"):
        if name == "keras":
            monkeypatch.setattr(step_mod, "apply_adam", lambda *a: False)
        opt = keras.optimizers.Adam(1e-3)
        model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy())
        opt.build(model.trainable_variables)
        specs = [LayerSpec(r, False, None) for r in recorded_layers(model)]
        step, _ = build_train_step(model, opt, specs, StepState(specs))
        g = step.get_concrete_function(tf.TensorSpec([None, 12, 12, 3]), tf.TensorSpec([None], tf.int64)).graph
        nodes[name] = len(g.get_operations())
    assert nodes["own"] < nodes["keras"]
