"""Faults: SIGKILL at each commit point and at random moments, a stalled trainer, a full disk.

After every kill the store opens, no committed epoch is lost, no half epoch is visible (also to a
reader polling while the trainer ran), the run reads `interrupted`, and `resume` gives the same run
as an uninterrupted one: every epoch's metrics, kernels, biases, uids and the steering event.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest

import revacnn
from revacnn import _faultkit as kit
from revacnn.errors import RunBusyError
from revacnn.storage import RunWriter
from revacnn.storage.lease import owner_alive
from revacnn.trainer import resume

EPOCHS = 3


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (its steering command applied at epoch 2, batch 3)."""
    path = tmp_path_factory.mktemp("ref") / "store"
    store, run_id = kit.train_reference(path, epochs=EPOCHS)
    counts = kit.row_counts(store, run_id)
    assert sorted(counts) == list(range(EPOCHS + 1))
    ev = store.run(run_id).events()
    assert ev.event_id.tolist() == [kit.COMMAND_ID] and (ev.epoch[0], ev.batch[0]) == kit.COMMAND_AT
    return store, run_id, counts


def _watch(proc, path, run_id, expected, *, until=None, timeout=300.0):
    """Read the store while the child runs: epochs seen committed, half epochs seen (must be none).

    Stops when the child ends, or when ``until(seen)`` holds.
    """
    store = revacnn.open_store(path, mode="r")
    seen: set[int] = set()
    halves: list[int] = []
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        counts = kit.row_counts(store, run_id)
        halves += kit.half_epochs(counts, expected)
        seen |= set(counts)
        if until is not None and until(seen):
            break
        time.sleep(0.05)  # pacing the reader, not synchronisation
    return sorted(seen), halves


def _after_kill(path, run_id, expected, seen, halves):
    state = kit.check_store(path, run_id, expected=expected, seen=seen)
    assert state["lost"] == [], state
    assert state["half_epochs"] == [] and halves == [], (state, halves)
    assert state["contiguous"], state
    # a random kill may land after the run ended, while its process exits: then it reads finished
    ended = state["status"] == "finished" and state["epochs"] == sorted(expected)
    assert state["status"] == "interrupted" or ended, state
    return state


@pytest.mark.parametrize(
    "fault, committed",
    [
        ("before_commit@2", [0]),  # epoch 1's arrays and rows written, its marker not
        ("checkpoint_write@2", [0]),  # epoch 1's checkpoint half-way
        ("command_popped", None),  # the command applied, its event not written
        ("event_written", None),  # the event written, the command still queued
        ("compaction_written", [0, 1, 2, 3]),  # merged files written, manifest not switched
        ("compaction_published", [0, 1, 2, 3]),  # manifest switched, old segments still there
    ],
)
def test_sigkill_at_each_commit_point_then_resume_is_the_same_run(tmp_path, reference, fault, committed):
    ref_store, ref_id, expected = reference
    path = tmp_path / "store"
    proc = kit.start_child(path, epochs=EPOCHS, env={"REVACNN_FAULT": fault})
    run_id = proc.stdout.readline().strip()
    assert run_id.startswith("run-"), run_id
    seen, halves = _watch(proc, path, run_id, expected)
    assert proc.wait(timeout=60) == -signal.SIGKILL, f"{fault} did not fire"
    state = _after_kill(path, run_id, expected, seen, halves)
    if committed is not None:
        assert state["epochs"] == committed, state
    else:  # killed at epoch 2 batch 3: epoch 2 is not committed
        assert 2 not in state["epochs"], state

    store = revacnn.open_store(path)
    run = resume(store, run_id, progress=False)
    assert run.status == "finished"
    assert kit.run_differences(store, run_id, ref_store, ref_id) == []
    kit.check_store(path, run_id, expected=expected)  # and nothing half-visible after the resume


def test_random_sigkills_then_resume_is_the_same_run(tmp_path, reference):
    """Two kills at random moments (the trainer, then the resumed trainer), then a resume."""
    ref_store, ref_id, expected = reference
    rng = random.Random(20261201)
    path = tmp_path / "store"
    proc = kit.start_child(path, epochs=EPOCHS)
    run_id = proc.stdout.readline().strip()
    reader = revacnn.open_store(path, mode="r")
    kills = 0
    for i in range(2):
        # wait until this process writes the run (its pid in status.json, a record committed) ...
        pid = proc.pid
        seen, halves = _watch(proc, path, run_id, expected, until=lambda s: bool(s) and (  # noqa: B023
            reader.run(run_id).status_info.get("pid") == pid))  # noqa: B023
        # ... then kill it at a random moment after that
        t_kill = time.time() + rng.uniform(0.0, 1.5)
        more, h = _watch(proc, path, run_id, expected, until=lambda s: time.time() >= t_kill)  # noqa: B023
        seen, halves = sorted(set(seen) | set(more)), halves + h
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        if proc.returncode == -signal.SIGKILL:
            _after_kill(path, run_id, expected, seen, halves)
        if reader.run(run_id).status == "finished" or i == 1:
            break
        proc = kit.start_resume(path, run_id)
    store = revacnn.open_store(path)
    if store.run(run_id).status != "finished":
        resume(store, run_id, progress=False)
    assert store.run(run_id).status == "finished"
    assert kills >= 1
    assert kit.run_differences(store, run_id, ref_store, ref_id) == []


