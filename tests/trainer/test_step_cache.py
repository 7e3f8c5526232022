"""Traced steps cached by frozen set (step.StepCache): reuse after unfreezing back, equal to a fresh tape."""

from __future__ import annotations

import numpy as np

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
