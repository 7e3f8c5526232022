"""A trainer killed with SIGKILL: readers never see a half-written epoch, and resume matches an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np

import revacnn
from revacnn.config import TrainConfig
from revacnn.trainer import resume, train

ARGS = ["--epochs", "4", "--train-size", "640", "--val-size", "128", "--batch-size", "32", "--probes", "6",
        "--seed", "11", "--quiet"]
CONV = ("conv1", "conv2", "conv3")
N_FILTERS = 16 + 20 + 20


def check_consistent(store, run_id):
    """Every committed epoch is complete in every table and its arrays read."""
    run = store.run(run_id)
    epochs = run.epochs()
    if not epochs:
        return epochs
    by_epoch = store.sql(
        f"SELECT e.epoch, (SELECT count(*) FROM layers l WHERE l.run_id=e.run_id AND l.epoch=e.epoch) AS nl, "
        f"(SELECT count(*) FROM filters f WHERE f.run_id=e.run_id AND f.epoch=e.epoch) AS nf, "
        f"(SELECT count(*) FROM predictions p WHERE p.run_id=e.run_id AND p.epoch=e.epoch) AS np "
        f"FROM epochs e WHERE e.run_id='{run_id}' ORDER BY e.epoch"
    )
    # SQL gathers its files after `epochs` was read and before `after` is: it shows every epoch
    # committed before it, no uncommitted one, and no gap.
    got, after = by_epoch.epoch.tolist(), run.epochs()
    assert got[: len(epochs)] == epochs and after[: len(got)] == got == list(range(len(got))), (epochs, got, after)
    assert (by_epoch.nl == 4).all() and (by_epoch.nf == N_FILTERS).all() and (by_epoch.np == 6).all(), by_epoch
    rec = run.epoch(epochs[-1])
    for name in CONV:
        layer = rec.layer(name)
        assert layer.kernel.shape[0] == layer.activations.shape[1] == len(layer.filter_uids)
    return epochs


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    path = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "revacnn.cli", "train", "--store", str(path), *ARGS],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    run_id = proc.stdout.readline().strip()
    assert run_id.startswith("run-"), run_id
    store = revacnn.open_store(path, mode="r")
    seen: list[int] = []
    reads = 0
    deadline = time.time() + 240
    while time.time() < deadline:  # a reader querying in a loop while the run writes
        seen = check_consistent(store, run_id) or seen
        reads += 1
        if 2 in seen:
            break
        assert proc.poll() is None, "trainer ended early"
    assert 2 in seen and reads > 3
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert store.run(run_id).status == "interrupted"
    committed = check_consistent(store, run_id)
    assert committed[:3] == [0, 1, 2]

    resumed = resume(revacnn.open_store(path), run_id, progress=False)
    assert resumed.status == "finished" and resumed.epochs() == [0, 1, 2, 3, 4]
    check_consistent(store, run_id)

    ref_store = revacnn.open_store(tmp_path / "ref")
    cfg = TrainConfig(epochs=4, train_size=640, val_size=128, batch_size=32, probes=6, seed=11)
    ref = train(cfg, ref_store, progress=False)
    a = store.sql(f"SELECT epoch, loss, accuracy, val_loss, val_accuracy FROM epochs WHERE run_id='{run_id}' ORDER BY epoch")
    b = ref_store.sql(f"SELECT epoch, loss, accuracy, val_loss, val_accuracy FROM epochs WHERE run_id='{ref.run_id}' ORDER BY epoch")
    assert a.equals(b), (a, b)
    for e in range(5):
        for name in CONV:
            np.testing.assert_array_equal(resumed.epoch(e).layer(name).kernel, ref.epoch(e).layer(name).kernel)
