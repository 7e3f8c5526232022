"""Group filter surgery on graphs: residual Adds, Concatenates and depthwise convolutions, against references."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from revacnn.errors import LayerNotFoundError, SteeringError  # noqa: E402
from revacnn.steering import graph  # noqa: E402
from revacnn.steering.surgery import _slot_vars  # noqa: E402

L = keras.layers
ATOL = 1e-5


# --------------------------------------------------------------------------------------------
# The three graphs
# --------------------------------------------------------------------------------------------


def _conv_bn(x, filters: int, name: str, strides: int = 1, kernel: int = 3):
    x = L.Conv2D(filters, kernel, strides=strides, padding="same", name=name)(x)
    return L.BatchNormalization(name=name + "_bn")(x)


def resnet_like(head_activation: str | None = None) -> keras.Model:
    """A two-block CIFAR-ResNet: stem, an identity block, a projection block (stride 2), GAP, head.

    Groups: {stem, b1c2} (the identity sum) and {b2c2, b2sc} (the projection sum).
    """
    inp = keras.Input((8, 8, 3), name="image")
    x = L.ReLU(name="stem_relu")(_conv_bn(inp, 4, "stem"))
    y = L.ReLU(name="b1_relu")(_conv_bn(x, 4, "b1c1"))
    y = _conv_bn(y, 4, "b1c2")
    x = L.ReLU(name="b1_out")(L.Add(name="b1_add")([x, y]))
    y = L.ReLU(name="b2_relu")(_conv_bn(x, 6, "b2c1", strides=2))
    y = _conv_bn(y, 6, "b2c2")
    sc = _conv_bn(x, 6, "b2sc", strides=2, kernel=1)
    x = L.ReLU(name="b2_out")(L.Add(name="b2_add")([sc, y]))
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, L.Dense(3, activation=head_activation, name="head")(x), name="resnet_like")


def densenet_like() -> keras.Model:
    """conv0 -> [x0, d1(x0)] -> [.., d2(..)] -> BN -> relu -> 1x1 transition -> GAP -> head."""
    inp = keras.Input((8, 8, 3))
    x0 = L.Conv2D(4, 3, padding="same", name="conv0")(inp)
    h = L.ReLU(name="r1")(L.BatchNormalization(name="bn1")(x0))
    d1 = L.Conv2D(3, 3, padding="same", name="d1")(h)
    c1 = L.Concatenate(name="cat1")([x0, d1])  # 7 = 4 + 3
    h = L.ReLU(name="r2")(L.BatchNormalization(name="bn2")(c1))
    d2 = L.Conv2D(3, 3, padding="same", name="d2")(h)
    c2 = L.Concatenate(name="cat2")([c1, d2])  # 10 = 4 + 3 + 3
    h = L.ReLU(name="r3")(L.BatchNormalization(name="bn3")(c2))
    t = L.Conv2D(5, 1, name="trans")(h)
    t = L.AveragePooling2D(2, name="pool")(t)
    x = L.GlobalAveragePooling2D(name="gap")(t)
    return keras.Model(inp, L.Dense(3, name="head")(x), name="densenet_like")


def mobilenet_like() -> keras.Model:
    """conv0 -> depthwise (x2) -> 1x1 -> inverted residual (expand, depthwise, project, Add) ->
    SeparableConv2D -> GAP -> head."""
    inp = keras.Input((8, 8, 3))
    x = L.ReLU(name="r0")(L.BatchNormalization(name="bn0")(L.Conv2D(4, 3, padding="same", name="conv0")(inp)))
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw1")(x)  # 8 channels
    x = L.ReLU(name="r1")(L.BatchNormalization(name="bn1")(x))
    x = L.BatchNormalization(name="bn_pw1")(L.Conv2D(5, 1, name="pw1")(x))
    e = L.ReLU(6.0, name="r_e")(L.Conv2D(8, 1, name="expand")(x))
    e = L.ReLU(6.0, name="r_dw")(L.DepthwiseConv2D(3, padding="same", name="dw2")(e))
    e = L.BatchNormalization(name="bn_proj")(L.Conv2D(5, 1, name="project")(e))
    x = L.Add(name="add")([x, e])
    x = L.SeparableConv2D(6, 3, depth_multiplier=2, padding="same", activation="relu", name="sep")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, L.Dense(3, name="head")(x), name="mobilenet_like")


BUILDERS = {"resnet": resnet_like, "densenet": densenet_like, "mobilenet": mobilenet_like}


def _randomise(model: keras.Model, seed: int = 0) -> keras.Model:
    """Non-trivial BatchNorm statistics and biases, so that remapping mistakes show."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.3, c).astype("float32"))
            layer.moving_mean.assign(rng.normal(0, 0.3, c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, c).astype("float32"))
        elif getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0, 0.2, layer.bias.shape).astype("float32"))
    return model


