"""Compact checkpoints: float32-exact round trips, kernels shared with the record, retention, replayed forks, resume, gc."""

from __future__ import annotations

import io
import signal

import numpy as np
import pytest

import revacnn
from revacnn import _faultkit as kit
from revacnn.cli import main
from revacnn.config import TrainConfig
from revacnn.errors import ConfigError
from revacnn.steering import parse
from revacnn.storage.checkpoints import SharedSource as Src
from revacnn.storage.checkpoints import checkpoint_epochs, collect, decode, encode
from revacnn.trainer import fork, train
from revacnn.trainer.checkpoint import load_run_checkpoint, to_arrays

from ..conftest import tiny_cnn

CONV = ("conv1", "conv2", "conv3")
METRICS = "epoch, loss, accuracy, val_loss, val_accuracy, lr, step, n_batches"


def _bits(a) -> bytes:
    a = np.asarray(a)
    return a.dtype.str.encode() + str(a.shape).encode() + a.tobytes()


# ------------------------------------------------------------------ encoding (no TensorFlow needed)
def test_encode_shares_only_what_the_record_holds_bit_for_bit():
    rng = np.random.default_rng(0)
    k = rng.normal(size=(3, 3, 2, 5)).astype(np.float32)  # a conv kernel, filters last
    b = rng.normal(size=5).astype(np.float32)
    slots = [rng.normal(size=(3, 3, 2, 5)).astype(np.float32), np.array(7, np.int64)]
    record = {("c", "kernel"): np.moveaxis(k, -1, 0).copy(), ("c", "bias"): b.astype(np.float16)}
    data, shared = encode({"x": 1}, [k, b], slots, sources={0: Src("c", "kernel", "filters_last"),
                                                            1: Src("c", "bias", "identity")},
                          record=lambda layer, key: record.get((layer, key)))
    assert shared == [0]  # the float16 "record" of the bias cannot rebuild it: stored
    d = decode(data, lambda layer, key: record[(layer, key)])
    assert [_bits(v) for v in d.model] == [_bits(k), _bits(b)]
    assert [_bits(v) for v in d.opt] == [_bits(v) for v in slots]
    assert d.meta == {"x": 1} and d.shared == [0]
    # a record that changed under the checkpoint is caught (CRC-32), not silently used
    with pytest.raises(revacnn.errors.CorruptStoreError, match="does not match"):
        decode(data, lambda layer, key: record[(layer, key)] + 1)


# ------------------------------------------------------------------ every filter kind
def _all_kinds_model(keras):
    L = keras.layers
    inp = keras.Input((8, 8, 3))
    h = L.Conv2D(4, 3, padding="same", activation="relu", name="conv1")(inp)
    h = L.Conv2D(6, 3, padding="same", groups=2, name="conv_g")(h)
    h = L.BatchNormalization(name="bn")(h)
    h = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(h)
    h = L.SeparableConv2D(5, 3, padding="same", depth_multiplier=2, name="sep")(h)
    h = L.Dropout(0.2, name="drop")(L.GlobalAveragePooling2D(name="gap")(h))
    return keras.Model(inp, L.Dense(4, activation="softmax", name="dense1")(h), name="kinds")


def test_round_trip_is_float32_exact_for_every_filter_kind(keras_mod, tiny_data, tmp_path):
    keras_mod.utils.set_random_seed(4)
    (x, y), (xv, yv) = tiny_data
    x, xv = x[:, :8, :8].astype(np.float32) / 255, xv[:, :8, :8].astype(np.float32) / 255
    model = _all_kinds_model(keras_mod)
    run = revacnn.fit(model, (x, y), validation_data=(xv, yv), epochs=2, batch_size=64, probes=4,
                      store=tmp_path / "store", progress=False, embeddings=False)
    ckpt = load_run_checkpoint(run, 2)  # the model object trained in place: its variables are the reference
    assert [_bits(v) for v in ckpt.model_vars] == [_bits(v.numpy()) for v in model.variables]
    assert [_bits(v) for v in ckpt.optimizer_vars] == [_bits(v.numpy()) for v in model.optimizer.variables]
    assert run.checkpoint_path(2).suffix == ".ckpt"
    data = run.read_checkpoint(2)
    paths = {data.meta["model_paths"][i] for i in data.shared}
    want = {"conv1/kernel", "conv1/bias", "conv_g/kernel", "conv_g/bias", "dw/kernel", "dw/bias",
            "sep/pointwise_kernel", "sep/depthwise_kernel", "sep/bias", "dense1/bias"}
    assert want <= paths, paths
    assert not any("dense1/kernel" in p for p in paths)  # the record holds no dense kernel: stored
    # smaller than the old uncompressed .npz of the same checkpoint
    buf = io.BytesIO()
    np.savez(buf, **to_arrays(ckpt))
    assert run.checkpoint_path(2).stat().st_size < 0.7 * len(buf.getvalue())
    # an old store's .npz stays readable
    from revacnn.storage import RunWriter

    run.checkpoint_path(2).unlink()
    RunWriter(run.store, run.run_id).write_checkpoint(2, to_arrays(ckpt))
    assert run.checkpoint_path(2).suffix == ".npz"
    old = load_run_checkpoint(run, 2)
    assert [_bits(v) for v in old.model_vars] == [_bits(v) for v in ckpt.model_vars]
    assert [_bits(v) for v in old.optimizer_vars] == [_bits(v) for v in ckpt.optimizer_vars]


