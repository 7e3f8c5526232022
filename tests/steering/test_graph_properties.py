"""Property tests of group surgery: random conv/BN/relu graphs with residual Adds and Concatenates,
each checked against a model rebuilt from scratch with the expected weights."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from revacnn.steering import graph  # noqa: E402

L = keras.layers
SHAPE = (6, 6, 2)


@st.composite
def specs(draw):
    """A list of steps; every conv's output is a channel *symbol* (a group), with a width."""
    widths = {"s0": draw(st.integers(1, 3))}
    steps: list[tuple] = [("conv", "s0", draw(st.booleans()))]
    cur = ["s0"]
    for k in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "res", "res1", "cat", "bn"] if len(cur) == 1 else
                                    ["conv", "cat", "bn"]))
        sym = f"s{len(widths)}"
        if kind == "bn":
            steps.append(("bn",))
            continue
        if kind == "res1":  # x + conv(x): one conv both reads and writes the group
            steps.append(("res1", cur[0]))
            continue
        widths[sym] = draw(st.integers(1, 3))
        if kind == "conv":
            steps.append(("conv", sym, draw(st.booleans())))
            cur = [sym]
        elif kind == "res":
            steps.append(("res", sym, cur[0]))
        else:
            steps.append(("cat", sym))
            cur = [*cur, sym]
        del k
    return steps, widths


def build(steps: list[tuple], widths: dict[str, int]):
    """The model of a spec, and for every weighted layer the symbols it reads and writes."""
    meta: dict[str, dict] = {}
    inp = keras.Input(SHAPE)
    x, cur = inp, ["input"]
    for i, step in enumerate(steps):
        if step[0] == "conv":
            _, sym, bn = step
            x = L.Conv2D(widths[sym], 3, padding="same", name=f"c{i}")(x)
            meta[f"c{i}"] = {"in": cur, "out": sym}
            cur = [sym]
            if bn:
                x = L.BatchNormalization(name=f"bn{i}")(x)
                meta[f"bn{i}"] = {"in": cur}
            x = L.ReLU(name=f"r{i}")(x)
        elif step[0] == "res":
            _, t, s = step
            y = L.Conv2D(widths[t], 3, padding="same", name=f"c{i}a")(x)
            y = L.ReLU(name=f"r{i}a")(y)
            y = L.Conv2D(widths[s], 3, padding="same", name=f"c{i}b")(y)
            y = L.BatchNormalization(name=f"bn{i}")(y)
            meta[f"c{i}a"] = {"in": [s], "out": t}
            meta[f"c{i}b"] = {"in": [t], "out": s}
            meta[f"bn{i}"] = {"in": [s]}
            x = L.ReLU(name=f"r{i}")(L.Add(name=f"add{i}")([x, y]))
        elif step[0] == "res1":
            _, s = step
            y = L.Conv2D(widths[s], 3, padding="same", name=f"c{i}")(x)
            meta[f"c{i}"] = {"in": [s], "out": s}
            x = L.ReLU(name=f"r{i}")(L.Add(name=f"add{i}")([x, y]))
        elif step[0] == "cat":
            _, sym = step
            y = L.Conv2D(widths[sym], 3, padding="same", name=f"c{i}")(x)
            meta[f"c{i}"] = {"in": cur, "out": sym}
            x = L.Concatenate(name=f"cat{i}")([x, y])
            cur = [*cur, sym]
        else:
            x = L.BatchNormalization(name=f"bn{i}")(x)
            meta[f"bn{i}"] = {"in": cur}
            x = L.ReLU(name=f"r{i}")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(2, name="head")(x)
    meta["head"] = {"in": cur, "out": None}
    return keras.Model(inp, out), meta


def _positions(syms: list[str], widths: dict[str, int], target: str, idx) -> list[int]:
    """Positions of ``target``'s channels ``idx`` in a tensor made of ``syms``."""
    off, out = 0, []
    for s in syms:
        if s == target:
            out += [off + i for i in idx]
        off += widths.get(s, SHAPE[-1])
    return out


def _randomise(model: keras.Model, rng: np.random.Generator) -> None:
    for layer in model.layers:
        w = layer.get_weights()
        if w:
            layer.set_weights([rng.normal(0, 0.5, a.shape).astype("float32") if j != 3
                               else rng.uniform(0.5, 1.5, a.shape).astype("float32")
                               for j, a in enumerate(w)])