def _x(n: int = 4, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 8, 8, 3)).astype("float32")


def _train(model: keras.Model, optimizer: keras.optimizers.Optimizer, steps: int = 2) -> None:
    """A few optimizer steps, so that slots are non-zero."""
    optimizer.build(model.trainable_variables)
    x = _x(8, seed=3)
    y = np.arange(8) % 3
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)


def _cmd(op: str, layer: str, **args) -> dict:
    return {"op": op, "args": {"layer": layer, **args}}


def _out(model: keras.Model, x: np.ndarray) -> np.ndarray:
    return np.asarray(model(x, training=False))


# Hand-written expectations: (model, target layer) -> the producers of the group (their kernel's
# last axis and bias change), the BatchNorms that follow them, and the consumers with the axis
# of their kernel that reads the group, plus the offset of the group's channels there.
CASES = {
    ("resnet", "stem"): dict(
        producers=["stem", "b1c2"], bns=["stem_bn", "b1c2_bn"],
        consumers={"b1c1": (2, 0), "b2c1": (2, 0), "b2sc": (2, 0)},
    ),
    ("resnet", "b2sc"): dict(
        producers=["b2c2", "b2sc"], bns=["b2c2_bn", "b2sc_bn"], consumers={"head": (0, 0)},
    ),
    ("resnet", "b1c1"): dict(producers=["b1c1"], bns=["b1c1_bn"], consumers={"b1c2": (2, 0)}),
    ("densenet", "d1"): dict(
        producers=["d1"], bns=[],
        # d1's channels sit at offset 4 of cat1 and of cat2; bn2 and bn3 see them there.
        consumers={"d2": (2, 4), "trans": (2, 4)}, members={"bn2": 4, "bn3": 4},
    ),
    ("densenet", "conv0"): dict(
        producers=["conv0"], bns=["bn1"],
        consumers={"d1": (2, 0), "d2": (2, 0), "trans": (2, 0)}, members={"bn2": 0, "bn3": 0},
    ),
    ("mobilenet", "pw1"): dict(
        producers=["pw1", "project"], bns=["bn_pw1", "bn_proj"],
        consumers={"expand": (2, 0), "sep": (2, 0)},
    ),
}


def _group_weights_ok(old: keras.Model, new: keras.Model, case: dict, idx: list[int] | None,
                      n_new: int = 0) -> None:
    """Every weight equals the old one with the group's slices deleted (or grown by n_new)."""
    touched = {}
    for p in case["producers"]:
        touched[(p, "kernel")] = (3, 0)
        touched[(p, "bias")] = (0, 0)
    for b in case["bns"]:
        for v in ("gamma", "beta", "moving_mean", "moving_variance"):
            touched[(b, v)] = (0, 0)
    for b, off in case.get("members", {}).items():
        for v in ("gamma", "beta", "moving_mean", "moving_variance"):
            touched[(b, v)] = (0, off)
    for c, (axis, off) in case["consumers"].items():
        layer = old.get_layer(c)
        if isinstance(layer, L.SeparableConv2D):  # its depthwise part follows, its pointwise reads
            m = layer.depth_multiplier
            touched[(c, "depthwise_kernel")] = (2, off)
            touched[(c, "pointwise_kernel")] = (2, off, m)
        else:
            touched[(c, "kernel")] = (axis, off)
    width = old.get_layer(case["producers"][0]).kernel.shape[-1]
    for layer in old.layers:
        for ov in layer.weights:
            name = ov.path.split("/")[-1]
            nv = next(v for v in new.get_layer(layer.name).weights if v.path.split("/")[-1] == name)
            o, n = np.asarray(ov), np.asarray(nv)
            if (layer.name, name) not in touched:
                np.testing.assert_array_equal(n, o, err_msg=ov.path)
                continue
            axis, off, m = (*touched[(layer.name, name)], 1)[:3]
            if idx is not None:
                drop = [(off + i) * m + j for i in idx for j in range(m)]
                np.testing.assert_array_equal(n, np.delete(o, drop, axis=axis), err_msg=ov.path)
            else:
                assert n.shape[axis] == o.shape[axis] + n_new * m, ov.path
                new_pos = list(range((off + width) * m, (off + width + n_new) * m))
                keep = np.delete(n, new_pos, axis=axis)
                np.testing.assert_array_equal(keep, o, err_msg=ov.path)


