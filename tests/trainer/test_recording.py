"""The recording trainer against references: model weights, a separate GradientTape, row counts."""

from __future__ import annotations

import numpy as np
import pytest

import revacnn
from revacnn.errors import ConfigError, UnsupportedLayerError

from ..conftest import tiny_cnn


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, keras_mod, tiny_data):
    keras_mod.utils.set_random_seed(1)
    model = tiny_cnn(keras_mod, dropout=True)
    (x, y), (xv, yv) = tiny_data
    store = revacnn.open_store(tmp_path_factory.mktemp("rec") / "store")
    run = revacnn.fit(model, (x, y), validation_data=(xv, yv), epochs=3, batch_size=64, store=store,
                      probes=8, name="tiny", seed=3, progress=False)
    return store, run, model


def test_recorded_weights_equal_checkpoint_and_trained_model(recorded):
    store, run, model = recorded
    assert run.epochs() == [0, 1, 2, 3]
    for k in run.epochs():
        rec = run.epoch(k)
        restored = run.load_model(k)
        for name in ("conv1", "conv2"):
            layer = rec.layer(name)
            kernel = np.moveaxis(layer.kernel, 0, -1)
            np.testing.assert_array_equal(kernel, restored.get_layer(name).kernel.numpy())
            np.testing.assert_array_equal(layer.bias, restored.get_layer(name).bias.numpy())
            if k == 3:
                np.testing.assert_array_equal(kernel, model.get_layer(name).kernel.numpy())
                np.testing.assert_array_equal(layer.bias, model.get_layer(name).bias.numpy())
    # weights actually changed during training
    assert not np.array_equal(run.epoch(0).layer("conv1").kernel, run.epoch(3).layer("conv1").kernel)


def test_row_counts_and_shapes(recorded):
    store, run, _ = recorded
    rid = run.run_id
    n_epochs = 4
    assert store.sql(f"SELECT count(*) AS n FROM epochs WHERE run_id='{rid}'").n[0] == n_epochs
    layers = store.sql(f"SELECT layer, count(*) AS n FROM layers WHERE run_id='{rid}' GROUP BY layer ORDER BY layer")
    assert layers.to_dict("list") == {"layer": ["conv1", "conv2", "dense1"], "n": [n_epochs] * 3}
    assert store.sql(f"SELECT count(*) AS n FROM filters WHERE run_id='{rid}'").n[0] == n_epochs * (4 + 6)
    assert store.sql(f"SELECT count(*) AS n FROM predictions WHERE run_id='{rid}'").n[0] == n_epochs * 8
    e0 = run.epoch(0)
    assert e0.conv_layers == ["conv1", "conv2"]
    c1 = e0.layer("conv1")
    assert c1.kernel.shape == (4, 3, 3, 3)
    assert c1.activations.shape == (8, 4, 12, 12)
    assert c1.grad_l1.shape == (4,) and np.all(c1.grad_l1 == 0)  # nothing trained at initialisation
    assert c1.filter_uids.tolist() == [0, 1, 2, 3]
    assert c1.embedding.shape == (4, 2)
    assert e0.probabilities.shape == (8, 4)
    np.testing.assert_allclose(e0.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    images, labels = store.probes(run.session_id)
    assert images.shape == (8, 12, 12, 3) and images.dtype == np.uint8
    assert len(set(labels.tolist())) == 4  # probes spread over the classes
    m = store.sql(f"SELECT * FROM epochs WHERE run_id='{rid}' ORDER BY epoch")
    assert m.loss.isna()[0] and m.loss[1:].notna().all()
    assert (m.duration_s[1:] > 0).all() and m.val_accuracy.notna().all()
    assert m.lr.iloc[-1] == pytest.approx(1e-3)
    assert store.runs().set_index("run_id").status[rid] == "finished"


def test_activations_are_post_activation_outputs(recorded, keras_mod):
    store, run, _ = recorded
    model = run.load_model(2)
    images, _ = store.probes(run.session_id)
    sub = keras_mod.Model(model.inputs[0], model.get_layer("conv2").output)
    want = sub(images).numpy()  # (P, H, W, F): probes are fed as given (here uint8 0..255)
    got = run.epoch(2).layer("conv2").activations.astype(np.float32)  # (P, F, H, W) float16
    np.testing.assert_allclose(got, np.moveaxis(want, -1, 1), rtol=2e-3, atol=2e-3)
    assert got.min() >= 0  # relu


def test_grad_l1_is_the_sum_over_the_epochs_batches(tmp_path, keras_mod, tiny_data):
    """grad_l1 of epoch e = sum over e's batches of |dL/dW| (+ |dL/db|), against a separate GradientTape.

    Several batches per epoch with a partial last one (100 = 3 x 32 + 4), BatchNorm and Dropout in the
    model, two epochs, and SGD moving the weights between batches: a mean, the last batch alone, a
    full-batch gradient or a sum not reset between epochs all give other numbers (checked below).
    The reference replays the trainer's data order, np.random.default_rng([seed, epoch]).permutation(N),
    and starts from the same weights and the same Dropout seed state, so its masks are the trainer's.
    """
    import tensorflow as tf

    keras_mod.utils.set_random_seed(5)
    model = tiny_cnn(keras_mod, bn=True, dropout=True)
    lr, seed, bs, epochs = 0.05, 9, 32, 2
    model.compile(optimizer=keras_mod.optimizers.SGD(learning_rate=lr), loss="sparse_categorical_crossentropy")
    (x8, y), (xv8, yv) = tiny_data
    x8, y = x8[:100], y[:100]
    # images as float32 in 0..1, built as the trainer scales uint8, so both paths see the same numbers
    x = (tf.cast(x8, tf.float32) * (1.0 / 255.0)).numpy()
    xv = (tf.cast(xv8, tf.float32) * (1.0 / 255.0)).numpy()

    reference = keras_mod.models.clone_model(model)
    reference.set_weights(model.get_weights())
    drop, ref_drop = model.get_layer("drop"), reference.get_layer("drop")
    ref_drop.seed_generator.state.assign(drop.seed_generator.state.value)  # the same masks, batch by batch

    run = revacnn.fit(model, (x, y), validation_data=(xv, yv), epochs=epochs, batch_size=bs, store=tmp_path / "s",
                      probes=4, seed=seed, progress=False, embeddings=False)

    loss_fn = keras_mod.losses.SparseCategoricalCrossentropy()
    names = ("conv1", "conv2", "dense1")
    per_batch: dict[int, list[dict[str, np.ndarray]]] = {}
    for epoch in range(1, epochs + 1):
        order = np.random.default_rng([seed, epoch]).permutation(len(y))
        per_batch[epoch] = []
        for start in range(0, len(y), bs):
            idx = order[start:start + bs]
            with tf.GradientTape() as tape:
                loss = loss_fn(tf.constant(y[idx]), reference(tf.constant(x[idx]), training=True))
            variables = reference.trainable_variables
            grads = tape.gradient(loss, variables)
            by_var = {id(v): g for v, g in zip(variables, grads, strict=True)}
            row = {}
            for name in names:
                layer = reference.get_layer(name)
                gk, gb = by_var[id(layer.kernel)].numpy(), by_var[id(layer.bias)].numpy()
                row[name] = np.abs(gk).reshape(-1, gk.shape[-1]).sum(axis=0) + np.abs(gb)
            per_batch[epoch].append(row)
            for v, g in zip(variables, grads, strict=True):  # plain SGD, as the compiled optimizer
                v.assign_sub(lr * g)
    assert [len(per_batch[e]) for e in per_batch] == [4, 4]

    for epoch in range(1, epochs + 1):
        rec = run.epoch(epoch)
        rows = revacnn.open_store(tmp_path / "s", mode="r").sql(
            f"SELECT layer, grad_l1 FROM layers WHERE run_id='{run.run_id}' AND epoch={epoch}")
        store_rows = dict(zip(rows.layer, rows.grad_l1, strict=True))
        for name in names:
            want = sum(row[name] for row in per_batch[epoch])
            got = rec.layer(name).grad_l1
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7, err_msg=f"epoch {epoch} {name}")
            assert store_rows[name] == pytest.approx(want.sum(), rel=1e-4)
            # the answers a wrong accumulation would give are far from it
            for wrong, label in (
                (want / len(per_batch[epoch]), "the mean over batches"),
                (per_batch[epoch][-1][name], "the last batch alone"),
                (want + sum(row[name] for e in range(1, epoch) for row in per_batch[e]), "a sum not reset"),
            ):
                if label == "a sum not reset" and epoch == 1:
                    continue
                assert not np.allclose(got, wrong, rtol=1e-2), (epoch, name, label)
    # the reference stayed in step with the trainer: the same final weights
    for name in names:
        np.testing.assert_allclose(model.get_layer(name).kernel.numpy(), reference.get_layer(name).kernel.numpy(),
                                   rtol=1e-4, atol=1e-6)


