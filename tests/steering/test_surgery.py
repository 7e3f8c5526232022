"""Tests of model surgery: exact add/delete/reinit of filters, optimizer state carried over."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from revacnn.errors import LayerNotFoundError, SteeringError  # noqa: E402
from revacnn.steering.surgery import (  # noqa: E402
    add_filters,
    consumer_of,
    delete_filters,
    reinit_filters,
)

L = keras.layers
ATOL = 1e-5


def conv_conv(functional: bool = False) -> keras.Model:
    """conv1 -> pool -> conv2 -> gap -> dense1 -> dense2 (8x8x3 input)."""
    layers = [
        L.Conv2D(4, 3, padding="same", activation="relu", name="conv1"),
        L.MaxPooling2D(2, name="pool1"),
        L.Dropout(0.2, name="drop1"),
        L.Conv2D(5, 3, padding="same", activation="relu", name="conv2"),
        L.GlobalAveragePooling2D(name="gap"),
        L.Dense(6, activation="relu", name="dense1"),
        L.Dense(3, name="dense2"),
    ]
    return _assemble(layers, (8, 8, 3), functional)


def conv_bn_conv() -> keras.Model:
    """conv1 -> BN -> relu -> conv2 -> flatten -> dense1."""
    layers = [
        L.Conv2D(4, 3, padding="same", name="conv1"),
        L.BatchNormalization(name="bn1"),
        L.Activation("relu", name="act1"),
        L.Conv2D(3, 3, name="conv2"),
        L.Flatten(name="flat"),
        L.Dense(3, name="dense1"),
    ]
    return _assemble(layers, (8, 8, 3), False)


def conv_flatten_dense(functional: bool = False) -> keras.Model:
    """conv1 -> conv2 -> pool -> flatten -> dense1 -> dense2 (Flatten remapping on conv2)."""
    layers = [
        L.Conv2D(3, 3, padding="same", activation="relu", name="conv1"),
        L.Conv2D(4, 3, activation="relu", name="conv2"),
        L.AveragePooling2D(2, name="pool"),
        L.Flatten(name="flat"),
        L.Dense(5, activation="relu", name="dense1"),
        L.Dense(3, name="dense2"),
    ]
    return _assemble(layers, (8, 8, 3), functional)


def _assemble(layers: list, shape: tuple, functional: bool) -> keras.Model:
    if not functional:
        return keras.Sequential([keras.Input(shape), *layers], name="seq")
    x = inputs = keras.Input(shape)
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x, name="fun")


def _randomise_bn(model: keras.Model, rng: np.random.Generator) -> None:
    """Give BatchNormalization non-trivial statistics, so BN channels are really remapped."""
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.5, c).astype("float32"))
            layer.moving_mean.assign(rng.normal(0, 0.5, c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype("float32"))


def _data(model: keras.Model, n: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *model.inputs[0].shape[1:])).astype("float32")
    y = rng.integers(0, model.outputs[0].shape[-1], size=n)
    return x, y


def _train(model: keras.Model, opt: keras.optimizers.Optimizer, steps: int = 2) -> None:
    x, y = _data(model)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))


def _np(x) -> np.ndarray:
    return np.array(x.numpy())


def _setup(build, opt_factory=None, steps: int = 2, **kw):
    keras.utils.set_random_seed(1)
    model = build(**kw)
    _randomise_bn(model, np.random.default_rng(2))
    opt = (opt_factory or (lambda: keras.optimizers.Adam(1e-2)))()
    opt.build(model.trainable_variables)
    if steps:
        _train(model, opt, steps)
    return model, opt


def _out(model: keras.Model, x: np.ndarray) -> np.ndarray:
    return _np(model(x, training=False))


def _zero_outgoing(model: keras.Model, consumer: str, channels: list[int], flat_from=None):
    """A copy of ``model`` whose ``consumer`` input slices for ``channels`` are zero."""
    ref = keras.models.clone_model(model)
    ref.set_weights(model.get_weights())
    layer = ref.get_layer(consumer)
    k = _np(layer.kernel)
    if isinstance(layer, L.Conv2D):
        k[:, :, channels, :] = 0
    elif flat_from is None:
        k[channels, :] = 0
    else:  # Dense after Flatten of (H, W, C): row of (h, w, c) is h*W*C + w*C + c
        h, w, c = flat_from
        rows = [(i * w + j) * c + ch for i in range(h) for j in range(w) for ch in channels]
        k[rows, :] = 0
    layer.kernel.assign(k)
    return ref


def _slots(opt: keras.optimizers.Optimizer, var) -> list[np.ndarray]:
    i = opt._get_variable_index(var)
    lists = [
        getattr(opt, a)
        for a in ("_momentums", "_velocities", "momentums", "_average_gradients")
        if getattr(opt, a, None)
    ]
    return [_np(lst[i]) for lst in lists]


def _fresh_count(opt: keras.optimizers.Optimizer, model: keras.Model) -> int:
    fresh = type(opt).from_config(opt.get_config())
    fresh.build(model.trainable_variables)
    return len(fresh.variables)


# ------------------------------------------------------------------------------------ add


@pytest.mark.parametrize(
    ("build", "layer", "consumer", "functional"),
    [
        (conv_conv, "conv1", "conv2", False),
        (conv_conv, "conv1", "conv2", True),
        (conv_bn_conv, "conv1", "conv2", None),
        (conv_flatten_dense, "conv2", "dense1", False),
        (conv_flatten_dense, "conv2", "dense1", True),
        (conv_conv, "dense1", "dense2", False),
        (conv_conv, "conv2", "dense1", False),  # through GlobalAveragePooling2D
    ],
)
def test_add_filters_preserves_outputs(build, layer, consumer, functional):
    kw = {} if functional is None else {"functional": functional}
    model, opt = _setup(build, **kw)
    x, _ = _data(model, seed=3)
    before = _out(model, x)
    width = model.get_layer(layer).kernel.shape[-1]

    res = add_filters(model, opt, layer, 2, seed=7)

    assert [la.name for la in res.model.layers] == [la.name for la in model.layers]
    assert type(res.model) is type(model)
    new_layer, new_consumer = res.model.get_layer(layer), res.model.get_layer(consumer)
    assert new_layer.kernel.shape[-1] == width + 2
    np.testing.assert_array_equal(res.kept, [*range(width), -1, -1])
    np.testing.assert_allclose(_out(res.model, x), before, atol=ATOL)
    # the surviving filters are bit-identical, the new ones are random (not dead) with bias 0
    old_k = _np(model.get_layer(layer).kernel)
    new_k = _np(new_layer.kernel)
    np.testing.assert_array_equal(new_k[..., :width], old_k)
    assert np.abs(new_k[..., width:]).sum() > 0
    np.testing.assert_array_equal(_np(new_layer.bias)[width:], 0)
    if isinstance(new_consumer, L.Conv2D):
        assert new_consumer.kernel.shape[2] == width + 2
    assert consumer_of(res.model, layer) == consumer


def test_add_filters_bn_gets_identity_channel():
    model, opt = _setup(conv_bn_conv)
    res = add_filters(model, opt, "conv1", 3)
    bn = res.model.get_layer("bn1")
    old = model.get_layer("bn1")
    for attr, value in (("gamma", 1), ("beta", 0), ("moving_mean", 0), ("moving_variance", 1)):
        new = _np(getattr(bn, attr))
        assert new.shape == (7,)
        np.testing.assert_array_equal(new[:4], _np(getattr(old, attr)))
        np.testing.assert_array_equal(new[4:], value)


def test_add_filters_flatten_index_mapping():
    """Dense rows of the old channels move to h*W*C' + w*C' + c; new rows are zero."""
    model, opt = _setup(conv_flatten_dense)
    res = add_filters(model, opt, "conv2", 1)
    old = _np(model.get_layer("dense1").kernel).reshape(3, 3, 4, 5)
    new = _np(res.model.get_layer("dense1").kernel).reshape(3, 3, 5, 5)
    np.testing.assert_array_equal(new[:, :, :4], old)
    np.testing.assert_array_equal(new[:, :, 4], 0)


def test_add_filters_random_init_changes_outputs():
    model, opt = _setup(conv_conv)
    x, _ = _data(model, seed=3)
    a = add_filters(model, opt, "conv1", 2, init="random", seed=5)
    b = add_filters(model, opt, "conv1", 2, init="random", seed=5)
    assert not np.allclose(_out(a.model, x), _out(model, x), atol=1e-4)
    np.testing.assert_array_equal(_out(a.model, x), _out(b.model, x))  # seeded
    rows = _np(a.model.get_layer("conv2").kernel)[:, :, 4:, :]
    assert np.abs(rows).sum() > 0


# --------------------------------------------------------------------------------- delete


@pytest.mark.parametrize(
    ("build", "layer", "consumer", "drop", "flat_from"),
    [
        (conv_conv, "conv1", "conv2", [0, 2], None),
        (conv_flatten_dense, "conv2", "dense1", [1, 3], (3, 3, 4)),
        (conv_bn_conv, "conv1", "conv2", [3, 1], None),
        (conv_conv, "dense1", "dense2", [5, 0, 2], None),
    ],
)
def test_delete_filters_equals_zeroed_outgoing_weights(build, layer, consumer, drop, flat_from):
    model, opt = _setup(build)
    x, _ = _data(model, seed=4)
    # Reference: the OLD model with the deleted filters' outgoing weights zeroed. With a BN in
    # between, zeroing the filter's output would not do (BN adds beta to a zero channel).
    reference = _out(_zero_outgoing(model, consumer, drop, flat_from), x)
    assert not np.allclose(reference, _out(model, x), atol=1e-4)  # the deletion matters

    res = delete_filters(model, opt, layer, drop)

    width = model.get_layer(layer).kernel.shape[-1]
    keep = [i for i in range(width) if i not in drop]
    np.testing.assert_array_equal(res.kept, keep)
    assert res.model.get_layer(layer).kernel.shape[-1] == width - len(drop)
    np.testing.assert_allclose(_out(res.model, x), reference, atol=ATOL)
    np.testing.assert_array_equal(
        _np(res.model.get_layer(layer).kernel),
        _np(model.get_layer(layer).kernel)[..., keep],
    )


# ------------------------------------------------------------------------------ optimizer


OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(1e-2),
    "sgd_momentum": lambda: keras.optimizers.SGD(1e-2, momentum=0.9),
    "adamw": lambda: keras.optimizers.AdamW(1e-2),
    "rmsprop_centered": lambda: keras.optimizers.RMSprop(1e-2, momentum=0.5, centered=True),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_optimizer_state_carried_over_add_and_delete(opt_name):
    model, opt = _setup(conv_flatten_dense, OPTIMIZERS[opt_name], steps=3)
    opt.learning_rate = 0.003  # a changed learning rate survives
    old_conv, old_dense = model.get_layer("conv2"), model.get_layer("dense1")
    old_k = _slots(opt, old_conv.kernel)
    old_b = _slots(opt, old_conv.bias)
    old_d = _slots(opt, old_dense.kernel)
    assert old_k and all(np.abs(s).sum() > 0 for s in old_k)

    added = add_filters(model, opt, "conv2", 2)
    deleted = delete_filters(model, opt, "conv2", [0, 2])
    for res in (added, deleted):
        new_opt = res.optimizer
        assert type(new_opt) is type(opt)
        assert int(new_opt.iterations) == int(opt.iterations) == 3
        assert float(new_opt.learning_rate) == pytest.approx(0.003)
        assert len(new_opt.variables) == len(opt.variables)
        assert len(new_opt.variables) == _fresh_count(opt, res.model)
        conv, dense = res.model.get_layer("conv2"), res.model.get_layer("dense1")
        have = res.kept >= 0
        src = res.kept[have]
        for old_s, new_s in zip(old_k, _slots(new_opt, conv.kernel), strict=True):
            np.testing.assert_array_equal(new_s[..., have], old_s[..., src])
            np.testing.assert_array_equal(new_s[..., ~have], 0)
        for old_s, new_s in zip(old_b, _slots(new_opt, conv.bias), strict=True):
            np.testing.assert_array_equal(new_s[have], old_s[src])
            np.testing.assert_array_equal(new_s[~have], 0)
        for old_s, new_s in zip(old_d, _slots(new_opt, dense.kernel), strict=True):
            old4 = old_s.reshape(3, 3, 4, 5)
            new4 = new_s.reshape(3, 3, len(res.kept), 5)
            np.testing.assert_array_equal(new4[:, :, have], old4[:, :, src])
            np.testing.assert_array_equal(new4[:, :, ~have], 0)
        # untouched layers: slots identical
        for old_s, new_s in zip(
            _slots(opt, model.get_layer("conv1").kernel),
            _slots(new_opt, res.model.get_layer("conv1").kernel),
            strict=True,
        ):
            np.testing.assert_array_equal(new_s, old_s)
        _train(res.model, new_opt, steps=1)  # no "Unknown variable"
        assert int(new_opt.iterations) == 4


@pytest.mark.parametrize(
    "factory",
    [keras.optimizers.Nadam, keras.optimizers.Adagrad, keras.optimizers.Lion],
    ids=["nadam", "adagrad", "lion"],
)
def test_other_optimizers_keep_every_variable(factory):
    """Whatever the optimizer's slots are called, every variable is carried over by value."""
    model, opt = _setup(conv_conv, lambda: factory(1e-2))
    res = add_filters(model, opt, "conv1", 1)
    assert len(res.optimizer.variables) == len(opt.variables) == _fresh_count(opt, res.model)
    for old, new in zip(opt.variables, res.optimizer.variables, strict=True):
        old_v, new_v = _np(old), _np(new)
        if old_v.shape == new_v.shape:  # globals (iteration, Nadam's u_product) and other layers
            np.testing.assert_array_equal(new_v, old_v)
        else:  # slots of conv1 (last axis) and conv2 (input axis): old part kept, new part 0
            axis = -1 if new_v.ndim == 1 or new_v.shape[-1] != old_v.shape[-1] else 2
            kept = np.take(new_v, range(old_v.shape[axis]), axis=axis)
            np.testing.assert_array_equal(kept, old_v)
            np.testing.assert_array_equal(np.take(new_v, [-1], axis=axis), 0)
    _train(res.model, res.optimizer, steps=1)