# --------------------------------------------------------------------------------------------
# Add is function-preserving
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_add_filters_is_function_preserving(case):
    name, layer = case
    model = _randomise(BUILDERS[name]())
    x = _x()
    before = _out(model, x)
    res = graph.apply(model, None, _cmd("add-filters", layer, n=3), seed=5)
    np.testing.assert_allclose(_out(res.model, x), before, atol=ATOL, rtol=0)
    _group_weights_ok(model, res.model, CASES[case], None, n_new=3)
    for p in CASES[case]["producers"]:
        assert res.model.get_layer(p).kernel.shape[-1] == model.get_layer(p).kernel.shape[-1] + 3
        assert res.changed[p].tolist()[-3:] == [-1, -1, -1]
    # new filters are not dead: they got a fresh (non-zero) kernel
    new_k = np.asarray(res.model.get_layer(layer).kernel)[..., -3:]
    assert np.abs(new_k).sum() > 0
    # consumers read the new channels with zero weights
    for c, (axis, off) in CASES[case]["consumers"].items():
        w = model.get_layer(CASES[case]["producers"][0]).kernel.shape[-1]
        layer = res.model.get_layer(c)
        m = getattr(layer, "depth_multiplier", 1)
        kernel = layer.pointwise_kernel if isinstance(layer, L.SeparableConv2D) else layer.kernel
        k = np.take(np.asarray(kernel), range((off + w) * m, (off + w + 3) * m), axis=axis)
        assert not k.any(), c


def test_add_filters_random_init_changes_outputs_and_consumers_get_weights():
    model = _randomise(resnet_like())
    x = _x()
    res = graph.apply(model, None, _cmd("add-filters", "stem", n=2, init="random"), seed=1)
    k = np.asarray(res.model.get_layer("b1c1").kernel)[:, :, 4:, :]
    assert np.abs(k).sum() > 0
    assert np.abs(_out(res.model, x) - _out(model, x)).max() > 1e-4


def test_add_filters_mobilenet_depthwise_follows_its_producer():
    model = _randomise(mobilenet_like())
    x = _x()
    res = graph.apply(model, None, _cmd("add-filters", "conv0", n=2), seed=0)
    np.testing.assert_allclose(_out(res.model, x), _out(model, x), atol=ATOL, rtol=0)
    new = res.model
    assert new.get_layer("dw1").kernel.shape == (3, 3, 6, 2)   # one depthwise filter pair per channel
    assert new.get_layer("bn1").gamma.shape == (12,)           # 6 channels x multiplier 2
    assert new.get_layer("pw1").kernel.shape == (1, 1, 12, 5)
    assert not np.asarray(new.get_layer("pw1").kernel)[:, :, 8:, :].any()
    np.testing.assert_array_equal(np.asarray(new.get_layer("dw1").kernel)[:, :, :4],
                                  np.asarray(model.get_layer("dw1").kernel))
    assert res.changed["dw1"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, -1, -1, -1, -1]
    # the separable conv's pointwise part is the consumer of the residual group
    res2 = graph.apply(model, None, _cmd("add-filters", "pw1", n=1), seed=0)
    np.testing.assert_allclose(_out(res2.model, x), _out(model, x), atol=ATOL, rtol=0)
    sep = res2.model.get_layer("sep")
    assert sep.depthwise_kernel.shape == (3, 3, 6, 2) and sep.pointwise_kernel.shape == (1, 1, 12, 6)
    assert not np.asarray(sep.pointwise_kernel)[:, :, 10:, :].any()