def test_subclassed_model_gets_one_clear_error(keras_mod, tmp_path, tiny_data):
    L = keras_mod.layers

    class Net(keras_mod.Model):
        def __init__(self):
            super().__init__(name="net")
            self.conv1 = L.Conv2D(2, 3, name="conv1")
            self.flat = L.Flatten()
            self.out = L.Dense(4, activation="softmax")

        def call(self, x):
            return self.out(self.flat(self.conv1(x) * 2.0))

    model = Net()
    model(np.zeros((1, 12, 12, 3), np.float32))
    (x, y), _ = tiny_data
    with pytest.raises(UnsupportedLayerError, match="subclassed model of type Net.*supported: Sequential and functional"):
        revacnn.fit(model, (x, y), epochs=1, store=tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").rglob("run.json"))  # nothing recorded


def test_bad_epochs_is_refused(keras_mod, tmp_path, tiny_data):
    (x, y), _ = tiny_data
    with pytest.raises(ConfigError, match="epochs=-1"):
        revacnn.fit(tiny_cnn(keras_mod), (x, y), epochs=-1, store=tmp_path / "s", progress=False)


def test_compiled_model_keeps_its_optimizer(keras_mod, tmp_path, tiny_data):
    model = tiny_cnn(keras_mod)
    model.compile(optimizer=keras_mod.optimizers.SGD(learning_rate=0.05, momentum=0.5),
                  loss="sparse_categorical_crossentropy")
    (x, y), (xv, yv) = tiny_data
    run = revacnn.fit(model, (x, y), validation_data=(xv, yv), epochs=1, store=tmp_path / "s",
                      progress=False, embeddings=False)
    assert run.config["optimizer"] == "sgd"
    assert run.metrics().lr.iloc[-1] == pytest.approx(0.05)
