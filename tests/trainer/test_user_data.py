"""Data as the user gives it (tf.data with augmentation, PyDataset, float and one-hot arrays) and Keras callbacks."""

from __future__ import annotations

import numpy as np
import pytest

import revacnn
from revacnn.trainer import fork

from . import user_setups as us


def _small_cnn(keras):
    L = keras.layers
    inp = keras.Input((8, 8, 3))
    h = L.Conv2D(6, 3, padding="same", activation="relu", name="conv1")(inp)
    h = L.Conv2D(6, 3, padding="same", activation="relu", name="conv2")(h)
    out = L.Dense(4, activation="softmax", name="dense1")(L.GlobalAveragePooling2D(name="gap")(h))
    return keras.Model(inp, out, name="small")


def _pipelines(tf, x, y, xv, yv, seed=7):
    def augment(img, label):
        img = tf.image.stateless_random_flip_left_right(img, seed=tf.stack([seed, tf.cast(label[0] * 0, tf.int32)]))
        return img + tf.random.uniform(tf.shape(img), -0.1, 0.1, seed=seed), label

    ds = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed).map(augment)
          .batch(32).prefetch(tf.data.AUTOTUNE))
    val = tf.data.Dataset.from_tensor_slices((xv, yv)).batch(32)
    return ds, val


