"""Steering a live trainer through the store's command channel, checked against the recorded weights."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import revacnn
from revacnn.steering import Command, parse, send
from revacnn.trainer import trainer as trainer_mod

from ..conftest import tiny_cnn


def train_with(tmp_path, keras_mod, tiny_data, schedule, *, epochs=3, optimizer=None, batch_size=64, seed=0, bn=False):
    """Train the tiny CNN; ``schedule[(epoch, batch)]`` lists commands sent just before that batch."""
    keras_mod.utils.set_random_seed(seed)
    model = tiny_cnn(keras_mod, bn=bn)
    if optimizer is not None:
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    store = revacnn.open_store(tmp_path / "store")
    real = trainer_mod.Trainer._between_batches

    def hooked(self, epoch, batch):
        for cmd in schedule.get((epoch, batch), []):
            send(self.store, self.run_id, cmd)
        return real(self, epoch, batch)

    (x, y), (xv, yv) = tiny_data
    trainer_mod.Trainer._between_batches = hooked
    try:
        run = revacnn.fit(model, (x, y), validation_data=(xv, yv), epochs=epochs, batch_size=batch_size,
                          store=store, probes=4, progress=False, embeddings=False, seed=seed)
    finally:
        trainer_mod.Trainer._between_batches = real
    return store, run


def kernel(run, epoch, layer):
    return run.epoch(epoch).layer(layer).kernel


def test_freeze_layer_keeps_it_bit_identical_and_unfreeze_resumes(tmp_path, keras_mod, tiny_data):
    sched = {(1, 0): [parse("freeze", ["conv1"])], (3, 0): [parse("unfreeze", ["conv1"])]}
    store, run = train_with(tmp_path, keras_mod, tiny_data, sched, epochs=4)
    assert run.status == "finished"
    k0 = kernel(run, 0, "conv1")
    for e in (1, 2):
        np.testing.assert_array_equal(kernel(run, e, "conv1"), k0)
        assert not np.array_equal(kernel(run, e, "conv2"), kernel(run, e - 1, "conv2"))
    assert not np.array_equal(kernel(run, 3, "conv1"), k0)  # trains again after unfreeze
    layers = store.sql(f"SELECT epoch, frozen, grad_l1 FROM layers WHERE run_id='{run.run_id}' AND layer='conv1' ORDER BY epoch")
    assert layers.frozen.tolist() == [False, True, True, False, False]
    assert layers.grad_l1[1] == 0 and layers.grad_l1[3] > 0  # no gradient computed while frozen
    ev = run.events()
    assert ev.kind.tolist() == ["freeze", "unfreeze"] and set(ev.status) == {"applied"}
    assert ev[["epoch", "batch"]].values.tolist() == [[1, 0], [3, 0]]
    # optimizer state survived the frozen epochs untouched: Adam moments of conv1 equal at epochs 0..2
    from revacnn.trainer.checkpoint import load_run_checkpoint

    c1 = load_run_checkpoint(run, 1)
    c2 = load_run_checkpoint(run, 2)
    paths = c1.optimizer_config  # noqa: F841
    frozen_slots = [i for i, v in enumerate(c1.optimizer_vars) if v.shape == (3, 3, 3, 4)]
    assert frozen_slots
    for i in frozen_slots:
        np.testing.assert_array_equal(c1.optimizer_vars[i], c2.optimizer_vars[i])


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_frozen_filters_are_bit_identical(tmp_path, keras_mod, tiny_data, opt):
    optimizer = (keras_mod.optimizers.Adam(1e-2) if opt == "adam"
                 else keras_mod.optimizers.SGD(0.05, momentum=0.9))
    sched = {(1, 2): [parse("freeze-filters", ["conv2", "1", "4"])]}
    store, run = train_with(tmp_path, keras_mod, tiny_data, sched, epochs=3, optimizer=optimizer)
    k1, k3 = kernel(run, 1, "conv2"), kernel(run, 3, "conv2")
    b1, b3 = run.epoch(1).layer("conv2").bias, run.epoch(3).layer("conv2").bias
    for f in (1, 4):
        np.testing.assert_array_equal(k3[f], k1[f])
        assert b3[f] == b1[f]
    for f in (0, 2, 3, 5):
        assert not np.array_equal(k3[f], k1[f])
    assert run.epoch(3).layer("conv2").frozen.tolist() == [False, True, False, False, True, False]
    rows = store.sql(f"SELECT n_frozen_filters FROM layers WHERE run_id='{run.run_id}' AND layer='conv2' AND epoch=3")
    assert rows.n_frozen_filters[0] == 2


def test_set_lr_pause_resume_stop(tmp_path, keras_mod, tiny_data):
    sched = {
        (1, 1): [parse("set-lr", ["0.0005"])],
        (2, 0): [parse("pause", []), parse("resume", [])],
        (2, 2): [parse("stop", [])],
    }
    store, run = train_with(tmp_path, keras_mod, tiny_data, sched, epochs=5)
    assert run.status == "stopped"
    assert run.epochs() == [0, 1]  # stopped during epoch 2: the partial epoch is not recorded
    assert run.metrics().lr.tolist()[-1] == pytest.approx(5e-4)
    ev = run.events()
    assert ev.kind.tolist() == ["set-lr", "pause", "resume", "stop"]
    assert (ev.status == "applied").all()


def test_bad_commands_are_rejected_and_training_continues(tmp_path, keras_mod, tiny_data):
    bad = [
        Command("freeze", {"layer": "conv9"}),
        Command("explode", {}),
        Command("delete-filters", {"layer": "conv1", "indices": [0, 1, 2, 3]}),
        Command("delete-filters", {"layer": "conv1", "indices": [7]}),
        Command("freeze-filters", {"layer": "conv2", "indices": ["a"]}),
        Command("set-lr", {"lr": -1}),
        Command("add-filters", {"layer": "conv1", "n": 0}),
    ]
    store, run = train_with(tmp_path, keras_mod, tiny_data, {(1, 1): bad}, epochs=2)
    # a malformed file in the queue, too
    ev = run.events()
    assert len(ev) == len(bad) and (ev.status == "rejected").all()
    msgs = dict(zip(ev.kind, ev.message, strict=False))
    assert "layers are conv1, conv2, dense1" in msgs["freeze"]
    assert "explode" in msgs["explode"]
    assert "out of range" in ev.message[3] and "at least one must remain" in ev.message[2]
    assert run.status == "finished" and run.epochs() == [0, 1, 2]


def test_malformed_command_file_is_rejected(tmp_path, keras_mod, tiny_data):
    def garbage(store, run_id):
        d = store.layout.commands_dir(run_id)
        (d / "00000000000000000001-cmd-garbage.json").write_text("{not json")
        (d / "00000000000000000002-cmd-notobj.json").write_text(json.dumps([1, 2]))

    real = trainer_mod.Trainer._between_batches

    def hooked(self, epoch, batch):
        if (epoch, batch) == (1, 0):
            garbage(self.store, self.run_id)
        return real(self, epoch, batch)

    trainer_mod.Trainer._between_batches = hooked
    try:
        keras_mod.utils.set_random_seed(0)
        (x, y), (xv, yv) = tiny_data
        run = revacnn.fit(tiny_cnn(keras_mod), (x, y), validation_data=(xv, yv), epochs=1,
                          store=tmp_path / "s", probes=4, progress=False, embeddings=False)
    finally:
        trainer_mod.Trainer._between_batches = real
    ev = run.events()
    assert (ev.status == "rejected").all() and len(ev) == 2
    assert all("malformed" in m for m in ev.message)
    assert run.status == "finished"


SENDER = textwrap.dedent(
    """
    import sys, time, json
    import revacnn
    from revacnn.steering import parse, send, wait_for_event
    store = revacnn.open_store(sys.argv[1], mode="r")
    deadline = time.time() + 300
    while time.time() < deadline:
        runs = store.runs()
        live = runs[runs.status == "running"]
        rid = live.run_id.iloc[0] if len(live) else None
        # send once epoch 1 is committed: the step is traced and epoch 2 has begun
        if rid and 1 in store.run(rid).epochs():
            cmd = send(store, rid, parse("freeze", ["conv2"]))
            ev = wait_for_event(store, rid, cmd.command_id, timeout_s=240)
            # one more epoch recorded after the freeze, then stop
            while int(ev["epoch"]) + 1 not in store.run(rid).epochs() and time.time() < deadline:
                time.sleep(0.05)
            stop = send(store, rid, parse("stop", []))
            print(json.dumps({"run_id": rid, "command_id": cmd.command_id, "stop_id": stop.command_id}))
            sys.exit(0)
        time.sleep(0.05)
    sys.exit(3)
    """
)


def test_command_from_another_process_is_applied_at_a_batch_boundary(tmp_path, keras_mod, tiny_data):
    # The run would train far longer than the test needs: it ends with the sender's `stop`, so
    # nothing here depends on how fast the sender starts. (Latency is measured by bench_freeze.py.)
    store_path = tmp_path / "store"
    revacnn.open_store(store_path)
    sender = subprocess.Popen([sys.executable, "-c", SENDER, str(store_path)], stdout=subprocess.PIPE, text=True)
    keras_mod.utils.set_random_seed(0)
    (x, y), (xv, yv) = tiny_data
    run = revacnn.fit(tiny_cnn(keras_mod), (x, y), validation_data=(xv, yv),
                      epochs=10_000, batch_size=8, store=store_path, probes=4, progress=False,
                      embeddings=False)
    out, _ = sender.communicate(timeout=300)
    assert sender.returncode == 0, out
    sent = json.loads(out)
    assert run.status == "stopped"
    ev = run.events().set_index("event_id")
    assert ev.loc[sent["command_id"], "status"] == "applied"
    assert ev.loc[sent["stop_id"], "status"] == "applied"
    e = int(ev.loc[sent["command_id"], "epoch"])
    assert e >= 2 and 0 <= int(ev.loc[sent["command_id"], "batch"]) <= 256 // 8
    # applied during epoch e: from the end of that epoch on, conv2 trains no more
    k = run.epoch(e).layer("conv2").kernel
    later = [k2 for k2 in run.epochs() if k2 > e]
    assert later
    for k2 in later:
        np.testing.assert_array_equal(run.epoch(k2).layer("conv2").kernel, k)


def test_add_and_delete_filters_while_training(tmp_path, keras_mod, tiny_data):
    sched = {
        (1, 1): [parse("add-filters", ["conv1", "3"])],
        (2, 1): [parse("delete-filters", ["conv1", "0", "5"])],
        (2, 2): [parse("add-filters", ["conv2", "2"], init="random")],
    }
    store, run = train_with(tmp_path, keras_mod, tiny_data, sched, epochs=3, bn=True)
    assert run.status == "finished", run.status_info
    ev = run.events()
    assert (ev.status == "applied").all(), ev.message.tolist()
    # each surgery event names the layers it changed: the plan of that change on the model before it
    from revacnn.steering import graph

    touched = [json.loads(a)["touched"] for a in ev.args]
    assert touched[0] == graph.plan(run.load_model(0), sched[(1, 1)][0]).layers
    assert touched[0][0] == "conv1" and "conv2" in touched[0]  # the producer, then its consumer
    uids = {e: run.epoch(e).layer("conv1").filter_uids.tolist() for e in (0, 1, 2)}
    assert uids[0] == [0, 1, 2, 3]
    assert uids[1] == [0, 1, 2, 3, 4, 5, 6]  # new filters get new uids
    assert uids[2] == [1, 2, 3, 4, 6]  # indices 0 and 5 (uids 0 and 5) deleted; the rest keep theirs
    assert run.epoch(2).layer("conv2").kernel.shape == (8, 3, 3, 5)  # conv2 sees 5 channels, has 8 filters
    counts = store.sql(f"SELECT epoch, layer, n_filters FROM layers WHERE run_id='{run.run_id}' AND layer LIKE 'conv%' ORDER BY layer, epoch")
    assert counts.n_filters.tolist() == [4, 7, 5, 5, 6, 6, 8, 8]
    # surviving filters keep their weights through the deletion (same uid, same history)
    assert store.sql(f"SELECT count(DISTINCT filter_uid) AS n FROM filters WHERE run_id='{run.run_id}' AND layer='conv1'").n[0] == 7
    # the checkpoint restores the changed architecture exactly
    model = run.load_model(3)
    assert model.get_layer("conv1").kernel.shape == (3, 3, 3, 5)
    assert model.get_layer("bn2").gamma.shape == (8,)
    np.testing.assert_array_equal(np.moveaxis(run.epoch(3).layer("conv2").kernel, 0, -1),
                                  model.get_layer("conv2").kernel.numpy())
