"""Recorded pattern measures and embeddings: single-channel init, stability over a real run, uids after steering."""

from __future__ import annotations

import numpy as np
import pytest

import revacnn
from revacnn.analysis import EmbeddingTracker, procrustes_align

from ..conftest import tiny_cnn


def wide_cnn(keras, n1=16):
    L = keras.layers
    return keras.Sequential([
        keras.Input((12, 12, 3)),
        L.Conv2D(n1, 3, padding="same", activation="relu", name="conv1"),
        L.MaxPooling2D(2),
        L.Conv2D(12, 3, padding="same", activation="relu", name="conv2"),
        L.Flatten(),
        L.Dense(4, activation="softmax", name="dense1"),
    ])


def test_single_channel_init_gives_mono_fraction_one(tmp_path, keras_mod, tiny_data):
    keras_mod.utils.set_random_seed(0)
    model = tiny_cnn(keras_mod)
    k = model.get_layer("conv1").kernel.numpy()
    for f in range(k.shape[-1]):
        keep = f % 3
        k[:, :, [c for c in range(3) if c != keep], f] = 0.0
    model.get_layer("conv1").kernel.assign(k)
    (x, y), (xv, yv) = tiny_data
    run = revacnn.fit(model, (x, y), validation_data=(xv, yv), epochs=1, store=tmp_path / "s", probes=4,
                      progress=False, embeddings=False)
    store = run.store
    row = store.sql(f"SELECT rgb_mono_fraction FROM layers WHERE run_id='{run.run_id}' AND epoch=0 AND layer='conv1'")
    assert row.rgb_mono_fraction[0] == 1.0
    f = store.sql(f"SELECT filter, dominant_channel, share_r, share_g, share_b FROM filters "
                  f"WHERE run_id='{run.run_id}' AND epoch=0 AND layer='conv1' ORDER BY filter")
    assert f.dominant_channel.tolist() == [0, 1, 2, 0]
    np.testing.assert_allclose(f[["share_r", "share_g", "share_b"]].sum(axis=1), 1.0)
    # only the first conv layer sees RGB input
    deeper = store.sql(f"SELECT rgb_mono_fraction FROM layers WHERE run_id='{run.run_id}' AND layer='conv2'")
    assert deeper.rgb_mono_fraction.isna().all()


def _displacement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean distance between matching points, in units of the reference layout's RMS radius."""
    radius = np.sqrt(((a - a.mean(axis=0)) ** 2).sum(axis=1).mean())
    return float(np.linalg.norm(a - b, axis=1).mean() / radius)


def test_embeddings_are_stable_over_a_real_run(tmp_path, keras_mod, tiny_data):
    keras_mod.utils.set_random_seed(0)
    (x, y), (xv, yv) = tiny_data
    run = revacnn.fit(wide_cnn(keras_mod), (x, y), validation_data=(xv, yv), epochs=5, batch_size=32,
                      store=tmp_path / "s", probes=4, progress=False)
    tracked, independent = [], []
    for e in range(1, 6):
        prev, cur = run.epoch(e - 1).layer("conv1"), run.epoch(e).layer("conv1")
        assert np.isfinite(cur.embedding).all()
        tracked.append(_displacement(prev.embedding, cur.embedding))
        feats = cur.kernel.reshape(len(cur.kernel), -1).astype(np.float64)
        a = EmbeddingTracker(seed=e).embed("x", cur.filter_uids, feats)
        b = EmbeddingTracker(seed=100 + e).embed("x", cur.filter_uids, feats)
        independent.append(_displacement(a, procrustes_align(b, a)))
    assert np.mean(tracked) * 3 < np.mean(independent), (tracked, independent)
    # the layer-level embedding covers every conv filter of every layer
    rows = run.store.sql(f"SELECT count(*) AS n FROM filters WHERE run_id='{run.run_id}' "
                         "AND (tsne_x IS NULL OR layer_tsne_x IS NULL)")
    assert rows.n[0] == 0


@pytest.mark.parametrize("ops", [("add-filters", ["conv1", "3"]), ("delete-filters", ["conv1", "0", "2"])])
def test_every_epoch_has_embeddings_keyed_by_uid_after_steering(tmp_path, keras_mod, tiny_data, ops):
    from revacnn.steering import parse
    from revacnn.trainer import fork

    keras_mod.utils.set_random_seed(0)
    (x, y), (xv, yv) = tiny_data
    run = revacnn.fit(wide_cnn(keras_mod, n1=8), (x, y), validation_data=(xv, yv), epochs=1, batch_size=64,
                      store=tmp_path / "s", probes=4, progress=False)
    child = fork(run.store, run.run_id, 1, changes=[parse(ops[0], ops[1])], epochs=2, progress=False,
                 data=((x, y), (xv, yv)))
    for e in (1, 2):
        layer = child.epoch(e).layer("conv1")
        assert layer.embedding.shape == (len(layer.filter_uids), 2)
        assert np.isfinite(layer.embedding).all() and np.isfinite(layer.layer_embedding).all()
    uids = child.epoch(2).layer("conv1").filter_uids.tolist()
    assert uids == ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10] if ops[0] == "add-filters" else [1, 3, 4, 5, 6, 7])
    got = child.store.sql(f"SELECT filter_uid FROM filters WHERE run_id='{child.run_id}' AND epoch=2 "
                          "AND layer='conv1' AND tsne_x IS NOT NULL ORDER BY filter")
    assert got.filter_uid.tolist() == uids
