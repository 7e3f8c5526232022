"""tf.distribute: MirroredStrategy on two logical CPUs against one device and a GradientTape reference;
steering at the same step on every replica; moving runs between set-ups."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import revacnn
from revacnn.steering import send
from revacnn.steering.commands import Command

SEED = 3
N_TRAIN, BATCH, EPOCHS = 96, 24, 3  # 4 batches an epoch
COMMANDS = [  # (op, args, (epoch, batch))
    ("freeze", {"layer": "conv1"}, (1, 2)),
    ("add-filters", {"layer": "conv2", "n": 2, "init": "random"}, (2, 1)),
]


@pytest.fixture(scope="module")
def tf_mod():
    import tensorflow as tf

    return tf


@pytest.fixture(scope="module")
def strategy(tf_mod):
    from revacnn.trainer.distribute import make_strategy

    strategy = make_strategy("mirrored")  # the one the CLI makes too (one per process: collective keys)
    if strategy.num_replicas_in_sync != 2:
        pytest.skip("two logical CPU devices are configured in tests/conftest.py before TF initialises")
    return strategy


def _data(tiny_data):
    (x, y), (xv, yv) = tiny_data
    return (x[:N_TRAIN], y[:N_TRAIN]), (xv[:32], yv[:32])


def _model(keras, strategy=None):
    from contextlib import nullcontext

    from tests.conftest import tiny_cnn

    keras.utils.set_random_seed(SEED)
    with strategy.scope() if strategy is not None else nullcontext():
        model = tiny_cnn(keras)
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    return model


class _Steer:
    """Queues `COMMANDS` at the start (each applies at its batch boundary); keeps the final model's replicas."""

    def __init__(self, keras, store, commands):
        class CB(keras.callbacks.Callback):
            def on_train_begin(cb, logs=None):  # noqa: N805
                rid = store.run_ids()[0]
                for op, args, at in commands:
                    send(store, rid, Command(op=op, args=dict(args), apply_at=at))

            def on_train_end(cb, logs=None):  # noqa: N805
                self.replicas = {}
                for v in cb.model.trainable_variables:
                    vals = getattr(v.value, "values", None)
                    self.replicas["/".join(v.path.split("/")[-2:])] = [np.asarray(t) for t in vals] if vals else [np.asarray(v)]

        self.cb = CB()


def _fit(keras, tiny_data, tmp_path, name, strategy=None, commands=()):
    store = revacnn.open_store(tmp_path / name)
    steer = _Steer(keras, store, commands)
    run = revacnn.fit(
        _model(keras, strategy), _data(tiny_data)[0], validation_data=_data(tiny_data)[1], epochs=EPOCHS,
        batch_size=BATCH, store=store, probes=4, seed=SEED, progress=False, embeddings=False,
        callbacks=[steer.cb], strategy=strategy,
    )
    return store, run, steer


@pytest.fixture(scope="module")
def runs(keras_mod, tiny_data, tmp_path_factory, strategy):
    tmp = tmp_path_factory.mktemp("dist")
    single = _fit(keras_mod, tiny_data, tmp, "single", None, COMMANDS)
    mirrored = _fit(keras_mod, tiny_data, tmp, "mirrored", strategy, COMMANDS)
    plain = _fit(keras_mod, tiny_data, tmp, "plain", strategy)
    return {"single": single, "mirrored": mirrored, "plain": plain, "tmp": tmp}


def _close(a, b, what):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5, err_msg=what)