# --------------------------------------------------------------------------------------------
# Delete equals zeroing
# --------------------------------------------------------------------------------------------


def _zeroed(model: keras.Model, case: dict, idx: list[int]) -> keras.Model:
    """A copy of the old model with the deleted channels' outgoing weights zeroed (by hand)."""
    ref = keras.models.clone_model(model)
    ref.set_weights(model.get_weights())
    for c, (axis, off) in case["consumers"].items():
        layer = ref.get_layer(c)
        if isinstance(layer, L.SeparableConv2D):
            k = np.asarray(layer.depthwise_kernel).copy()
            k[:, :, [off + i for i in idx], :] = 0
            layer.depthwise_kernel.assign(k)
            continue
        k = np.asarray(layer.kernel).copy()
        sl = [slice(None)] * k.ndim
        sl[axis] = [off + i for i in idx]
        k[tuple(sl)] = 0
        layer.kernel.assign(k)
    return ref


@pytest.mark.parametrize("case", sorted(CASES))
def test_delete_filters_equals_zeroing_throughout_the_group(case):
    name, layer = case
    model = _randomise(BUILDERS[name]())
    x = _x()
    idx = [0, 2]
    reference = _out(_zeroed(model, CASES[case], idx), x)
    res = graph.apply(model, None, _cmd("delete-filters", layer, indices=idx))
    np.testing.assert_allclose(_out(res.model, x), reference, atol=ATOL, rtol=0)
    _group_weights_ok(model, res.model, CASES[case], idx)
    plan = res.plan
    consumers = {c.layer for c in plan.changes if "consumer" in c.role}
    assert consumers == set(CASES[case]["consumers"])
    assert set(plan.group) == set(CASES[case]["producers"])