# ------------------------------------------------------------------ retention and replayed forks
def _cfg(k: int) -> TrainConfig:
    return TrainConfig(epochs=4, train_size=256, val_size=64, batch_size=32, probes=4, seed=3,
                       embeddings=False, checkpoint_every=k, name=f"k{k}")


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    """Two identical runs with a steering command at epoch 2: every epoch checkpointed (K=1), and K=3."""
    store = revacnn.open_store(tmp_path_factory.mktemp("ckpt") / "store")
    out = {}
    for k in (1, 3):
        out[k] = train(_cfg(k), store, progress=False, on_start=lambda rid: kit.queue_command(store, rid))
    return store, out


def _same_record(a, b, epoch, layers=CONV):
    for name in layers:
        la, lb = a.epoch(epoch).layer(name), b.epoch(epoch).layer(name)
        assert _bits(la.kernel) == _bits(lb.kernel), (name, epoch)
        assert _bits(la.bias) == _bits(lb.bias), (name, epoch)
    assert _bits(a.epoch(epoch).probabilities) == _bits(b.epoch(epoch).probabilities)


def _metrics(store, run_id):
    return store.sql(f"SELECT {METRICS} FROM epochs WHERE run_id='{run_id}' ORDER BY epoch")


def test_retention_keeps_every_kth_first_and_last(parents):
    store, runs = parents
    assert checkpoint_epochs(store.layout, runs[1].run_id) == [0, 1, 2, 3, 4]
    assert checkpoint_epochs(store.layout, runs[3].run_id) == [0, 3, 4]
    assert runs[3].config["checkpoint_every"] == 3
    # the runs themselves are the same trajectory
    assert _metrics(store, runs[1].run_id).drop(columns=[]).equals(_metrics(store, runs[3].run_id))
    for e in range(5):
        _same_record(runs[1], runs[3], e)


def test_fork_from_an_epoch_without_checkpoint_replays_bit_exactly(parents, capsys):
    store, runs = parents
    p1, p3 = runs[1], runs[3]
    # epoch 2 of the K=3 run has no checkpoint; the command applied at epoch 2 batch 3 replays too
    assert 2 not in checkpoint_epochs(store.layout, p3.run_id)
    child = fork(store, p3.run_id, 2, progress=False, name="replayed")
    err = capsys.readouterr().err
    assert "has no checkpoint: replayed epochs 1..2 from its checkpoint at epoch 0" in err, err
    assert "1 steering command" in err
    assert child.config["extra"]["replayed"] == {"epoch": 2, "from_checkpoint": 0, "commands": 1, "saved": True}
    assert 2 in checkpoint_epochs(store.layout, p3.run_id)  # the fork point is now checkpointed
    _same_record(child, p3, 2)  # the fork's start equals the parent's record of that epoch
    # and it trains on exactly as a fork from a checkpointed epoch (the K=1 parent's) does
    ref = fork(store, p1.run_id, 2, progress=False, name="reference")
    assert "replayed" not in capsys.readouterr().err
    for e in (2, 3, 4):
        _same_record(child, ref, e)
    a, b = _metrics(store, child.run_id), _metrics(store, ref.run_id)
    assert a.equals(b), (a, b)
    # and both equal the parents' own records (a fork without changes replays its parent)
    for e in (3, 4):
        _same_record(child, p3, e)


def test_fork_with_changes_from_a_replayed_epoch(parents):
    store, runs = parents
    change = [parse("freeze", ["conv2"])]
    a = fork(store, runs[3].run_id, 1, changes=change, epochs=3, progress=False)
    b = fork(store, runs[1].run_id, 1, changes=change, epochs=3, progress=False)
    for e in (1, 2, 3):
        _same_record(a, b, e)
    assert _metrics(store, a.run_id).equals(_metrics(store, b.run_id))
    assert checkpoint_epochs(store.layout, a.run_id) == [1, 3]  # its first and last epoch (K=3)


