"""Forks: exact replay without changes, frozen layers, added filters, forks of forks, lineage and comparison."""

from __future__ import annotations

import numpy as np
import pytest

import revacnn
from revacnn.config import TrainConfig
from revacnn.errors import EpochNotFoundError, RunNotFoundError
from revacnn.steering import parse
from revacnn.storage.compare import compare_runs
from revacnn.storage.tree import format_tree
from revacnn.trainer import fork, train

CONV = ("conv1", "conv2", "conv3")


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    store = revacnn.open_store(tmp_path_factory.mktemp("fork") / "store")
    cfg = TrainConfig(epochs=4, train_size=384, val_size=96, batch_size=32, probes=5, seed=2, name="root")
    return store, train(cfg, store, progress=False)


def test_fork_without_changes_replays_the_parent_exactly(parent):
    store, root = parent
    child = fork(store, root.run_id, 2, progress=False, name="replay")
    assert child.parent_run_id == root.run_id and child.fork_epoch == 2
    assert child.epochs() == [2, 3, 4]
    cols = "epoch, loss, accuracy, val_loss, val_accuracy, lr, step"
    a = store.sql(f"SELECT {cols} FROM epochs WHERE run_id='{root.run_id}' AND epoch >= 2 ORDER BY epoch")
    b = store.sql(f"SELECT {cols} FROM epochs WHERE run_id='{child.run_id}' AND epoch >= 2 ORDER BY epoch")
    assert a.equals(b), (a, b)
    for e in (2, 3, 4):
        for name in CONV:
            np.testing.assert_array_equal(child.epoch(e).layer(name).kernel, root.epoch(e).layer(name).kernel)
        np.testing.assert_array_equal(child.epoch(e).probabilities, root.epoch(e).probabilities)
    # lineage: the timeline view gives the fork its full history
    tl = store.sql(f"SELECT epoch, source_run_id FROM timeline WHERE run_id='{child.run_id}' ORDER BY epoch")
    assert tl.epoch.tolist() == [0, 1, 2, 3, 4]
    assert tl.source_run_id.tolist() == [root.run_id] * 2 + [child.run_id] * 3
    diff = compare_runs(store, root.run_id, child.run_id)
    assert (diff.loc[diff.epoch > 2, "val_accuracy_diff"] == 0).all()


def test_fork_with_frozen_conv1(parent):
    store, root = parent
    before = {e: root.epoch(e).layer("conv1").kernel.copy() for e in root.epochs()}
    child = fork(store, root.run_id, 1, changes=[parse("freeze", ["conv1"])], epochs=3, progress=False)
    k1 = root.epoch(1).layer("conv1").kernel
    for e in (1, 2, 3):
        np.testing.assert_array_equal(child.epoch(e).layer("conv1").kernel, k1)
    assert not np.array_equal(child.epoch(3).layer("conv2").kernel, child.epoch(1).layer("conv2").kernel)
    for e, k in before.items():  # the parent is untouched
        np.testing.assert_array_equal(store.run(root.run_id).epoch(e).layer("conv1").kernel, k)
    frozen = store.sql(f"SELECT epoch, frozen FROM layers WHERE run_id='{child.run_id}' AND layer='conv1' ORDER BY epoch")
    assert frozen.frozen.all()
    ev = child.events()
    assert ev.kind.tolist() == ["freeze"] and ev.epoch.tolist() == [1]


def test_fork_with_added_filters_is_function_preserving(parent):
    store, root = parent
    k = 2
    child = fork(store, root.run_id, k, changes=[parse("add-filters", ["conv2", "4"])], epochs=4, progress=False)
    np.testing.assert_allclose(child.epoch(k).probabilities, root.epoch(k).probabilities, atol=1e-6)
    assert child.epoch(k).layer("conv2").kernel.shape[0] == 24
    assert child.epoch(4).layer("conv2").kernel.shape == (24, 5, 5, 16)
    assert child.epoch(4).layer("conv3").kernel.shape == (20, 5, 5, 24)
    assert child.epoch(k).layer("conv2").filter_uids.tolist() == list(range(24))
    n = 2
    assert len(store.sql(f"SELECT * FROM timeline WHERE run_id='{child.run_id}'")) == k + n + 1


def test_fork_of_a_fork_and_from_epoch_zero(parent):
    store, root = parent
    f1 = fork(store, root.run_id, 0, changes=[parse("freeze", ["conv1"])], epochs=2, progress=False, name="f1")
    assert f1.epochs() == [0, 1, 2]
    np.testing.assert_array_equal(f1.epoch(2).layer("conv1").kernel, root.epoch(0).layer("conv1").kernel)
    f2 = fork(store, f1.run_id, 1, changes=[parse("delete-filters", ["conv3", "0", "1"])], epochs=3,
              progress=False, name="f2")
    assert f2.timeline() == [(0, f1.run_id), (1, f2.run_id), (2, f2.run_id), (3, f2.run_id)]
    assert f2.epoch(3).layer("conv3").kernel.shape[0] == 18
    # conv1 stays frozen in the grandchild: frozen state travels with the checkpoint
    np.testing.assert_array_equal(f2.epoch(3).layer("conv1").kernel, root.epoch(0).layer("conv1").kernel)
    tree = format_tree(store)
    assert "f1" in tree and "f2" in tree and "fork@1" in tree


def test_fork_errors(parent):
    store, root = parent
    with pytest.raises(EpochNotFoundError, match="no committed epoch 9"):
        fork(store, root.run_id, 9, progress=False)
    with pytest.raises(RunNotFoundError):
        fork(store, "run-missing", 0, progress=False)
    n_runs = len(store.runs())
    with pytest.raises(revacnn.SteeringError, match="layers are"):
        fork(store, root.run_id, 1, changes=[parse("freeze", ["conv9"])], progress=False)
    assert len(store.runs()) == n_runs  # the refused fork left no run behind