def test_delete_mobilenet_depthwise_channel_takes_its_source():
    model = _randomise(mobilenet_like())
    # dw1 output 5 = input channel 2, multiplier index 1: its pair (4, 5) and conv0's filter 2 go
    res = graph.apply(model, None, _cmd("delete-filters", "dw1", indices=[5]))
    assert res.changed["conv0"].tolist() == [0, 1, 3]
    assert res.changed["dw1"].tolist() == [0, 1, 2, 3, 6, 7]
    ref = keras.models.clone_model(model)
    ref.set_weights(model.get_weights())
    k = np.asarray(ref.get_layer("pw1").kernel).copy()
    k[:, :, [4, 5], :] = 0
    ref.get_layer("pw1").kernel.assign(k)
    x = _x()
    np.testing.assert_allclose(_out(res.model, x), _out(ref, x), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------
# Reinit changes only those channels
# --------------------------------------------------------------------------------------------


def test_reinit_changes_only_those_channels():
    model = _randomise(resnet_like())
    x = _x()
    # stem_bn's output depends on the stem's filters only: exactly channels 1 and 3 change
    probe = keras.Model(model.inputs[0], model.get_layer("stem_bn").output)
    opt = keras.optimizers.Adam(1e-2)
    _train(model, opt)
    weights = {v.path: np.asarray(v).copy() for v in model.weights}
    before = np.asarray(probe(x, training=False))
    slots = {v.path: [np.asarray(s).copy() for s in _slot_vars(opt, v)] for v in model.trainable_weights}
    res = graph.apply(model, opt, _cmd("reinit-filters", "stem", indices=[1, 3]), seed=2)
    assert res.model is model and res.optimizer is opt
    assert {c.layer for c in res.plan.changes} == {"stem", "stem_bn", "b1c2", "b1c2_bn"}
    after = np.asarray(probe(x, training=False))
    np.testing.assert_array_equal(after[..., [0, 2]], before[..., [0, 2]])
    assert np.abs(after[..., [1, 3]] - before[..., [1, 3]]).max() > 1e-3
    group = {"stem/kernel", "stem/bias", "b1c2/kernel", "b1c2/bias"}
    for v in model.weights:
        old, new = weights[v.path], np.asarray(v)
        if v.path in group or v.path.startswith(("stem_bn/", "b1c2_bn/")):
            np.testing.assert_array_equal(new[..., [0, 2]], old[..., [0, 2]], err_msg=v.path)
            assert not np.array_equal(new[..., [1, 3]], old[..., [1, 3]]), v.path
        else:
            np.testing.assert_array_equal(new, old, err_msg=v.path)
    for v in model.trainable_weights:
        for s_old, s in zip(slots[v.path], _slot_vars(opt, v), strict=True):
            s_new = np.asarray(s)
            if v.path in group or v.path.startswith(("stem_bn/", "b1c2_bn/")):
                assert not s_new[..., [1, 3]].any(), v.path
                np.testing.assert_array_equal(s_new[..., [0, 2]], s_old[..., [0, 2]])
            else:
                np.testing.assert_array_equal(s_new, s_old, err_msg=v.path)


# --------------------------------------------------------------------------------------------
# Optimizer slots
# --------------------------------------------------------------------------------------------

OPTIMIZERS = {
    "adam": lambda: keras.optimizers.Adam(1e-2),
    "adamw": lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.01),
    "sgd_momentum": lambda: keras.optimizers.SGD(1e-2, momentum=0.9),
    "rmsprop": lambda: keras.optimizers.RMSprop(1e-2, momentum=0.5),
}


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("op", ["delete", "add"])
def test_surviving_slots_equal_slice_for_slice(opt_name, op):
    case = CASES[("resnet", "stem")]
    model = _randomise(resnet_like())
    opt = OPTIMIZERS[opt_name]()
    _train(model, opt, steps=3)
    opt.learning_rate = 0.0123
    idx = [1, 2]
    cmd = _cmd("delete-filters", "stem", indices=idx) if op == "delete" else _cmd("add-filters", "stem", n=2)
    res = graph.apply(model, opt, cmd, seed=0)
    new_opt = res.optimizer
    assert type(new_opt) is type(opt)
    assert int(new_opt.iterations) == int(opt.iterations) == 3
    assert float(new_opt.learning_rate) == pytest.approx(0.0123)
    assert len(new_opt.variables) == len(opt.variables)
    axes = {(p, "kernel"): (3, 0) for p in case["producers"]}
    axes.update({(p, "bias"): (0, 0) for p in case["producers"]})
    axes.update({(b, v): (0, 0) for b in case["bns"] for v in ("gamma", "beta")})
    axes.update({(c, "kernel"): ax for c, ax in case["consumers"].items()})
    n_slots = 0
    for ov in model.trainable_weights:
        layer, vname = ov.path.split("/")[0], ov.path.split("/")[-1]
        nv = next(v for v in res.model.get_layer(layer).trainable_weights if v.path.endswith("/" + vname))
        old_slots, new_slots = _slot_vars(opt, ov), _slot_vars(new_opt, nv)
        assert len(old_slots) == len(new_slots) >= 1, ov.path
        for so, sn in zip(old_slots, new_slots, strict=True):
            so, sn = np.asarray(so), np.asarray(sn)
            n_slots += 1
            if (layer, vname) not in axes:
                np.testing.assert_array_equal(sn, so, err_msg=ov.path)
                continue
            axis, _ = axes[(layer, vname)]
            if op == "delete":
                np.testing.assert_array_equal(sn, np.delete(so, idx, axis=axis), err_msg=ov.path)
            else:
                w = so.shape[axis]
                np.testing.assert_array_equal(np.take(sn, range(w), axis=axis), so, err_msg=ov.path)
                assert not np.take(sn, range(w, w + 2), axis=axis).any(), ov.path
    assert n_slots >= len(model.trainable_weights)
    # the carried-over optimizer keeps training the new model
    _train(res.model, new_opt, steps=1)
    assert int(new_opt.iterations) == 4


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


def _chain_with(middle: keras.layers.Layer) -> keras.Model:
    inp = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, padding="same", name="conv1")(inp)
    x = middle(x)
    x = L.Conv2D(3, 3, padding="same", name="conv2")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, L.Dense(2, name="head")(x))


