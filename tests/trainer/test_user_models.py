"""A real user's Keras training recorded: functional graphs, nested models, data as given, the compiled loss/optimizer, callbacks."""

from __future__ import annotations

import numpy as np
import pytest

import revacnn
from revacnn.models import recorded_layers, resnet20


def _shapes(n_train: int, n_val: int, size: int = 16, seed: int = 0):
    """The offline shapes set, downsampled to ``size`` px and standardized (mean 0, std 1 floats)."""
    from revacnn.data import load_dataset

    ds = load_dataset("shapes", train_size=n_train, val_size=n_val, seed=seed)
    f = 32 // size

    def prep(x):
        x = x.astype(np.float32).reshape(len(x), size, f, size, f, 3).mean(axis=(2, 4))
        return x

    x, xv = prep(ds.x_train), prep(ds.x_val)
    mu, sd = x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))
    return ((x - mu) / sd, ds.y_train), ((xv - mu) / sd, ds.y_val)


def functional_cnn(keras, input_shape=(16, 16, 3), n_classes=10, *, logits: bool = False):
    """A functional CNN with a residual block (Add + BN), a Concatenate and a nested block model."""
    L = keras.layers
    inp = keras.Input(input_shape)
    x = L.Conv2D(12, 3, padding="same", name="conv1")(inp)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="relu1")(x)
    y = L.Conv2D(12, 3, padding="same", name="conv2")(x)
    y = L.BatchNormalization(name="bn2")(y)
    x = L.ReLU(name="relu2")(L.Add(name="add1")([x, y]))
    x = L.MaxPooling2D(2, name="pool1")(x)
    b_in = keras.Input(x.shape[1:])
    a = L.Conv2D(8, 3, padding="same", activation="relu", name="conv_a")(b_in)
    c = L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw")(b_in)
    block = keras.Model(b_in, L.Concatenate(name="cat")([a, c]), name="block1")
    x = block(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    out = L.Dense(n_classes, activation=None if logits else "softmax", name="dense1")(x)
    return keras.Model(inp, out, name="functional_cnn")


def zoo_of_layers(keras, input_shape=(12, 12, 3), n_classes=4):
    """Every layer kind the issue lists, in one graph (a nested block included)."""
    L = keras.layers
    inp = keras.Input(input_shape)
    x = L.Rescaling(1.0, name="rescale")(inp)
    x = L.Normalization(mean=[0.0, 0.0, 0.0], variance=[1.0, 1.0, 1.0], name="norm")(x)
    x = L.RandomFlip("horizontal", seed=1, name="flip")(x)
    x = L.ZeroPadding2D(1, name="pad")(x)
    x = L.Cropping2D(1, name="crop")(x)
    x = L.Conv2D(8, 3, padding="same", name="conv1")(x)
    x = L.LeakyReLU(name="lrelu")(x)
    g = L.Conv2D(8, 3, padding="same", groups=4, activation="relu", name="gconv")(x)
    s = L.SeparableConv2D(6, 3, padding="same", depth_multiplier=2, name="sep")(x)
    s = L.Activation("relu", name="act")(s)
    x = L.Concatenate(name="cat")([g, s])
    x = L.SpatialDropout2D(0.1, seed=2, name="sdrop")(x)
    x = L.LayerNormalization(name="ln")(x)
    x = L.MaxPooling2D(2, name="pool")(x)
    x = L.UpSampling2D(2, name="up")(x)
    b_in = keras.Input(x.shape[1:])
    b = L.DepthwiseConv2D(3, padding="same", name="dw")(b_in)
    b = L.BatchNormalization(name="bn")(b)
    b = L.ReLU(name="relu")(b)
    x = keras.Model(b_in, L.Add(name="add")([b, b_in]), name="block1")(x)
    x = L.GlobalMaxPooling2D(name="gmp")(x)
    x = L.Dropout(0.2, seed=3, name="drop")(x)
    out = L.Dense(n_classes, activation="softmax", name="dense1")(x)
    return keras.Model(inp, out, name="zoo")


def test_every_listed_layer_records(keras_mod, tmp_path, tiny_data):
    keras_mod.utils.set_random_seed(0)
    model = zoo_of_layers(keras_mod)
    (x, y), (xv, yv) = tiny_data
    x, xv = x.astype(np.float32) / 255.0 - 0.5, xv.astype(np.float32) / 255.0 - 0.5  # standardized-ish floats
    store = revacnn.open_store(tmp_path / "s")
    run = revacnn.fit(model, (x, y), validation_data=(xv, yv), epochs=1, batch_size=64, store=store,
                      probes=6, progress=False, embeddings=False)
    assert run.epochs() == [0, 1]
    rec = run.epoch(1)
    assert rec.conv_layers[0] == "conv1" and set(rec.conv_layers) == {"conv1", "gconv", "sep", "block1/dw"}
    # filter layouts (Contract 6) and equality with the trained model's weights
    gconv = rec.layer("gconv")
    assert gconv.kernel.shape == (8, 3, 3, 2)  # groups=4: 8 input channels / 4
    np.testing.assert_array_equal(np.moveaxis(gconv.kernel, 0, -1), model.get_layer("gconv").kernel.numpy())
    sep = rec.layer("sep")
    assert sep.kernel.shape == (6, 1, 1, 16)  # pointwise filters over 8 channels x multiplier 2
    np.testing.assert_array_equal(np.moveaxis(sep.kernel, 0, -1), model.get_layer("sep").pointwise_kernel.numpy())
    np.testing.assert_array_equal(sep._get("depthwise_kernel"), model.get_layer("sep").depthwise_kernel.numpy())
    dw = rec.layer("block1/dw")
    dwk = model.get_layer("block1").get_layer("dw").kernel.numpy()  # (3, 3, 14, 1)
    assert dw.kernel.shape == (14, 3, 3, 1) and len(dw.filter_uids) == 14
    np.testing.assert_array_equal(dw.kernel[:, :, :, 0], np.moveaxis(dwk[:, :, :, 0], -1, 0))
    # activations from the graph itself: a sub-model to the tapped layer (post-activation)
    images, _ = store.probes(run.session_id)
    assert images.dtype == np.float32  # probes stored as given
    sub = keras_mod.Model(model.inputs, [model.get_layer("act").output, model.get_layer("gconv").output])
    want_sep, want_g = sub(images, training=False)
    np.testing.assert_allclose(rec.layer("sep").activations.astype(np.float32),
                               np.moveaxis(want_sep.numpy(), -1, 1), rtol=3e-3, atol=3e-3)
    np.testing.assert_allclose(rec.layer("gconv").activations.astype(np.float32),
                               np.moveaxis(want_g.numpy(), -1, 1), rtol=3e-3, atol=3e-3)
    assert rec.layer("block1/dw").activations.min() >= 0  # taken after BN -> ReLU
    # the app's tables hold the nested name
    layers = store.sql(f"SELECT DISTINCT layer FROM layers WHERE run_id='{run.run_id}' ORDER BY layer").layer.tolist()
    assert layers == sorted(["conv1", "gconv", "sep", "block1/dw", "dense1"])


def test_grad_l1_equals_gradient_tape_in_a_residual_block(keras_mod, tmp_path):
    """Several batches (partial last one), SGD(0.0): the recorded sums equal a separate tape's sums."""
    import tensorflow as tf

    keras_mod.utils.set_random_seed(4)
    (x, y), (xv, yv) = _shapes(150, 40, size=16)
    model = functional_cnn(keras_mod)
    model.compile(optimizer=keras_mod.optimizers.SGD(learning_rate=0.0),
                  loss=keras_mod.losses.SparseCategoricalCrossentropy())
    w0 = [w.copy() for w in model.get_weights()]
    store = revacnn.open_store(tmp_path / "s")
    bs = 64  # 150 = 64 + 64 + 22
    run = revacnn.fit(model, (x, y), validation_data=(xv, yv), epochs=1, batch_size=bs, store=store,
                      probes=4, seed=9, progress=False, embeddings=False)
    assert run.metrics().n_batches.iloc[-1] == 3
    ref = functional_cnn(keras_mod)
    ref.set_weights(w0)
    loss_fn = keras_mod.losses.SparseCategoricalCrossentropy()
    from revacnn.trainer.sources import ArraySource

    order = ArraySource(x, y).order(9, 1)
    names = ["conv2", "block1/conv_a", "block1/dw", "dense1"]
    recs = {r.name: r for r in recorded_layers(ref)}
    want = {n: 0.0 for n in names}
    for b in range(3):
        idx = order[b * bs : (b + 1) * bs]
        variables = [v for n in names for v in (recs[n].kernel_var, recs[n].bias_var)]
        with tf.GradientTape() as tape:
            loss = loss_fn(y[idx], ref(x[idx], training=True))
        g = tape.gradient(loss, variables)
        for i, n in enumerate(names):
            gk, gb = np.abs(g[2 * i].numpy()), np.abs(g[2 * i + 1].numpy())
            if recs[n].ctype == "depthwise":
                per = gk.sum(axis=(0, 1)).reshape(-1)
            else:
                per = gk.reshape(-1, gk.shape[-1]).sum(axis=0)
            want[n] = want[n] + per + gb
    for n in names:
        np.testing.assert_allclose(run.epoch(1).layer(n).grad_l1, want[n], rtol=2e-4, atol=1e-6)
    # lr 0: the weights did not move, and the record says so
    np.testing.assert_array_equal(run.epoch(1).layer("conv2").kernel, run.epoch(0).layer("conv2").kernel)


def _reference_fit(keras_mod, build, x, y, xv, yv, *, epochs, bs, seed, compile_kw):
    """Plain model.fit on the same model, data, seed and data order (the recorded trainer's order)."""
    import tensorflow as tf

    from revacnn.trainer.sources import ArraySource

    keras_mod.utils.set_random_seed(seed)
    model = build()
    model.compile(**compile_kw())
    src = ArraySource(x, y)
    parts = [tf.data.Dataset.from_tensor_slices((x[o], y[o])).batch(bs)
             for o in (src.order(seed, e) for e in range(1, epochs + 1))]
    ds = parts[0]
    for p in parts[1:]:
        ds = ds.concatenate(p)
    model.fit(ds, epochs=epochs, steps_per_epoch=src.n_batches(bs), verbose=0)
    return model.evaluate(xv, yv, verbose=0, return_dict=True)["accuracy"]


def _blobs(n: int, seed: int):
    """Standardized 16x16 float images of 4 noisy classes: a bright quadrant per class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.normal(0, 1, (n, 16, 16, 3)).astype(np.float32)
    for c in range(4):
        r, q = divmod(c, 2)
        x[y == c, r * 8 : r * 8 + 8, q * 8 : q * 8 + 8, :] += 0.6
    return (x - x.mean()) / x.std(), y


@pytest.mark.parametrize("which", ["functional", "resnet20"])
def test_accuracy_matches_plain_model_fit_on_standardized_floats(keras_mod, tmp_path, which):
    (x, y), (xv, yv) = _blobs(600, 1), _blobs(200, 2)
    epochs, bs, seed = (5, 16, 3)
    build = (lambda: functional_cnn(keras_mod, n_classes=4)) if which == "functional" else (
        lambda: resnet20((16, 16, 3), 4, rescale=False))

    def compile_kw():
        return {"optimizer": keras_mod.optimizers.Adam(3e-3), "loss": "sparse_categorical_crossentropy",
                "metrics": ["accuracy"]}

    want = _reference_fit(keras_mod, build, x, y, xv, yv, epochs=epochs, bs=bs, seed=seed, compile_kw=compile_kw)
    keras_mod.utils.set_random_seed(seed)
    model = build()
    model.compile(**compile_kw())
    store = revacnn.open_store(tmp_path / "s")
    run = revacnn.fit(model, (x, y), validation_data=(xv, yv), epochs=epochs, batch_size=bs, store=store,
                      probes=8, seed=seed, progress=False, embeddings=False)
    got = float(run.metrics().val_accuracy.iloc[-1])
    assert want > 0.6 and got > 0.6, (want, got)  # both learn clearly above chance (0.25)
    assert abs(got - want) <= 0.03, (got, want)
    rec = run.epoch(epochs)
    for r in [r for r in recorded_layers(model) if r.kind == "conv"]:
        np.testing.assert_array_equal(np.moveaxis(rec.layer(r.name).kernel, 0, -1), r.kernel())


def test_freeze_anywhere_in_a_graph_and_surgery_refused_with_the_reason(keras_mod, tmp_path):
    from revacnn.errors import RevacnnError
    from revacnn.steering import parse
    from revacnn.trainer import fork

    keras_mod.utils.set_random_seed(11)
    (x, y), (xv, yv) = _blobs(96, 3), _blobs(32, 4)
    model = functional_cnn(keras_mod, n_classes=4)
    model.compile(optimizer=keras_mod.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    store = revacnn.open_store(tmp_path / "s")
    run = revacnn.fit(model, (x, y), validation_data=(xv, yv), epochs=1, batch_size=32, store=store, probes=4,
                      progress=False, embeddings=False)
    data = ((x, y), (xv, yv))
    child = fork(store, run.run_id, 1, epochs=3, data=data, progress=False,
                 changes=[parse("freeze", ["block1/conv_a"]), parse("freeze-filters", ["block1/dw", "0", "3"])])
    k1 = run.epoch(1)
    for e in (2, 3):
        rec = child.epoch(e)
        np.testing.assert_array_equal(rec.layer("block1/conv_a").kernel, k1.layer("block1/conv_a").kernel)
        np.testing.assert_array_equal(rec.layer("block1/conv_a").bias, k1.layer("block1/conv_a").bias)
        assert rec.layer("block1/conv_a").grad_l1.sum() == 0  # not in the gradient computation
        dw = rec.layer("block1/dw").kernel
        np.testing.assert_array_equal(dw[[0, 3]], k1.layer("block1/dw").kernel[[0, 3]])
        assert not np.array_equal(dw[[1, 2]], k1.layer("block1/dw").kernel[[1, 2]])
    assert not np.array_equal(child.epoch(3).layer("conv2").kernel, k1.layer("conv2").kernel)
    n_runs = len(store.runs())
    with pytest.raises(RevacnnError, match="nested model"):  # group surgery stops at nested models
        fork(store, run.run_id, 1, data=data, progress=False, changes=[parse("add-filters", ["conv2", "2"])])
    assert len(store.runs()) == n_runs
