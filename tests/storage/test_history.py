"""One lineage: `Run.history` is what the SQL view `timeline`, `Run.metrics`, `compare` and the app show."""

from __future__ import annotations

import numpy as np
import pytest

import revacnn
from revacnn.storage import RunWriter, create_session
from revacnn.storage.compare import compare_runs


def _commit(w: RunWriter, epoch: int, val_acc: float) -> None:
    w.write_arrays(epoch, {"conv1": {"kernel": np.zeros((2, 3, 3, 3), np.float32), "filter_uids": np.arange(2),
                                     "_attrs": {"kind": "conv"}}}, {"metrics": {}})
    w.commit(epoch, {"loss": 1.0 / (epoch + 1), "val_accuracy": val_acc, "cumulative_time_s": float(epoch)})


@pytest.fixture()
def tree(tmp_path):
    """root (epochs 0-4) ← fork at 2 (2-4) ← fork of the fork at 3 (3-5); a second root (0-1)."""
    st = revacnn.open_store(tmp_path / "store")
    sid = create_session(st, dataset="toy", model="toy", probe_images=np.zeros((1, 4, 4, 3), np.uint8),
                         probe_labels=np.array([0]), probe_indices=[0], class_names=["a"], config={})
    root = RunWriter.create(st, session_id=sid, config={}, name="root")
    for e in range(5):
        _commit(root, e, 0.1)
    fork = RunWriter.create(st, session_id=sid, config={}, name="fork", parent_run_id=root.run_id, fork_epoch=2)
    for e in (2, 3, 4):
        _commit(fork, e, 0.2)
    grand = RunWriter.create(st, session_id=sid, config={}, name="grand", parent_run_id=fork.run_id,
                             fork_epoch=3)
    for e in (3, 4, 5):
        _commit(grand, e, 0.3)
    other = RunWriter.create(st, session_id=sid, config={}, name="other")
    for e in (0, 1):
        _commit(other, e, 0.4)
    return st, root.run_id, fork.run_id, grand.run_id, other.run_id


def test_history_follows_the_fork_points(tree):
    st, root, fork, grand, other = tree
    expected = {
        root: [(e, root) for e in range(5)],
        fork: [(0, root), (1, root), (2, fork), (3, fork), (4, fork)],
        grand: [(0, root), (1, root), (2, fork), (3, grand), (4, grand), (5, grand)],
        other: [(0, other), (1, other)],
    }
    for rid, want in expected.items():
        assert st.run(rid).history() == want


def test_sql_timeline_metrics_compare_and_app_use_it(tree):
    st, root, fork, grand, other = tree
    sql = st.sql("SELECT run_id, epoch, source_run_id, inherited, val_accuracy FROM timeline "
                 "ORDER BY run_id, epoch")
    for rid in (root, fork, grand, other):
        hist = st.run(rid).history()
        rows = sql[sql["run_id"] == rid]
        assert list(zip(rows["epoch"].astype(int), rows["source_run_id"], strict=True)) == hist
        assert rows["inherited"].tolist() == [s != rid for _, s in hist]
        m = st.run(rid).metrics()
        assert list(zip(m["epoch"].astype(int), m["source_run_id"], strict=True)) == hist
        assert np.allclose(m["val_accuracy"].to_numpy(float), rows["val_accuracy"].to_numpy(float))
    # val_accuracy tells the source apart: 0.1 root, 0.2 fork, 0.3 grand
    g = sql[sql["run_id"] == grand]
    assert g["val_accuracy"].round(3).tolist() == [0.1, 0.1, 0.2, 0.3, 0.3, 0.3]
    cmp = compare_runs(st, fork, grand)
    hist_f, hist_g = dict(st.run(fork).history()), dict(st.run(grand).history())
    assert cmp["epoch"].tolist() == [0, 1, 2, 3, 4, 5]

    def sources(col):
        return [v if isinstance(v, str) else None for v in cmp[col]]

    assert sources("source_a") == [hist_f.get(e) for e in range(6)]
    assert sources("source_b") == [hist_g.get(e) for e in range(6)]
    from revacnn.ui.data import ReplayData

    bundle = ReplayData.shared(st.root).bundle(grand, fresh=True)
    assert bundle.timeline == st.run(grand).history()
    assert list(zip(bundle.metrics["epoch"].astype(int), bundle.metrics["source_run_id"], strict=True)) == \
        st.run(grand).history()