def test_grad_l1_equals_a_gradient_tape_reference_on_the_global_batch(runs, keras_mod, tiny_data, tf_mod):
    """No steering: the mirrored run's grad_l1 is the L1 of the global-batch loss gradient, computed here by hand."""
    _, run, _ = runs["plain"]
    keras = keras_mod
    model = _model(keras)
    opt = keras.optimizers.Adam(1e-2)
    opt.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    (x, y), _ = _data(tiny_data)
    names = ("conv1", "conv2", "dense1")
    for epoch in range(1, EPOCHS + 1):
        order = np.random.default_rng([SEED, epoch]).permutation(len(x))
        sums = {n: 0.0 for n in names}
        for b in range(0, len(x), BATCH):
            idx = order[b : b + BATCH]
            with tf_mod.GradientTape() as tape:
                loss = loss_fn(y[idx], model(x[idx], training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply(grads, model.trainable_variables)
            by = {"/".join(v.path.split("/")[-2:]): g for v, g in zip(model.trainable_variables, grads, strict=True)}
            for n in names:
                k = by[f"{n}/kernel"].numpy()
                per = np.abs(k).reshape(-1, k.shape[-1]).sum(0) + np.abs(by[f"{n}/bias"].numpy())
                sums[n] = sums[n] + per
        rec = run.epoch(epoch)
        for n in names:
            _close(rec.layer(n).grad_l1, sums[n], f"{n} epoch {epoch}")
    _close(run.epoch(EPOCHS).layer("conv2").kernel, _stored(model.get_layer("conv2").kernel), "final kernel")


def _stored(kernel):
    """A conv kernel as the store holds it: filters first."""
    return np.moveaxis(np.asarray(kernel), -1, 0)


def test_mirrored_run_records_what_one_device_records(runs):
    """Same global batches, same commands: grad_l1, weights and metrics agree to float tolerance."""
    _, a, _ = runs["single"]
    _, b, _ = runs["mirrored"]
    assert a.epochs() == b.epochs() == list(range(EPOCHS + 1))
    assert b.config["extra"]["strategy"]["replicas"] == 2 and b.config["extra"]["strategy"]["kind"] == "mirrored"
    for e in range(EPOCHS + 1):
        ra, rb = a.epoch(e), b.epoch(e)
        for n in ("conv1", "conv2", "dense1"):
            _close(rb.layer(n).grad_l1, ra.layer(n).grad_l1, f"grad_l1 {n} epoch {e}")
        for n in ("conv1", "conv2"):
            _close(rb.layer(n).kernel, ra.layer(n).kernel, f"kernel {n} epoch {e}")
        for m in ("loss", "accuracy", "val_loss", "val_accuracy"):
            if ra.metrics[m] is not None and not np.isnan(ra.metrics[m]):
                assert rb.metrics[m] == pytest.approx(ra.metrics[m], rel=1e-4, abs=1e-5), m
        assert rb.metrics["step"] == ra.metrics["step"]


def test_freeze_applies_on_every_replica_at_the_same_step(runs):
    _, a, _ = runs["single"]
    _, b, steer = runs["mirrored"]
    for run in (a, b):
        ev = run.events()
        row = ev[ev.kind == "freeze"].iloc[0]
        assert (row.status, int(row.epoch), int(row.batch)) == ("applied", 1, 2)
    # frozen from epoch 1 batch 2 on: bit-identical ever after, on both replicas
    k1 = b.epoch(1).layer("conv1").kernel
    for e in (2, 3):
        np.testing.assert_array_equal(b.epoch(e).layer("conv1").kernel, k1)
    for path, vals in steer.replicas.items():
        assert len(vals) == 2, path
        np.testing.assert_array_equal(vals[0], vals[1], err_msg=path)  # replicas never diverge
    np.testing.assert_array_equal(_stored(steer.replicas["conv1/kernel"][1]), k1)  # the second replica's too
    # and the step it froze at is the single-device run's: epoch 1 agrees before and after
    _close(b.epoch(1).layer("conv1").grad_l1, a.epoch(1).layer("conv1").grad_l1, "conv1 grad_l1 of 2 batches")


def test_surgery_under_the_strategy_rebuilds_the_step_and_training_continues(runs):
    _, a, _ = runs["single"]
    _, b, steer = runs["mirrored"]
    ev = b.events()
    row = ev[ev.kind == "add-filters"].iloc[0]
    assert (row.status, int(row.epoch), int(row.batch)) == ("applied", 2, 1), row.message
    assert b.epoch(1).layer("conv2").n_filters == 6
    for e in (2, 3):
        assert b.epoch(e).layer("conv2").n_filters == 8
        _close(b.epoch(e).layer("conv2").kernel, a.epoch(e).layer("conv2").kernel, f"conv2 epoch {e}")
        for n in ("conv2", "dense1"):
            _close(b.epoch(e).layer(n).grad_l1, a.epoch(e).layer(n).grad_l1, f"{n} grad_l1 epoch {e}")
    assert steer.replicas["conv2/kernel"][0].shape[-1] == 8  # the new variables are replicated
    assert np.isfinite(b.epoch(3).metrics["loss"])


def test_runs_move_between_set_ups(runs, strategy, tiny_data):
    """A mirrored run forked on one device, and a one-device run forked under the strategy, go on alike."""
    store_b, b, _ = runs["mirrored"]
    store_a, a, _ = runs["single"]
    data = _data(tiny_data)
    one = revacnn.trainer.fork(store_b, b.run_id, 2, progress=False, data=data)
    two = revacnn.trainer.fork(store_a, a.run_id, 2, progress=False, data=data, strategy=strategy)
    assert one.config["extra"]["strategy"]["kind"] == "none"
    assert two.config["extra"]["strategy"]["replicas"] == 2
    for child, parent in ((one, b), (two, a)):
        for n in ("conv1", "conv2", "dense1"):
            if n != "dense1":
                _close(child.epoch(3).layer(n).kernel, parent.epoch(3).layer(n).kernel, n)
            _close(child.epoch(3).layer(n).grad_l1, parent.epoch(3).layer(n).grad_l1, n)
        np.testing.assert_array_equal(child.epoch(3).layer("conv1").kernel, parent.epoch(3).layer("conv1").kernel)


def test_a_model_built_outside_the_scope_is_refused(keras_mod, tiny_data, tmp_path, strategy):
    from revacnn.errors import ConfigError

    with pytest.raises(ConfigError, match=r"strategy\.scope"):
        revacnn.fit(_model(keras_mod), _data(tiny_data)[0], epochs=1, store=tmp_path / "s", probes=2,
                    progress=False, embeddings=False, strategy=strategy)



def _callback_fit(keras, tiny_data, tmp, name, strategy=None):
    import tensorflow as tf

    from revacnn.keras import RevacnnCallback

    (x, y), (xv, yv) = _data(tiny_data)
    store = revacnn.open_store(tmp / name)
    model = _model(keras, strategy)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)  # the same global batches, in order
    rc = RevacnnCallback(store=store, probes=(xv[:4], yv[:4]), embeddings=False, live_every_s=0)
    steer = _Steer(keras, store, [("freeze-filters", {"layer": "conv2", "indices": [0, 3]}, (1, 1))])
    model.fit(ds, validation_data=(xv, yv), epochs=2, verbose=0, callbacks=[rc, steer.cb])
    return store.run(rc.run_id), steer


def test_revacnn_callback_under_the_users_own_strategy(keras_mod, tiny_data, tmp_path, strategy):
    """The user's model.fit under MirroredStrategy records what the one-device fit records."""
    a, _ = _callback_fit(keras_mod, tiny_data, tmp_path, "one")
    b, steer = _callback_fit(keras_mod, tiny_data, tmp_path, "two", strategy)
    for e in (1, 2):
        for n in ("conv1", "conv2", "dense1"):
            _close(b.epoch(e).layer(n).grad_l1, a.epoch(e).layer(n).grad_l1, f"grad_l1 {n} epoch {e}")
        for n in ("conv1", "conv2"):
            _close(b.epoch(e).layer(n).kernel, a.epoch(e).layer(n).kernel, f"kernel {n} epoch {e}")
    ev = b.events()
    assert ev[ev.kind == "freeze-filters"].iloc[0].status == "applied"
    k1, k2 = b.epoch(1).layer("conv2").kernel, b.epoch(2).layer("conv2").kernel
    np.testing.assert_array_equal(k2[[0, 3]], k1[[0, 3]])  # frozen filters bit-identical ...
    assert not np.array_equal(k2[[1, 2]], k1[[1, 2]])  # ... the others train
    for path, vals in steer.replicas.items():
        assert len(vals) == 2
        np.testing.assert_array_equal(vals[0], vals[1], err_msg=path)


# ---------------------------------------------------------------- two worker processes (MultiWorkerMirroredStrategy)
ROOT = Path(__file__).resolve().parents[2]
WORKER_DEADLINE_S = 900  # two TensorFlow imports on a loaded 2-core machine take minutes


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait(cond, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def _start_workers(store_dir: Path, tmp: Path, epochs: int) -> list[tuple[subprocess.Popen, Path, Path]]:
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for i in range(2):
        env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="",
                   TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
                   REVACNN_COLLECTIVE_TIMEOUT_S="120")
        out, err = tmp / f"out{i}.txt", tmp / f"err{i}.txt"
        cmd = [sys.executable, "-m", "revacnn.cli", "train", "--store", str(store_dir), "--strategy", "multiworker",
               "--model", "tests.trainer.user_setups:cli_factory", "--train-size", "128", "--val-size", "32",
               "--batch-size", "32", "--epochs", str(epochs), "--probes", "4", "--no-embeddings", "--quiet"]
        with open(out, "w") as fo, open(err, "w") as fe:
            procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fo, stderr=fe), out, err))
    return procs


