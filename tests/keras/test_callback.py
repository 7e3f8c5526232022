"""RevacnnCallback inside a user's own model.fit: epoch records against the model and a separate GradientTape; live steering."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import revacnn
from revacnn.errors import ConfigError
from revacnn.keras import RevacnnCallback
from revacnn.models import recorded_layers

from ..trainer import user_setups as us
from ..trainer.test_user_models import functional_cnn

ROOT = Path(__file__).resolve().parents[2]


def _model(keras, lr):
    keras.utils.set_random_seed(8)
    model = functional_cnn(keras, input_shape=(8, 8, 3), n_classes=4)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr) if lr == 0 else keras.optimizers.Adam(lr),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    return model


def test_callback_records_epochs_equal_to_the_model_and_a_gradient_tape(keras_mod, tmp_path):
    import tensorflow as tf

    (x, y), (xv, yv) = us.data()  # 112 examples: batches 48, 48, 16 (partial)
    model = _model(keras_mod, 0.0)
    w0 = [w.copy() for w in model.get_weights()]
    cb = RevacnnCallback(store=tmp_path / "s", probes=(xv[:6], yv[:6]), name="mine", embeddings=False)
    hist = model.fit(x, y, validation_data=(xv, yv), epochs=2, batch_size=48, shuffle=False, verbose=0,
                     callbacks=[cb])
    store = revacnn.open_store(tmp_path / "s")
    run = store.run(cb.run_id)
    assert run.epochs() == [0, 1, 2] and run.status == "finished"
    m = run.metrics()
    assert m.val_loss.iloc[-1] == pytest.approx(hist.history["val_loss"][-1])
    assert m.loss.iloc[-1] == pytest.approx(hist.history["loss"][-1])
    ref = functional_cnn(keras_mod, input_shape=(8, 8, 3), n_classes=4)
    ref.set_weights(w0)
    recs = {r.name: r for r in recorded_layers(ref)}
    names = ["conv1", "conv2", "block1/conv_a", "block1/dw", "dense1"]
    variables = [v for n in names for v in (recs[n].kernel_var, recs[n].bias_var)]
    want = {n: 0.0 for n in names}
    loss_fn = keras_mod.losses.CategoricalCrossentropy()
    for b in range(3):
        xb, yb = x[b * 48 : (b + 1) * 48], y[b * 48 : (b + 1) * 48]
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, ref(xb, training=True))
        g = tape.gradient(loss, variables)
        for i, n in enumerate(names):
            gk, gb = np.abs(g[2 * i].numpy()), np.abs(g[2 * i + 1].numpy())
            per = gk.sum(axis=(0, 1)).reshape(-1) if recs[n].ctype == "depthwise" else gk.reshape(-1, gk.shape[-1]).sum(0)
            want[n] = want[n] + per + gb
    for e in (1, 2):  # lr 0: every epoch sees the same weights and the same batches
        for n in names:
            np.testing.assert_allclose(run.epoch(e).layer(n).grad_l1, want[n], rtol=2e-4, atol=1e-6)
    assert not np.any(run.epoch(0).layer("conv1").grad_l1)
    # the model's train step is Keras' own again after the fit
    assert "train_step" not in vars(model)


def test_callback_kernels_equal_the_trained_model_and_fork_continues_under_fit(keras_mod, tmp_path):
    (x, y), (xv, yv) = us.data()
    model = _model(keras_mod, 1e-2)
    w0 = {r.name: r.kernel() for r in recorded_layers(model) if r.kind == "conv"}
    cb = RevacnnCallback(store=tmp_path / "s", probes=(xv[:4], yv[:4]), embeddings=False)
    model.fit(x, y, validation_data=(xv, yv), epochs=3, batch_size=32, verbose=0, callbacks=[cb])
    store = revacnn.open_store(tmp_path / "s")
    run = store.run(cb.run_id)
    for r in [r for r in recorded_layers(model) if r.kind == "conv"]:
        np.testing.assert_array_equal(np.moveaxis(run.epoch(3).layer(r.name).kernel, 0, -1), r.kernel())
        np.testing.assert_array_equal(np.moveaxis(run.epoch(0).layer(r.name).kernel, 0, -1), w0[r.name])
    restored = run.load_model(3)
    np.testing.assert_allclose(restored.predict(xv, verbose=0), model.predict(xv, verbose=0), rtol=1e-5, atol=1e-6)
    child = revacnn.trainer.fork(store, run.run_id, 2, epochs=3, data=((x, y), (xv, yv)), progress=False,
                                 changes=[revacnn.steering.parse("freeze", ["conv1"])])
    assert child.epochs() == [2, 3]
    np.testing.assert_array_equal(child.epoch(3).layer("conv1").kernel, run.epoch(2).layer("conv1").kernel)


def test_freeze_sent_from_another_process_freezes_inside_the_users_fit(keras_mod, tmp_path):
    import keras

    from revacnn.steering.channel import CommandQueue

    (x, y), (xv, yv) = us.data()
    model = _model(keras_mod, 1e-2)
    path = tmp_path / "s"
    cb = RevacnnCallback(store=path, probes=(xv[:4], yv[:4]), embeddings=False, live_every_s=0)
    procs = {}

    class Sender(keras.callbacks.Callback):
        """After epoch 1, other processes send `freeze conv2` and `add-filters conv1 2`; wait until both are queued."""

        def on_epoch_end(self, epoch, logs=None):
            if epoch != 0:
                return
            env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            for key, args in (("freeze", ["freeze", "conv2"]), ("add", ["add-filters", "conv1", "2"])):
                procs[key] = subprocess.Popen(
                    [sys.executable, "-m", "revacnn.cli", "steer", "--store", str(path), cb.run_id, *args,
                     "--timeout", "120"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            queue = CommandQueue(revacnn.open_store(path, mode="r"), cb.run_id)
            deadline = time.time() + 120
            while len(queue.pending()) < 2 and time.time() < deadline:
                for p in procs.values():
                    assert p.poll() is None, p.communicate()
                time.sleep(0.05)
            assert len(queue.pending()) == 2  # the next batch boundary (epoch 2, batch 0) applies both

    model.fit(x, y, validation_data=(xv, yv), epochs=3, batch_size=32, verbose=0, callbacks=[cb, Sender()])
    out_f, _ = procs["freeze"].communicate(timeout=120)
    out_a, _ = procs["add"].communicate(timeout=120)
    assert procs["freeze"].returncode == 0 and out_f.startswith("applied"), out_f
    assert procs["add"].returncode == 1 and "fork" in out_a and "revacnn.fit" in out_a, out_a
    run = revacnn.open_store(path).run(cb.run_id)
    np.testing.assert_array_equal(run.epoch(3).layer("conv2").kernel, run.epoch(1).layer("conv2").kernel)
    assert not np.array_equal(run.epoch(3).layer("conv1").kernel, run.epoch(1).layer("conv1").kernel)
    np.testing.assert_array_equal(np.moveaxis(run.epoch(3).layer("conv2").kernel, 0, -1),
                                  model.get_layer("conv2").kernel.numpy())
    assert run.epoch(3).layer("conv2").grad_l1.sum() == 0  # left out of the gradient computation
    rows = revacnn.open_store(path).sql(f"SELECT epoch, frozen FROM layers WHERE run_id='{run.run_id}' AND layer='conv2' ORDER BY epoch")
    assert rows.frozen.tolist() == [False, False, True, True]
    ev = run.events()
    assert dict(zip(ev.kind, ev.status, strict=True)) == {"freeze": "applied", "add-filters": "rejected"}
    assert set(ev.epoch) == {2}


def test_callback_needs_probes():
    with pytest.raises(ConfigError, match="probes"):
        RevacnnCallback(store="x", probes=16)