def test_softmax_over_channels_is_refused_with_the_layer_named():
    model = _chain_with(L.Activation("softmax", name="soft"))
    with pytest.raises(SteeringError, match="'soft'.*mixes channels"):
        graph.plan(model, _cmd("add-filters", "conv1", n=2))
    with pytest.raises(SteeringError, match="'soft'"):
        graph.apply(model, None, _cmd("delete-filters", "conv1", indices=[0]))
    # the chain surgery refuses it too (it used to report 'applied' with outputs changed)
    from revacnn.steering import surgery

    opt = keras.optimizers.Adam()
    opt.build(model.trainable_variables)
    with pytest.raises(SteeringError, match="soft"):
        surgery.add_filters(model, opt, "conv1", 2)
    # an element-wise activation passes
    ok = _chain_with(L.Activation("gelu", name="act"))
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    res = graph.apply(ok, None, _cmd("add-filters", "conv1", n=2))
    np.testing.assert_allclose(_out(res.model, x), _out(ok, x), atol=ATOL)


def test_conv_with_softmax_activation_is_refused():
    inp = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, activation="softmax", name="conv1")(inp)
    x = L.Conv2D(3, 3, name="conv2")(x)
    model = keras.Model(inp, L.Dense(2, name="head")(L.Flatten()(x)))
    with pytest.raises(SteeringError, match="'conv1'.*softmax"):
        graph.plan(model, _cmd("add-filters", "conv1", n=1))


@pytest.mark.parametrize(
    "middle, named",
    [
        (L.Reshape((6, 12, 2), name="reshape"), "reshape"),
        (L.LayerNormalization(name="ln"), "ln"),
        (L.Softmax(name="sm"), "sm"),
    ],
)
def test_channel_mixing_layers_are_refused(middle, named):
    model = _chain_with(middle)
    with pytest.raises(SteeringError, match=f"'{named}'"):
        graph.plan(model, _cmd("delete-filters", "conv1", indices=[1]))


def test_grouped_conv_and_model_input_and_output_are_refused():
    inp = keras.Input((6, 6, 4))
    x = L.Conv2D(4, 3, padding="same", name="conv1")(inp)
    x = L.Conv2D(4, 3, padding="same", groups=2, name="grouped")(x)
    model = keras.Model(inp, L.Dense(2, name="head")(L.GlobalAveragePooling2D()(x)))
    with pytest.raises(SteeringError, match="'grouped'.*grouped"):
        graph.plan(model, _cmd("add-filters", "conv1", n=2))
    # a residual sum with the model input: the input's channels are fixed
    y = L.Add(name="plus_input")([inp, L.Conv2D(4, 3, padding="same", name="c")(inp)])
    m2 = keras.Model(inp, L.Dense(2, name="head2")(L.GlobalAveragePooling2D()(y)))
    with pytest.raises(SteeringError, match="model input"):
        graph.plan(m2, _cmd("add-filters", "c", n=1))
    with pytest.raises(SteeringError, match="output"):
        graph.plan(m2, _cmd("add-filters", "head2", n=1))
    with pytest.raises(LayerNotFoundError, match="nope"):
        graph.plan(m2, _cmd("add-filters", "nope", n=1))
    with pytest.raises(SteeringError, match="at least one must remain"):
        graph.plan(resnet_like(), _cmd("delete-filters", "stem", indices=[0, 1, 2, 3]))
    with pytest.raises(SteeringError, match="out of range"):
        graph.plan(resnet_like(), _cmd("delete-filters", "stem", indices=[9]))


def test_adding_to_a_group_with_a_frozen_consumer_is_refused():
    model = resnet_like()
    with pytest.raises(SteeringError, match="'b2sc' is frozen.*dead on arrival"):
        graph.plan(model, _cmd("add-filters", "stem", n=1), frozen={"b2sc"})
    with pytest.raises(SteeringError, match="'b1c2' is frozen"):
        graph.plan(model, _cmd("add-filters", "stem", n=1), frozen={"b1c2"})
    # deleting in a frozen group is fine, and a frozen layer elsewhere does not matter
    graph.plan(model, _cmd("delete-filters", "stem", indices=[0]), frozen={"b2sc"})
    graph.plan(model, _cmd("add-filters", "stem", n=1), frozen={"head"})