def test_tf_data_with_augmentation_trains_records_and_forks_exactly(keras_mod, tmp_path):
    import tensorflow as tf

    keras_mod.utils.set_random_seed(3)
    (x, y), (xv, yv) = us.data()  # one-hot labels, standardized floats
    model = _small_cnn(keras_mod)
    model.compile(optimizer=keras_mod.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    ds, val = _pipelines(tf, x, y, xv, yv)
    store = revacnn.open_store(tmp_path / "s")
    run = revacnn.fit(model, ds, validation_data=val, epochs=3, store=store, probes=4, progress=False,
                      embeddings=False)
    assert run.epochs() == [0, 1, 2, 3]
    m = run.metrics()
    assert m.n_batches.iloc[-1] == 4  # 112 examples in batches of 32
    assert m.val_accuracy.notna().all() and m.val_loss.notna().all()
    assert m.loss.iloc[-1] < m.loss.iloc[1]  # it learns
    assert run.epoch(3).layer("conv1").grad_l1.min() > 0
    np.testing.assert_array_equal(np.moveaxis(run.epoch(3).layer("conv2").kernel, 0, -1),
                                  model.get_layer("conv2").kernel.numpy())
    images, labels = store.probes(run.session_id)
    assert images.dtype == np.float32 and labels.dtype == np.int64 and images.shape == (4, 8, 8, 3)
    # a seeded pipeline replays: a no-change fork at epoch 1 (fresh pipelines) equals the parent
    ds2, val2 = _pipelines(tf, x, y, xv, yv)
    child = fork(store, run.run_id, 1, data=(ds2, val2), progress=False)
    for e in (2, 3):
        np.testing.assert_array_equal(child.epoch(e).layer("conv1").kernel, run.epoch(e).layer("conv1").kernel)
    cm = child.metrics()
    assert cm[cm.epoch >= 2].loss.tolist() == m[m.epoch >= 2].loss.tolist()


def test_pydataset_and_integer_arrays_of_any_dtype(keras_mod, tmp_path):
    (x, y), (xv, yv) = us.data()

    class Batches(keras_mod.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.order = np.arange(len(x))
            self.epochs_seen = 0

        def __len__(self):
            return 4

        def __getitem__(self, i):
            idx = self.order[i * 28 : (i + 1) * 28]
            return x[idx].astype(np.float16), y[idx].argmax(axis=1).astype(np.int32)

        def on_epoch_end(self):
            self.epochs_seen += 1
            self.order = np.random.default_rng(self.epochs_seen).permutation(len(x))

    keras_mod.utils.set_random_seed(1)
    model = _small_cnn(keras_mod)
    store = revacnn.open_store(tmp_path / "s")
    data = Batches()
    run = revacnn.fit(model, data, validation_data=(xv.astype(np.float64), yv.argmax(axis=1)), epochs=2, store=store,
                      probes=4, progress=False, embeddings=False)
    assert run.epochs() == [0, 1, 2] and data.epochs_seen == 2
    assert run.metrics().n_batches.iloc[-1] == 4
    images, _ = store.probes(run.session_id)
    np.testing.assert_array_equal(images, xv.astype(np.float32)[_probe_rows(store, run)])  # stored as given


def _probe_rows(store, run):
    return store.sql(f"SELECT val_index FROM probes WHERE session_id='{run.session_id}' ORDER BY probe").val_index.tolist()


def test_standardized_floats_are_not_clipped(keras_mod, tmp_path):
    """Negative and > 1 inputs reach the model unchanged: the first conv's activations match a direct call."""
    (x, y), (xv, yv) = us.data()
    x, xv = x * 3.0, xv * 3.0
    keras_mod.utils.set_random_seed(2)
    model = _small_cnn(keras_mod)
    store = revacnn.open_store(tmp_path / "s")
    run = revacnn.fit(model, (x, y), validation_data=(xv, yv), epochs=1, store=store, probes=4, progress=False,
                      embeddings=False)
    images, _ = store.probes(run.session_id)
    assert images.min() < -1 and images.max() > 2
    sub = keras_mod.Model(model.inputs, model.get_layer("conv1").output)
    np.testing.assert_allclose(run.epoch(1).layer("conv1").activations.astype(np.float32),
                               np.moveaxis(sub(images).numpy(), -1, 1), rtol=3e-3, atol=3e-3)


def test_early_stopping_ends_at_the_epoch_model_fit_ends(keras_mod, tmp_path):
    (x, y), (xv, yv) = us.data()

    def make_cb():
        # no improvement ever counts after the first epoch: stops after epoch index `patience`
        return keras_mod.callbacks.EarlyStopping(monitor="val_loss", min_delta=1e9, patience=2)

    keras_mod.utils.set_random_seed(5)
    ref = _small_cnn(keras_mod)
    ref.compile(optimizer="adam", loss="categorical_crossentropy")
    hist = ref.fit(x, y, validation_data=(xv, yv), epochs=8, batch_size=32, verbose=0, callbacks=[make_cb()])
    keras_mod.utils.set_random_seed(5)
    model = _small_cnn(keras_mod)
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    store = revacnn.open_store(tmp_path / "s")
    run = revacnn.fit(model, (x, y), validation_data=(xv, yv), epochs=8, store=store, probes=4, progress=False,
                      embeddings=False, callbacks=[make_cb()])
    assert len(hist.epoch) < 8
    assert run.epochs() == list(range(len(hist.epoch) + 1))
    row = store.runs().set_index("run_id").loc[run.run_id]
    assert row.status == "finished"
    assert f"ended early after epoch {len(hist.epoch)} of 8" in store.run(run.run_id).status_info["message"]


def test_keras_callbacks_work_unchanged(keras_mod, tmp_path):
    (x, y), (xv, yv) = us.data()
    keras_mod.utils.set_random_seed(6)
    model = _small_cnn(keras_mod)
    model.compile(optimizer=keras_mod.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    seen = {"begin": 0, "end": 0, "batches": 0, "epoch_logs": []}

    class Spy(keras_mod.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen["begin"] += 1

        def on_train_end(self, logs=None):
            seen["end"] += 1

        def on_train_batch_end(self, batch, logs=None):
            seen["batches"] += 1

        def on_epoch_end(self, epoch, logs=None):
            seen["epoch_logs"].append((epoch, dict(logs)))

    csv = tmp_path / "log.csv"
    cbs = [
        Spy(),
        keras_mod.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=1e9),
        keras_mod.callbacks.CSVLogger(str(csv)),
        keras_mod.callbacks.ModelCheckpoint(str(tmp_path / "m{epoch}.keras")),
    ]
    try:  # TensorBoard needs the tensorboard package (not a revacnn dependency)
        import tensorboard  # noqa: F401

        cbs.append(keras_mod.callbacks.TensorBoard(str(tmp_path / "tb")))
    except ImportError:
        pass
    store = revacnn.open_store(tmp_path / "s")
    run = revacnn.fit(model, (x, y), validation_data=(xv, yv), epochs=3, batch_size=32, store=store, probes=4,
                      progress=False, embeddings=False, callbacks=cbs)
    assert seen["begin"] == seen["end"] == 1 and seen["batches"] == 3 * 4
    assert [e for e, _ in seen["epoch_logs"]] == [0, 1, 2]
    logs = seen["epoch_logs"][-1][1]
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(logs)
    m = run.metrics()
    assert logs["val_loss"] == pytest.approx(m.val_loss.iloc[-1])
    lrs = m.lr.tolist()
    # ReduceLROnPlateau: the first epoch counts as an improvement, the second does not -> halved for the third
    assert lrs[1] == pytest.approx(1e-3) and lrs[2] == pytest.approx(1e-3) and lrs[3] == pytest.approx(5e-4)
    import pandas as pd

    rows = pd.read_csv(csv)
    assert rows.epoch.tolist() == [0, 1, 2] and "val_loss" in rows
    assert sorted(p.name for p in tmp_path.glob("m*.keras")) == ["m1.keras", "m2.keras", "m3.keras"]
    if len(cbs) == 5:
        assert list((tmp_path / "tb").rglob("events.out.tfevents*"))