def _expected(old: keras.Model, new: keras.Model, meta: dict, widths: dict, target: str,
              op: str, idx: list[int], n: int) -> dict[str, list[np.ndarray]]:
    """Per layer, the weights surgery must produce (by hand, from the old model's)."""
    w_old = dict(widths)
    out = {}
    for name, m in meta.items():
        arrays = old.get_layer(name).get_weights()
        if name.startswith("bn"):
            pos = _positions(m["in"], w_old, target, idx if op == "delete" else [])
            if op == "delete":
                arrays = [np.delete(a, pos, 0) for a in arrays]
            else:
                ins = _positions(m["in"], w_old, target, [w_old[target]] * n)
                arrays = [np.insert(a, ins, v) for a, v in zip(arrays, (1.0, 0.0, 0.0, 1.0),
                                                                strict=True)]
            out[name] = arrays
            continue
        kernel, bias = arrays
        axis_in = 2 if kernel.ndim == 4 else 0
        if op == "delete":
            kernel = np.delete(kernel, _positions(m["in"], w_old, target, idx), axis_in)
            if m["out"] == target:
                kernel, bias = np.delete(kernel, idx, -1), np.delete(bias, idx, 0)
        else:
            ins = _positions(m["in"], w_old, target, [w_old[target]] * n)
            kernel = np.insert(kernel, ins, 0.0, axis=axis_in)
            if m["out"] == target:
                # the new filters' kernels are the layer initializer's draw: take them from the
                # result (everything else is fixed by hand above)
                fresh = new.get_layer(name).get_weights()[0][..., w_old[target]:]
                kernel = np.concatenate([kernel, fresh], axis=-1)
                bias = np.concatenate([bias, np.zeros(n, bias.dtype)])
        out[name] = [kernel, bias]
    return out


def check(steps, widths, target: str, op: str, idx: list[int], n: int, seed: int) -> None:
    """Surgery on the spec's model equals the model rebuilt from scratch with the expected weights."""
    model, meta = build(steps, widths)
    rng = np.random.default_rng(seed)
    _randomise(model, rng)
    sym = meta[target]["out"]
    x = rng.normal(size=(3, *SHAPE)).astype("float32")
    if op == "delete":
        res = graph.apply(model, None, {"op": "delete-filters",
                                        "args": {"layer": target, "indices": idx}})
    else:
        res = graph.apply(model, None, {"op": "add-filters", "args": {"layer": target, "n": n}},
                          seed=1)
    new_widths = {**widths, sym: widths[sym] - len(idx) + n}
    reference, _ = build(steps, new_widths)
    expected = _expected(model, res.model, meta, widths, sym, op, idx, n)
    for name, arrays in expected.items():
        reference.get_layer(name).set_weights(arrays)
        for got, want in zip(res.model.get_layer(name).get_weights(), arrays, strict=True):
            np.testing.assert_array_equal(got, want, err_msg=f"{name} ({op} {target} {idx or n})")
    y_new = np.asarray(res.model(x, training=False))
    np.testing.assert_allclose(y_new, np.asarray(reference(x, training=False)), atol=1e-5, rtol=0)
    if op == "add":  # function-preserving
        np.testing.assert_allclose(y_new, np.asarray(model(x, training=False)), atol=1e-5, rtol=0)
    # the group is exactly the convs writing the target's symbol
    assert set(res.plan.group) == {k for k, m in meta.items() if m.get("out") == sym}


@settings(max_examples=12, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=specs(), data=st.data())
def test_group_surgery_matches_a_model_rebuilt_from_scratch(spec, data):
    steps, widths = spec
    _, meta = build(steps, widths)
    target = data.draw(st.sampled_from([k for k, m in meta.items() if m.get("out")]))
    sym = meta[target]["out"]
    op = data.draw(st.sampled_from(["add", "delete"] if widths[sym] >= 2 else ["add"]))
    if op == "delete":
        idx = sorted(data.draw(st.sets(st.integers(0, widths[sym] - 1), min_size=1,
                                       max_size=widths[sym] - 1)))
        n = 0
    else:
        idx, n = [], data.draw(st.integers(1, 2))
    check(steps, widths, target, op, idx, n, data.draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("op, idx, n", [("add", [], 2), ("delete", [0, 2], 0)])
@pytest.mark.parametrize("target", ["c0", "c1", "c2"])
def test_fixed_graph_with_every_join(target, op, idx, n):
    """conv -> x + conv(x) -> concat with a conv -> residual block over the concat's BN."""
    steps = [("conv", "s0", True), ("res1", "s0"), ("cat", "s1"), ("bn",), ("conv", "s2", False)]
    check(steps, {"s0": 3, "s1": 3, "s2": 3}, target, op, idx, n, seed=7)