def test_training_after_surgery_with_compile_and_fit():
    model, opt = _setup(conv_bn_conv)
    res = add_filters(model, opt, "conv1", 2)
    res = delete_filters(res.model, res.optimizer, "conv1", [0])
    res.model.compile(
        optimizer=res.optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = _data(res.model)
    res.model.train_on_batch(x, y)
    assert int(res.optimizer.iterations) == 3
    assert res.model.optimizer is res.optimizer


# -------------------------------------------------------------------------------- reinit


def test_reinit_filters_in_place():
    model, opt = _setup(conv_conv)
    conv = model.get_layer("conv2")
    before = _np(conv.kernel)
    slots_before = _slots(opt, conv.kernel)
    reinit_filters(model, opt, "conv2", [1, 3], seed=3)
    after = _np(conv.kernel)
    np.testing.assert_array_equal(after[..., [0, 2, 4]], before[..., [0, 2, 4]])
    assert not np.allclose(after[..., [1, 3]], before[..., [1, 3]])
    np.testing.assert_array_equal(_np(conv.bias)[[1, 3]], 0)
    for old_s, new_s in zip(slots_before, _slots(opt, conv.kernel), strict=True):
        np.testing.assert_array_equal(new_s[..., [0, 2, 4]], old_s[..., [0, 2, 4]])
        np.testing.assert_array_equal(new_s[..., [1, 3]], 0)
    for s in _slots(opt, conv.bias):
        np.testing.assert_array_equal(s[[1, 3]], 0)
    _train(model, opt, steps=1)


# ----------------------------------------------------------------------------- bad input


def test_consumer_of():
    model = conv_flatten_dense()
    assert consumer_of(model, "conv1") == "conv2"
    assert consumer_of(model, "conv2") == "dense1"
    assert consumer_of(model, "dense2") is None
    assert consumer_of(conv_bn_conv(), "conv1") == "conv2"


def test_bad_requests_are_refused_with_clear_messages():
    model, opt = _setup(conv_conv, steps=0)
    with pytest.raises(LayerNotFoundError, match=r"Received: layer='conv9' \(layers are conv1, "):
        add_filters(model, opt, "conv9", 1)
    with pytest.raises(LayerNotFoundError, match="conv9"):
        consumer_of(model, "conv9")
    with pytest.raises(SteeringError, match="n=0"):
        add_filters(model, opt, "conv1", 0)
    with pytest.raises(SteeringError, match="n=-2"):
        add_filters(model, opt, "conv1", -2)
    with pytest.raises(SteeringError, match="init='ones'"):
        add_filters(model, opt, "conv1", 1, init="ones")
    with pytest.raises(SteeringError, match="every filter"):
        delete_filters(model, opt, "conv1", [0, 1, 2, 3])
    with pytest.raises(SteeringError, match=r"out of range.*\[4\].*0\.\.3"):
        delete_filters(model, opt, "conv1", [1, 4])
    with pytest.raises(SteeringError, match="out of range"):
        reinit_filters(model, opt, "conv1", [-1])
    with pytest.raises(SteeringError, match="Duplicate"):
        delete_filters(model, opt, "conv1", [1, 1])
    with pytest.raises(SteeringError, match="No filter indices"):
        delete_filters(model, opt, "conv1", [])
    with pytest.raises(SteeringError, match="output layer"):
        add_filters(model, opt, "dense2", 1)
    with pytest.raises(SteeringError, match="output layer"):
        delete_filters(model, opt, "dense2", [0])
    with pytest.raises(SteeringError, match="MaxPooling2D"):
        add_filters(model, opt, "pool1", 1)
    # nothing was changed by the refused requests
    assert model.get_layer("conv1").kernel.shape[-1] == 4