def test_stalled_trainer_reads_running_and_resume_beside_it_is_refused(tmp_path, reference, monkeypatch, capsys):
    """SIGSTOP: the heartbeat goes stale past the (here shortened) cross-host timeout, the pid lives."""
    from revacnn.cli import main
    from revacnn.storage import store as store_mod

    _, _, expected = reference
    path = tmp_path / "store"
    proc = kit.start_child(path, epochs=50)
    run_id = proc.stdout.readline().strip()
    try:
        _watch(proc, path, run_id, expected, until=lambda s: 0 in s)
        assert proc.poll() is None
        proc.send_signal(signal.SIGSTOP)
        timeout = 1.0
        monkeypatch.setattr(store_mod, "HEARTBEAT_TIMEOUT_S", timeout)
        store = revacnn.open_store(path, mode="r")
        run = store.run(run_id)
        deadline = time.time() + 120
        while time.time() - float(run.status_info["heartbeat_at"]) <= 2 * timeout and time.time() < deadline:
            time.sleep(0.1)
        info = run.status_info
        assert time.time() - float(info["heartbeat_at"]) > 2 * timeout  # stale beyond the timeout
        assert run.status == "running"  # its pid lives on this host
        # the same record seen from another host: only the heartbeat counts there
        assert not owner_alive({**info, "host": "elsewhere"}, timeout)
        capsys.readouterr()
        assert main(["resume", "--store", str(path), run_id, "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "running" in err[0] and str(proc.pid) in err[0], err
        with pytest.raises(RunBusyError, match=f"pid {proc.pid}"):
            RunWriter(store, run_id).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert revacnn.open_store(path, mode="r").run(run_id).status == "interrupted"
    RunWriter(revacnn.open_store(path), run_id).acquire().release()  # the lease went with the process


def test_full_disk_fails_the_run_with_one_message_and_keeps_committed_epochs(tmp_path, reference):
    ref_store, ref_id, _ = reference
    path = tmp_path / "store"
    env = {**kit.os.environ, "REVACNN_FAULT": "enospc@8", "TF_CPP_MIN_LOG_LEVEL": "3"}
    # 6 writes per epoch (checkpoint, arrays, 3 row segments, marker): the 8th is epoch 1's arrays
    proc = subprocess.run(
        [sys.executable, "-m", "revacnn.cli", "train", "--store", str(path), "--dataset", "shapes",
         "--model", "convnetjs", *kit.child_args(epochs=EPOCHS), "--no-embeddings", "--quiet"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("revacnn")]  # not TF's start-up lines
    assert len(lines) == 1 and "No space left on device" in lines[0] and "epoch 1" in lines[0], lines
    run_id = proc.stdout.split()[0]
    store = revacnn.open_store(path, mode="r")
    run = store.run(run_id)
    assert run.status == "failed"
    assert "No space left on device" in run.status_info["message"]
    assert run.epochs() == [0]
    ref = ref_store.run(ref_id)
    for name in ref.epoch(0).conv_layers:
        assert (run.epoch(0).layer(name).kernel == ref.epoch(0).layer(name).kernel).all()
    cols = ["loss", "val_loss", "val_accuracy"]
    assert run.table("epochs")[cols].equals(ref.table("epochs").query("epoch == 0")[cols].reset_index(drop=True))


def test_corrupt_status_and_checkpoint_get_one_message_from_the_cli(tmp_path, reference, capsys):
    from revacnn.cli import main

    ref_store, ref_id, _ = reference
    import shutil

    path = tmp_path / "store"
    shutil.copytree(ref_store.root, path)
    store = revacnn.open_store(path)
    store.layout.status_json(ref_id).write_text("{broken")
    capsys.readouterr()
    assert main(["resume", "--store", str(path), ref_id, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "status.json" in err[0] and "corrupt" in err[0], err
    assert main(["sql", "--store", str(path), "SELECT count(*) AS n FROM epochs"]) == 0
    out = capsys.readouterr()
    assert str(EPOCHS + 1) in out.out and "status.json" in out.err and len(out.err.strip().splitlines()) == 1

    ckpt = store.run(ref_id).checkpoint_path(1)
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    assert main(["fork", "--store", str(path), ref_id, "--epoch", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "e00001.ckpt" in err[0] and "corrupt" in err[0], err
    assert json.loads(store.layout.run_json(ref_id).read_text())["run_id"] == ref_id