def test_gc_keeps_what_forks_need_and_removes_the_rest(parents, capsys):
    store, runs = parents
    p1 = runs[1]
    b = fork(store, p1.run_id, 1, epochs=3, progress=False, name="gc-fork")  # K=1: checkpoints 1, 2, 3
    stray = store.layout.checkpoint(p1.run_id, 0).parent / ".e00009.ckpt.0123abcd.tmp"
    stray.write_bytes(b"x")
    assert main(["gc", "--store", str(store.root), "--dry-run", "--keep-every", "3"]) == 0
    out = capsys.readouterr().out
    assert "would free" in out and p1.run_id in out, out
    assert checkpoint_epochs(store.layout, p1.run_id) == [0, 1, 2, 3, 4] and stray.exists()
    freed = collect(store, every=3)
    gone = {(i.run_id, i.epoch) for i in freed}
    # the K=1 parent keeps 0 and 3 (every 3rd), 4 (last) and the epochs forks were made from
    points = {store.run(r).fork_epoch for r in store.run_ids() if store.run(r).parent_run_id == p1.run_id}
    assert checkpoint_epochs(store.layout, p1.run_id) == sorted({0, 3, 4} | points) and 1 in points
    assert (p1.run_id, None) in gone and not stray.exists()
    # the K=1 fork from epoch 1 (epochs 1..3) thinned to 3: keeps 1 (its fork point) and 3 (last), frees 2
    assert (b.run_id, 2) in gone and checkpoint_epochs(store.layout, b.run_id) == [1, 3]
    assert all(i.nbytes > 0 for i in freed if i.epoch is not None)
    assert collect(store) == []  # nothing more to free under each run's own retention
    # a fork from the epoch whose checkpoint was freed still works, and equals the run's record
    child = fork(store, b.run_id, 2, epochs=3, progress=False)
    _same_record(child, b, 2)
    _same_record(child, b, 3)


# ------------------------------------------------------------------ resume after SIGKILL
def test_resume_with_retention_after_sigkill(tmp_path):
    path = tmp_path / "store"
    # K=3, 3 epochs: checkpoints at 0 and 3; killed before epoch 3's marker, so epochs 0..2 are
    # committed and only epoch 0 has a checkpoint: resume replays 1..2 (the command at epoch 2 too)
    proc = kit.start_child(path, env={"REVACNN_FAULT": "before_commit@4"}, checkpoint_every=3)
    run_id = proc.stdout.readline().strip()
    assert proc.wait(timeout=300) == -signal.SIGKILL
    store = revacnn.open_store(path)
    assert store.run(run_id).epochs() == [0, 1, 2]
    assert [e for e in checkpoint_epochs(store.layout, run_id) if e in (0, 1, 2)] == [0]
    r = kit.start_resume(path, run_id)
    _, err = r.communicate(timeout=300)
    assert r.returncode == 0, err
    assert "resumes from its checkpoint at epoch 0" in err, err
    run = store.run(run_id)
    assert run.status == "finished" and run.epochs() == [0, 1, 2, 3]
    ref_store, ref_id = kit.train_reference(tmp_path / "ref")
    ref = ref_store.run(ref_id)
    assert _metrics(store, run_id).equals(_metrics(ref_store, ref_id))
    for e in range(4):
        _same_record(run, ref, e)
    assert kit.run_differences(store, run_id, ref_store, ref_id) == []  # events included


def test_a_run_ended_early_keeps_its_last_epochs_checkpoint(keras_mod, tiny_data, tmp_path):


    class StopAt2(keras_mod.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 == 2:
                self.model.stop_training = True

    keras_mod.utils.set_random_seed(1)
    run = revacnn.fit(tiny_cnn(keras_mod), tiny_data[0], validation_data=tiny_data[1], epochs=6, probes=2,
                      store=tmp_path / "store", progress=False, embeddings=False, checkpoint_every=5,
                      callbacks=[StopAt2()])
    assert run.epochs() == [0, 1, 2] and run.config["checkpoint_every"] == 5
    assert checkpoint_epochs(run.store.layout, run.run_id) == [0, 2]


# ------------------------------------------------------------------ bad input
def test_bad_checkpoint_every_is_one_clear_message(capsys, keras_mod, tiny_data, tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoint_every=0 \(expected an integer >= 1"):
        TrainConfig(checkpoint_every=0).validate()
    model = keras_mod.Sequential([keras_mod.Input((12, 12, 3)), keras_mod.layers.Conv2D(2, 3, name="c"),
                                  keras_mod.layers.Flatten(), keras_mod.layers.Dense(4)])
    with pytest.raises(ConfigError, match="checkpoint_every"):
        revacnn.fit(model, tiny_data[0], epochs=1, store=tmp_path / "s", checkpoint_every=0, progress=False)
    for argv in (["train", "--checkpoint-every", "0"], ["fork", "r", "--epoch", "1", "--checkpoint-every", "x"],
                 ["gc", "--keep-every", "-1"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("--checkpoint-every" in err[0] or "--keep-every" in err[0]), err