def test_nested_model_is_refused_by_name():
    inner_in = keras.Input((6, 6, 4))
    inner = keras.Model(inner_in, L.Conv2D(3, 3, name="ic")(inner_in), name="inner")
    inp = keras.Input((6, 6, 3))
    x = L.Conv2D(4, 3, padding="same", name="conv1")(inp)
    x = inner(x)
    model = keras.Model(inp, L.Dense(2, name="head")(L.GlobalAveragePooling2D()(x)))
    with pytest.raises(SteeringError, match="'inner'.*nested"):
        graph.plan(model, _cmd("add-filters", "conv1", n=1))


# --------------------------------------------------------------------------------------------
# Plans and Sequential models
# --------------------------------------------------------------------------------------------


def test_plan_is_plain_data_and_lists_every_touched_layer():
    import json

    model = densenet_like()
    p = graph.plan(model, _cmd("add-filters", "d1", n=2))
    d = json.loads(json.dumps(p.to_dict()))
    assert d["op"] == "add-filters" and d["group"] == ["d1"]
    by = {c["layer"]: c for c in d["changes"]}
    assert set(by) == {"d1", "cat1", "bn2", "r2", "d2", "cat2", "bn3", "r3", "trans"}
    assert by["d1"]["out_channels"] == [3, 5] and by["d1"]["added"] == [3, 4]
    assert by["cat1"]["out_channels"] == [7, 9] and by["cat1"]["added"] == [7, 8]
    assert by["d2"]["role"] == "consumer" and by["d2"]["in_added"] == [7, 8]
    assert by["cat2"]["added"] == [7, 8]  # d1's new channels sit before d2's in cat2
    assert by["trans"]["in_channels"] == [10, 12]
    assert "d1/kernel" in by["d1"]["variables"]
    text = p.format()
    assert "trans" in text and "7-8" in text
    # planning changes nothing
    assert model.get_layer("d1").kernel.shape[-1] == 3


def test_sequential_chain_matches_chain_surgery():
    from revacnn.steering import surgery

    model = keras.Sequential(
        [keras.Input((8, 8, 3)), L.Conv2D(4, 3, padding="same", activation="relu", name="conv1"),
         L.MaxPooling2D(2, name="pool"), L.Conv2D(5, 3, name="conv2"), L.Flatten(name="flat"),
         L.Dense(3, name="dense")]
    )
    opt = keras.optimizers.Adam(1e-2)
    _train(model, opt)
    x = _x()
    for cmd, chain in [
        (_cmd("add-filters", "conv2", n=2, init="random"),
         lambda: surgery.add_filters(model, opt, "conv2", 2, init="random", seed=4)),
        (_cmd("delete-filters", "conv1", indices=[1, 2]),
         lambda: surgery.delete_filters(model, opt, "conv1", [1, 2])),
    ]:
        g, c = graph.apply(model, opt, cmd, seed=4), chain()
        assert isinstance(g.model, keras.Sequential)
        for a, b in zip(g.model.weights, c.model.weights, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
        for a, b in zip(g.optimizer.variables, c.optimizer.variables, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
        np.testing.assert_array_equal(_out(g.model, x), _out(c.model, x))
        np.testing.assert_array_equal(g.kept, c.kept)


def test_reinit_follows_into_the_depthwise_members():
    model = _randomise(mobilenet_like())
    old = {v.path: np.asarray(v).copy() for v in model.weights}
    res = graph.apply(model, None, _cmd("reinit-filters", "conv0", indices=[1]), seed=3)
    assert {c.layer: c.deleted for c in res.plan.changes} == {
        "conv0": [1], "bn0": [1], "dw1": [2, 3], "bn1": [2, 3]}
    dw = np.asarray(model.get_layer("dw1").kernel)
    np.testing.assert_array_equal(np.delete(dw, 1, axis=2), np.delete(old["dw1/kernel"], 1, axis=2))
    assert not np.array_equal(dw[:, :, 1], old["dw1/kernel"][:, :, 1])
    np.testing.assert_array_equal(np.asarray(model.get_layer("dw1").bias)[[2, 3]], 0)
    np.testing.assert_array_equal(np.asarray(model.get_layer("bn1").gamma)[[2, 3]], 1)
    for v in model.weights:  # nothing else moved: pw1 (which reads channels 2, 3) included
        if not v.path.startswith(("conv0/", "bn0/", "dw1/", "bn1/")):
            np.testing.assert_array_equal(np.asarray(v), old[v.path], err_msg=v.path)
