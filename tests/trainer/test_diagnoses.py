"""The doctor inside a recording: the ``diagnoses`` table flags a killed filter and a frozen layer."""

from __future__ import annotations

import json

import numpy as np
import pytest

import revacnn
from revacnn.steering import parse

from ..conftest import tiny_cnn


def test_killed_filter_reads_dead_and_frozen_layer_reads_converged(tmp_path, keras_mod, tiny_data):
    keras_mod.utils.set_random_seed(4)
    model = tiny_cnn(keras_mod)
    model.build((None, 12, 12, 3))
    conv2 = model.get_layer("conv2")
    b = conv2.bias.numpy()
    b[3] = -1e4  # ReLU(x - 1e4) = 0 for every input this data can give: filter 3 is dead from the start
    conv2.bias.assign(b)
    (x, y), (xv, yv) = tiny_data
    store = revacnn.open_store(tmp_path / "store")
    run = revacnn.fit(model, (x, y), validation_data=(xv, yv), epochs=2, batch_size=64, store=store,
                      probes=8, seed=1, progress=False)
    d = store.sql(f"SELECT epoch, layer, filter_uid, kind, suggestion FROM diagnoses "
                  f"WHERE run_id = '{run.run_id}' ORDER BY epoch, layer, filter_uid")
    dead = d[d.kind == "dead"]
    # conv2's filter 3 at every epoch (its bias makes every output 0, so its gradient is 0 too)
    killed = dead[(dead.layer == "conv2") & (dead.filter_uid == 3)]
    assert killed.epoch.tolist() == [0, 1, 2]
    assert json.loads(killed.suggestion.iloc[-1]) == {
        "op": "reinit-filters", "args": {"layer": "conv2", "indices": [3]}, "filter_uids": [3]}
    # every filter called dead is silent on every probe in the recorded arrays (ReLU nets on raw
    # 0..255 inputs also kill filters by themselves), and its recorded gradient sum is ~0
    for epoch, layer, uid in dead[["epoch", "layer", "filter_uid"]].values.tolist():
        rec = run.epoch(int(epoch)).layer(layer)
        i = rec.filter_uids.tolist().index(uid)
        assert np.all(rec.activations[:, i] == 0)
        assert rec.grad_l1[i] <= 1e-3 * max(float(np.median(rec.grad_l1)), 1e-30)

    child = run.fork(1, changes=[parse("freeze", ["conv1"])], epochs=3, data=((x, y), (xv, yv)))
    c = store.sql(f"SELECT epoch, layer, kind, suggestion FROM diagnoses "
                  f"WHERE run_id = '{child.run_id}' AND kind = 'converged' ORDER BY epoch")
    frozen = c[c.layer == "conv1"]
    assert frozen.epoch.tolist() == [2, 3]  # the fork point itself trained nothing: not judged
    assert frozen.suggestion.isna().all()  # already frozen: nothing to suggest
    for s in c[c.layer != "conv1"].suggestion:  # a still-training layer that converged: freeze it
        assert json.loads(s)["op"] == "freeze"


def test_colour_dropped_input_shows_the_rgb_pattern(tmp_path, keras_mod, tiny_data):
    """The paper's case: the input lost its G and B channels; the kernel keeps its initial G/B
    energy, but what training changed is single-colour, and the doctor says so."""
    keras_mod.utils.set_random_seed(2)
    (x, y), (xv, yv) = tiny_data
    x, xv = x.copy(), xv.copy()
    x[..., 1:] = 0
    xv[..., 1:] = 0
    store = revacnn.open_store(tmp_path / "store")
    run = revacnn.fit(tiny_cnn(keras_mod), (x, y), validation_data=(xv, yv), epochs=2, batch_size=64,
                      store=store, probes=8, seed=1, progress=False, embeddings=False)
    d = store.sql(f"SELECT epoch, layer, kind, score FROM diagnoses WHERE run_id = '{run.run_id}' "
                  "AND kind = 'rgb_pattern' ORDER BY epoch")
    assert d[["epoch", "layer"]].values.tolist() == [[1, "conv1"], [2, "conv1"]]
    assert (d.score == 1.0).all()
    # the kernel itself still looks colourful: the measure on the raw kernel misses this case
    layers = store.sql(f"SELECT rgb_mono_fraction FROM layers WHERE run_id = '{run.run_id}' "
                       "AND layer = 'conv1' AND epoch = 2")
    assert layers.rgb_mono_fraction[0] < 0.5


def _mean_sq_cosine_excess(kernel: np.ndarray) -> float:
    """The reference for the cluster pattern, from its definition (chance-corrected mean c_ij**2)."""
    f = kernel.reshape(len(kernel), -1).astype(np.float64)
    u = f / np.linalg.norm(f, axis=1, keepdims=True)
    c2 = (u @ u.T) ** 2
    m = (c2.sum() - np.trace(c2)) / (len(f) * (len(f) - 1))
    d = f.shape[1]
    return max(0.0, (m - 1 / d) / (1 - 1 / d))


def test_a_too_high_learning_rate_shows_the_cluster_pattern(tmp_path):
    """The paper's first scenario: convnetjs on ``shapes`` with lr 0.03 collapses its filters onto few
    directions and the doctor says so (suggesting a tenth of the rate); the same run at 1e-3 does not.
    Small on purpose (1,000 images, 2 epochs: a few seconds on a CPU); `bench_patterns.py` has the
    larger version."""
    from revacnn.analysis.doctor import CLUSTER_THRESHOLD
    from revacnn.config import TrainConfig
    from revacnn.trainer import train

    store = revacnn.open_store(tmp_path / "store")
    base = TrainConfig(epochs=2, train_size=1000, val_size=200, probes=8, seed=0, embeddings=False,
                       live_every_s=0)
    found = {}
    for lr in (1e-3, 0.03):
        run = train(base.replace(lr=lr, name=f"lr={lr:g}"), store, progress=False)
        d = store.sql(f"SELECT layer, score, suggestion FROM diagnoses WHERE run_id = '{run.run_id}' "
                      "AND kind = 'cluster_pattern' AND epoch = 2 ORDER BY layer")
        # the reference: the definition's score on the recorded kernels of epoch 2
        rec = run.epoch(2)
        ref = {layer: _mean_sq_cosine_excess(rec.layer(layer).kernel) for layer in rec.conv_layers}
        found[lr] = (d, ref)
    healthy, high = found[1e-3], found[0.03]
    assert len(healthy[0]) == 0
    assert max(healthy[1].values()) < CLUSTER_THRESHOLD
    flagged = high[0]
    assert len(flagged) >= 1
    assert set(flagged.layer) == {n for n, s in high[1].items() if s >= CLUSTER_THRESHOLD}
    for layer, score, sug in flagged[["layer", "score", "suggestion"]].values.tolist():
        assert abs(score - high[1][layer]) < 1e-4
        assert json.loads(sug) == {"op": "set-lr", "args": {"lr": pytest.approx(0.003)}}