def _run_id(procs) -> str:
    def first_line():
        for p, _out, err in procs:
            if p.poll() is not None and p.returncode != 0:
                raise AssertionError(f"a worker failed: {err.read_text()[-3000:]}")
        lines = procs[0][1].read_text().split()
        return lines[0] if lines else None

    return _wait(first_line, WORKER_DEADLINE_S, "the chief's run id")


def _stop(procs) -> None:
    for p, _, _ in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=60)


@pytest.mark.slow
def test_two_workers_record_one_run_and_apply_steering_at_the_same_step(tmp_path):
    store_dir = tmp_path / "store"
    procs = _start_workers(store_dir, tmp_path, epochs=4)
    try:
        rid = _run_id(procs)
        store = revacnn.open_store(store_dir)
        lr = send(store, rid, Command(op="set-lr", args={"lr": 0.005}, apply_at=(2, 1)))
        fz = send(store, rid, Command(op="freeze", args={"layer": "c1"}, apply_at=(2, 1)))
        for p, _, err in procs:
            rc = p.wait(timeout=WORKER_DEADLINE_S)
            assert rc == 0, err.read_text()[-3000:]
    finally:
        _stop(procs)
    run = store.run(rid)
    assert run.status == "finished" and run.epochs() == [0, 1, 2, 3, 4]
    assert store.run_ids() == [rid] and len(store.session_ids()) == 1  # one run, recorded by the chief
    ev = run.events().set_index("event_id")
    beat = json.loads((store.layout.run_dir(rid) / "workers" / "worker-1.json").read_text())
    assert beat["done"] and beat["task"] == 1
    applied = {row[0]: row for row in beat["applied"]}
    for cmd in (lr, fz):
        e = ev.loc[cmd.command_id]
        assert e.status == "applied", e.message
        # the worker applied it at the batch the chief did
        assert applied[cmd.command_id][1:] == [cmd.op, int(e.epoch), int(e.batch), "applied"]
    assert beat["lr"] == pytest.approx(0.005) and beat["frozen_layers"] == ["c1"]
    last = run.epoch(4)
    assert beat["step"] == last.metrics["step"] and last.metrics["lr"] == pytest.approx(0.005)
    for name, l1 in beat["kernel_l1"].items():  # the worker's replicas are the chief's record
        if not last.layer(name).has("kernel"):  # dense kernels are in the checkpoint only
            continue
        assert l1 == pytest.approx(float(np.abs(last.layer(name).kernel).astype(np.float64).sum()), rel=1e-6)
    np.testing.assert_array_equal(run.epoch(4).layer("c1").kernel, run.epoch(3).layer("c1").kernel)


@pytest.mark.slow
def test_a_killed_worker_leaves_the_run_interrupted_and_resume_continues_it(tmp_path):
    store_dir = tmp_path / "store"
    procs = _start_workers(store_dir, tmp_path, epochs=5)
    try:
        rid = _run_id(procs)
        store = revacnn.open_store(store_dir)
        _wait(lambda: len(store.run(rid).epochs()) >= 2, WORKER_DEADLINE_S, "two committed epochs")
        procs[1][0].send_signal(signal.SIGKILL)
        chief = procs[0][0]
        chief.wait(timeout=WORKER_DEADLINE_S)  # its collectives fail: it marks the run and ends
        assert chief.returncode != 0
    finally:
        _stop(procs)
    run = store.run(rid)
    assert run.status == "interrupted", run.status_info
    assert "worker" in (run.status_info.get("message") or "")
    done = run.epochs()
    assert done[0] == 0 and done == list(range(len(done))) and done[-1] < 5
    from revacnn.cli import main

    assert main(["resume", rid, "--store", str(store_dir), "--quiet"]) == 0  # on one device
    run = store.run(rid)
    assert run.status == "finished" and run.epochs() == [0, 1, 2, 3, 4, 5]
    assert run.events().empty or "resume" not in set(run.events().kind)


def test_a_dataset_under_the_strategy_is_split_by_global_batch(keras_mod, tiny_data, tmp_path, strategy):
    import tensorflow as tf

    (x, y), (xv, yv) = _data(tiny_data)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH - 1)  # uneven slices: 12 + 11
    runs = []
    for name, strat in (("one", None), ("two", strategy)):
        runs.append(revacnn.fit(_model(keras_mod, strat), ds, validation_data=(xv, yv), epochs=1,
                                store=tmp_path / name, probes=2, progress=False, embeddings=False, strategy=strat))
    for n in ("conv1", "conv2", "dense1"):
        _close(runs[1].epoch(1).layer(n).grad_l1, runs[0].epoch(1).layer(n).grad_l1, n)
    assert runs[1].epoch(1).metrics["loss"] == pytest.approx(runs[0].epoch(1).metrics["loss"], rel=1e-5)


def test_cli_train_takes_a_strategy(tmp_path, capsys):
    from revacnn.cli import main

    store = tmp_path / "store"
    rc = main(["train", "--store", str(store), "--strategy", "mirrored", "--train-size", "64", "--val-size", "16",
               "--epochs", "1", "--batch-size", "32", "--probes", "2", "--no-embeddings", "--quiet",
               "--model", "tests.trainer.user_setups:cli_factory"])
    assert rc == 0
    rid = capsys.readouterr().out.split()[0]
    run = revacnn.open_store(store).run(rid)
    assert run.status == "finished" and run.config["extra"]["strategy"]["kind"] == "mirrored"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--store", str(store), "--strategy", "multi"])
    assert exc.value.code == 2


def test_cli_multiworker_without_tf_config_is_one_line(tmp_path, capsys, monkeypatch):
    from revacnn.cli import main

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert main(["train", "--store", str(tmp_path / "s"), "--strategy", "multiworker"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "TF_CONFIG" in err[0]
