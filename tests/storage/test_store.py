"""The store without a trainer: commit protocol, read-only SQL, timeline, bad input and corrupt files."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pandas as pd
import pytest

import revacnn
from revacnn.errors import (
    EpochNotFoundError,
    RunNotFoundError,
    SQLError,
    StoreError,
    StoreNotFoundError,
)
from revacnn.storage import RunWriter, create_session


def _epoch(w: RunWriter, epoch: int, *, commit: bool = True, val_acc: float = 0.5) -> None:
    F = 3
    arrays = {
        "conv1": {
            "kernel": np.full((F, 3, 3, 3), epoch, np.float32),
            "bias": np.zeros(F, np.float32),
            "filter_uids": np.arange(F),
            "_attrs": {"kind": "conv"},
        }
    }
    w.write_arrays(epoch, arrays, {"metrics": {}}, extra={"predictions": np.full((2, 3), 1 / 3, np.float32)})
    w.write_rows("layers", epoch, [{"run_id": w.run_id, "epoch": epoch, "layer": "conv1", "kind": "conv",
                                    "n_filters": F, "frozen": False, "n_frozen_filters": 0}])
    w.write_rows("filters", epoch, {"run_id": [w.run_id] * F, "epoch": [epoch] * F, "layer": ["conv1"] * F,
                                    "filter": list(range(F)), "filter_uid": list(range(F))})
    if commit:
        w.commit(epoch, {"loss": 1.0 / (epoch + 1), "val_accuracy": val_acc, "cumulative_time_s": float(epoch)})


@pytest.fixture()
def store(tmp_path):
    st = revacnn.open_store(tmp_path / "store")
    sid = create_session(st, dataset="toy", model="toy", probe_images=np.zeros((2, 4, 4, 3), np.uint8),
                         probe_labels=np.array([0, 1]), probe_indices=[5, 9], class_names=["a", "b", "c"],
                         config={})
    root = RunWriter.create(st, session_id=sid, config={"seed": 0}, name="root")
    for e in range(4):
        _epoch(root, e)
    root.set_status("finished")
    fork = RunWriter.create(st, session_id=sid, config={}, name="fork", parent_run_id=root.run_id, fork_epoch=2)
    for e in (2, 3, 4):
        _epoch(fork, e, val_acc=0.9)
    fork.set_status("finished")
    st.ids = (sid, root.run_id, fork.run_id)  # type: ignore[attr-defined]
    return st


def test_half_written_epoch_is_invisible(store):
    sid, root, _ = store.ids
    w = RunWriter(store, root)
    _epoch(w, 4, commit=False)  # arrays and rows written, marker missing
    assert store.run(root).epochs() == [0, 1, 2, 3]
    assert store.sql(f"SELECT max(epoch) AS m FROM layers WHERE run_id='{root}'").m[0] == 3
    assert store.sql(f"SELECT count(*) AS n FROM filters WHERE run_id='{root}'").n[0] == 4 * 3


def test_timeline_includes_ancestors_before_the_fork_point(store):
    _, root, fork = store.ids
    tl = store.sql(f"SELECT epoch, source_run_id, val_accuracy FROM timeline WHERE run_id='{fork}' ORDER BY epoch")
    assert tl.epoch.tolist() == [0, 1, 2, 3, 4]
    assert tl.source_run_id.tolist() == [root, root, fork, fork, fork]
    assert store.run(fork).timeline() == [(0, root), (1, root), (2, fork), (3, fork), (4, fork)]
    rec = store.run(fork).epoch(1)
    assert rec.run_id == root and rec.layer("conv1").kernel[0, 0, 0, 0] == 1.0
    assert store.run(fork).epoch(3).layer("conv1").kernel[0, 0, 0, 0] == 3.0


def test_compaction_keeps_every_epoch(store):
    _, root, _ = store.ids
    w = RunWriter(store, root)
    before = store.sql(f"SELECT * FROM filters WHERE run_id='{root}' ORDER BY epoch, filter")
    w.compact()
    files = sorted(p.name for p in store.layout.table_dir(root, "filters").iterdir())
    assert files == ["compact-g000001.parquet"]  # generation 1, named by tables/manifest.json
    after = store.sql(f"SELECT * FROM filters WHERE run_id='{root}' ORDER BY epoch, filter")
    assert before.equals(after)
    assert store.run(root).epochs() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "query, fragment",
    [
        ("SELECT * FROM read_csv('/etc/passwd')", "cannot read or write files"),
        ("SELECT * FROM read_text('/etc/hostname')", "cannot read or write files"),
        ("COPY epochs TO '/tmp/x.csv'", "Only SELECT"),
        ("DROP TABLE epochs", "Only SELECT"),
        ("SET enable_external_access = true", "Only SELECT"),
        ("SELECT 1; SELECT 2", "one statement"),
        ("SELEC 1", "syntax"),
        ("", "Empty"),
        ("SELECT * FROM no_such_table", "SQL error"),
    ],
)
def test_user_sql_is_read_only_and_cannot_touch_files(store, query, fragment):
    with pytest.raises(SQLError, match=fragment) as info:
        store.sql(query)
    assert "root:" not in str(info.value)  # no file content leaks


def test_sql_time_limit(store):
    with pytest.raises(SQLError, match="time limit"):
        store.sql("SELECT count(*) FROM range(1000000000000) a", timeout_s=0.3)


def test_tables_and_columns_of_the_contract(store):
    cols = {
        "sessions": ["session_id", "created_at", "dataset", "model", "n_probes", "config"],
        "runs": ["run_id", "session_id", "parent_run_id", "fork_epoch", "name", "status", "created_at",
                 "finished_at", "config"],
        "epochs": ["run_id", "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "duration_s",
                   "committed_at"],
        "layers": ["run_id", "epoch", "layer", "kind", "n_filters", "frozen", "n_frozen_filters", "grad_l1",
                   "weight_l2", "cluster_score", "rgb_mono_fraction"],
        "filters": ["run_id", "epoch", "layer", "filter", "filter_uid", "frozen", "grad_l1", "weight_l2",
                    "weight_change_l1", "act_mean", "tsne_x", "tsne_y", "dominant_channel", "share_r",
                    "share_g", "share_b"],
        "events": ["run_id", "event_id", "epoch", "batch", "at", "kind", "args", "status", "message"],
        "probes": ["session_id", "probe", "label"],
        "predictions": ["run_id", "epoch", "probe", "predicted", "confidence"],
        "timeline": ["run_id", "epoch", "source_run_id"],
    }
    types = store.sql("SELECT table_name, column_name, data_type FROM information_schema.columns")
    types = {(t, c): d for t, c, d in types.itertuples(index=False)}
    ints = {"epoch", "batch", "filter", "filter_uid", "probe", "label", "predicted", "n_filters",
            "n_frozen_filters", "fork_epoch", "n_probes", "dominant_channel"}
    texts = {"session_id", "run_id", "parent_run_id", "source_run_id", "event_id", "name", "status", "layer",
             "kind", "dataset", "model", "message", "config", "args"}
    for table, want in cols.items():
        got = list(store.sql(f"SELECT * FROM {table} LIMIT 0").columns)
        assert got[: len(want)] == want, (table, got)  # the contract's columns first, in its order
        for col in want:
            kind = types[(table, col)]
            if col in ints:
                assert kind in ("TINYINT", "SMALLINT", "INTEGER", "BIGINT"), (table, col, kind)
            elif col in texts:
                assert kind == "VARCHAR", (table, col, kind)
            elif col == "frozen":
                assert kind == "BOOLEAN", (table, col, kind)
            elif col == "at" or col.endswith("_at"):
                assert kind == "TIMESTAMP WITH TIME ZONE", (table, col, kind)
            else:
                assert kind == "DOUBLE", (table, col, kind)
    import json

    for table in ("sessions", "runs"):
        for text in store.sql(f"SELECT config FROM {table}").config:
            assert isinstance(json.loads(text), dict)  # JSON a query can use with ->>
    assert store.sql("SELECT probe, label, val_index FROM probes ORDER BY probe").to_dict("list") == {
        "probe": [0, 1], "label": [0, 1], "val_index": [5, 9]}


def test_missing_and_corrupt_store(tmp_path, store):
    with pytest.raises(StoreNotFoundError, match="No revacnn store"):
        revacnn.open_store(tmp_path / "nope", mode="r")
    with pytest.raises(RunNotFoundError, match="run='run-x'"):
        store.run("run-x")
    _, root, _ = store.ids
    with pytest.raises(EpochNotFoundError, match=r"epochs: 0\.\.3"):
        store.run(root).epoch(9)
    # a corrupt epoch array: one clear StoreError, other epochs still readable
    import shutil

    shutil.rmtree(store.layout.epoch_arrays(root, 1))
    with pytest.raises(StoreError, match="missing or corrupt"):
        store.run(root).epoch(1)
    assert store.run(root).epoch(2).layer("conv1").kernel.shape == (3, 3, 3, 3)
    # a corrupt run.json does not break listing the others
    (store.layout.run_json(root)).write_text("{not json")
    assert len(store.runs()) == 1


def test_empty_store_queries(tmp_path):
    st = revacnn.open_store(tmp_path / "empty")
    assert st.sql("SELECT count(*) AS n FROM filters").n[0] == 0
    assert st.sql("SELECT count(*) AS n FROM timeline").n[0] == 0
    assert st.runs().empty and st.sessions().empty


def test_interrupted_status_when_the_trainer_is_gone(store):
    import json

    _, root, _ = store.ids
    path = store.layout.status_json(root)
    info = json.loads(path.read_text())
    info.update(status="running", pid=2**22 + 12345)  # no such process
    path.write_text(json.dumps(info))
    assert store.run(root).status == "interrupted"
    assert store.runs().set_index("run_id").status[root] == "interrupted"


def test_every_example_query_answers(store):
    """Each example query of the app's SQL console gives the rows it promises on a known store."""
    from revacnn.storage import EXAMPLE_QUERIES

    _, root, fork = store.ids
    RunWriter(store, root).write_event(event_id="cmd-1", epoch=2, batch=3, kind="freeze", args={"layer": "conv1"},
                                       status="applied", message="conv1 frozen")
    import json

    expected = {
        "Runs and their best validation accuracy": lambda df: (
            df[["run_id", "epochs", "best_val_acc"]].values.tolist() == [[root, 3, 0.5], [fork, 4, 0.9]]
            and df.parent_run_id.iloc[1] == root and df.fork_epoch.iloc[1] == 2),
        "Dead filters (no gradient in the last epoch)": lambda df: (
            # both sides sorted: run ids end in a random suffix, so the fork may sort first
            sorted(df[["run_id", "filter_uid"]].values.tolist()) == sorted([r, u] for r in (root, fork) for u in range(3))),
        "Cluster and RGB patterns per layer over time": lambda df: (  # ORDER BY run_id, layer, epoch
            df[["run_id", "epoch"]].values.tolist() == sorted([[root, e] for e in range(4)] + [[fork, e] for e in (2, 3, 4)])),
        "Steering events": lambda df: (
            df[["run_id", "epoch", "batch", "kind", "status"]].values.tolist() == [[root, 2, 3, "freeze", "applied"]]
            and json.loads(df.args.iloc[0]) == {"layer": "conv1"}),
        "Full history of every run (forks include their ancestors)": lambda df: (
            df[["run_id", "epoch", "source_run_id", "val_accuracy"]].values.tolist() == sorted(
                [[root, e, root, 0.5] for e in range(4)]
                + [[fork, 0, root, 0.5], [fork, 1, root, 0.5], [fork, 2, fork, 0.9], [fork, 3, fork, 0.9],
                   [fork, 4, fork, 0.9]])),  # ORDER BY run_id (random suffixes), epoch
    }
    for title, query in EXAMPLE_QUERIES.items():
        df = store.sql(query)
        assert len(df) > 0, title
        if title in expected:
            assert expected[title](df), (title, df.to_string())


def test_a_reader_never_sees_a_half_epoch_while_segments_are_compacted(store):
    """A writer commits epochs and compacts after each; a reader polling SQL and the API in between
    never sees an ``epochs`` row without its layers/filters rows, and never loses an epoch."""
    import threading

    _, root, _ = store.ids
    w = RunWriter(store, root)
    done = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for e in range(4, 16):
                _epoch(w, e)
                w.compact()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            done.set()

    reader = revacnn.open_store(store.root, mode="r")
    t = threading.Thread(target=write)
    t.start()
    reads, last_seen = 0, 0
    while not done.is_set() or reads < 5:
        df = reader.sql(
            f"SELECT e.epoch, (SELECT count(*) FROM layers l WHERE l.run_id = e.run_id AND l.epoch = e.epoch) AS nl,"
            f" (SELECT count(*) FROM filters f WHERE f.run_id = e.run_id AND f.epoch = e.epoch) AS nf "
            f"FROM epochs e WHERE e.run_id = '{root}' ORDER BY e.epoch")
        assert (df.nl == 1).all() and (df.nf == 3).all(), df  # no half epoch
        epochs = df.epoch.tolist()
        assert epochs == list(range(len(epochs))) and len(epochs) >= last_seen, (epochs, last_seen)
        last_seen = len(epochs)
        api = reader.run(root)
        own = api.epochs()
        assert own == list(range(len(own))) and len(own) >= last_seen
        layers = api.table("layers")
        assert set(layers.epoch) >= set(epochs)
        reads += 1
    t.join()
    assert not errors, errors
    assert reader.run(root).epochs() == list(range(16))
    files = sorted(p.name for p in store.layout.table_dir(root, "layers").iterdir())
    assert files == ["compact-g000012.parquet"], files  # old generations and segments removed


def test_corrupt_files_get_one_clear_message_and_the_rest_stays_readable(store, capsys):
    import warnings

    from revacnn.cli import main
    from revacnn.errors import CorruptStoreError, CorruptStoreWarning

    _, root, fork = store.ids
    # a truncated Parquet segment: SQL drops that epoch from every table, with one warning naming it
    seg = store.layout.table_segment(root, "layers", 1)
    seg.write_bytes(seg.read_bytes()[:20])
    with pytest.warns(CorruptStoreWarning, match=r"layers/e00001\.parquet"):
        df = store.sql(f"SELECT epoch FROM layers WHERE run_id = '{root}' ORDER BY epoch")
    assert df.epoch.tolist() == [0, 2, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptStoreWarning)
        assert store.sql(f"SELECT epoch FROM epochs WHERE run_id = '{root}' ORDER BY epoch").epoch.tolist() == [0, 2, 3]
        assert store.sql(f"SELECT count(*) AS n FROM filters WHERE run_id = '{fork}'").n[0] == 9  # other runs whole
    with pytest.raises(CorruptStoreError, match=r"layers/e00001\.parquet"):
        store.run(root).table("layers")
    assert main(["sql", "--store", str(store.root), f"SELECT count(*) AS n FROM epochs WHERE run_id = '{fork}'"]) == 0
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and "e00001.parquet" in err[0], err
    assert "3" in out.out

    # a bad Zarr chunk: that array raises one clear error; the epoch's other arrays and epochs read
    kernel_dir = store.layout.epoch_arrays(root, 2) / "conv1" / "kernel"
    chunk = next(p for p in kernel_dir.rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"\x00garbage\xff" * 3)
    rec = store.run(root).epoch(2)
    with pytest.raises(CorruptStoreError, match="conv1/kernel of run .* epoch 2 is corrupt"):
        rec.layer("conv1").kernel  # noqa: B018
    assert rec.layer("conv1").bias.shape == (3,)
    assert store.run(root).epoch(3).layer("conv1").kernel[0, 0, 0, 0] == 3.0

    # a broken status.json: the API says so; listing reads the run as interrupted, with a warning
    store.layout.status_json(fork).write_text("{oops")
    with pytest.raises(CorruptStoreError, match="status file .* is corrupt"):
        store.run(fork).status  # noqa: B018
    with pytest.warns(CorruptStoreWarning, match="status file"):
        runs = store.runs().set_index("run_id")
    assert runs.status[fork] == "interrupted" and runs.status[root] == "finished"

    # a broken run.json: that run is left out of listings (one warning line), the rest listed
    store.layout.run_json(fork).write_text("nope")
    with pytest.raises(CorruptStoreError, match="run.json"):
        store.run(fork)
    capsys.readouterr()
    assert main(["runs", "--store", str(store.root)]) == 0
    out = capsys.readouterr()
    assert root in out.out and fork not in out.out
    assert any("run.json" in ln for ln in out.err.strip().splitlines()), out.err


def test_liveness_same_host_goes_by_pid_other_hosts_by_heartbeat(store):
    import json
    import os
    import time

    from revacnn.storage.lease import HOST, owner_alive

    _, root, _ = store.ids
    path = store.layout.status_json(root)
    info = json.loads(path.read_text())
    old = time.time() - 3600
    # this very process, an hour without a heartbeat: still running (same host, pid alive)
    path.write_text(json.dumps({**info, "status": "running", "pid": os.getpid(), "host": HOST, "heartbeat_at": old}))
    assert store.run(root).status == "running"
    # the same pid on another boot of this host (a reboot): gone
    path.write_text(json.dumps({**info, "status": "running", "pid": os.getpid(), "host": HOST,
                                "boot_id": "another-boot", "heartbeat_at": time.time()}))
    assert store.run(root).status == "interrupted"
    # another host: the heartbeat decides
    other = {"status": "running", "pid": 1, "host": HOST + "-elsewhere"}
    assert owner_alive({**other, "heartbeat_at": time.time()}, 30.0)
    assert not owner_alive({**other, "heartbeat_at": old}, 30.0)
    path.write_text(json.dumps({**info, **other, "heartbeat_at": old}))
    assert store.run(root).status == "interrupted"


def test_one_writer_per_run(store):
    from revacnn.errors import RunBusyError

    sid, _, _ = store.ids
    w = RunWriter.create(store, session_id=sid, config={}, name="live")
    with pytest.raises(RunBusyError, match="is running: another process") as info:
        RunWriter(store, w.run_id).acquire()
    assert isinstance(info.value, BlockingIOError) and "pid" in str(info.value)
    w.set_status("stopped")  # a terminal status frees the lease
    RunWriter(store, w.run_id).acquire().release()


def test_commands_leave_the_queue_only_after_their_event(store):
    from revacnn.steering import parse
    from revacnn.steering.channel import CommandQueue, requeue_discarded

    sid, _, _ = store.ids
    w = RunWriter.create(store, session_id=sid, config={}, name="steered")
    from revacnn.steering import send

    cmd = send(store, w.run_id, parse("freeze", ["conv1"]))
    q = CommandQueue(store, w.run_id)
    (got, cid, err), = q.pop(1, 0)
    assert got.command_id == cmd.command_id and err is None
    # a crash here (popped, no event): the command is still queued for the next trainer
    q2 = CommandQueue(store, w.run_id)
    assert [c for c, _, _ in q2.pop(1, 0)] == [got]
    # the event written, then a crash before the move: the next trainer moves it without applying it
    w.write_event(event_id=cid, epoch=1, batch=0, kind=got.op, args=got.args, status="applied", message="ok")
    assert CommandQueue(store, w.run_id).pop(1, 0) == []
    assert q.pending() == [] and len(list(q.done.iterdir())) == 1
    # a resume from epoch 0 discards epoch 1: the command goes back, due at the same batch, once
    assert requeue_discarded(store, w.run_id, 0) == [cid]
    assert store.run(w.run_id).events().empty
    assert CommandQueue(store, w.run_id).pop(0, 5) == []  # not due before epoch 1 batch 0
    (again, _, _), = CommandQueue(store, w.run_id).pop(1, 0)
    assert again.command_id == cid and again.apply_at == (1, 0)
    w.set_status("finished")


def test_a_compaction_between_listing_and_reading_never_shows_a_half_epoch(store, monkeypatch):
    """The worst interleaving, made deterministic: SQL has listed a run's files and builds its views
    over them when the writer compacts the run (merges, switches, removes the old segments)."""
    from revacnn.storage import sql as sql_mod

    _, root, _ = store.ids
    w = RunWriter(store, root)
    _epoch(w, 4)
    reader = revacnn.open_store(store.root, mode="r")
    real = sql_mod.SQLEngine.list_files
    fired = []

    def list_files(self, run_ids):
        snap = real(self, run_ids)
        if not fired:
            fired.append(snap)
            w.compact()  # between the listing and the reads: the listed segments are removed
            assert not any(p.exists() for p in snap.files["layers"] if root in str(p))
        return snap

    monkeypatch.setattr(sql_mod.SQLEngine, "list_files", list_files)
    df = reader.sql(
        f"SELECT e.epoch, (SELECT count(*) FROM layers l WHERE l.run_id = e.run_id AND l.epoch = e.epoch) AS nl,"
        f" (SELECT count(*) FROM filters f WHERE f.run_id = e.run_id AND f.epoch = e.epoch) AS nf "
        f"FROM epochs e WHERE e.run_id = '{root}' ORDER BY e.epoch")
    assert fired, "the hook did not run"
    assert df.epoch.tolist() == [0, 1, 2, 3, 4]  # no committed epoch lost
    assert (df.nl == 1).all() and (df.nf == 3).all(), df  # no half epoch


def test_runs_sees_a_status_change_and_a_dead_writer_after_caching_the_status(tmp_path, monkeypatch):
    """`Store.runs` keeps what it read of unchanged status files, yet a rewritten status file is read
    again and a ``running`` status is checked against its writer on every call."""
    import revacnn.storage.store as store_mod

    st = revacnn.open_store(tmp_path / "s", durable=False)
    sid = create_session(st, dataset="toy", model="toy", probe_images=np.zeros((2, 4, 4, 3), np.uint8),
                         probe_labels=np.array([0, 1]), probe_indices=[0, 1], class_names=["a", "b"], config={})
    w = RunWriter.create(st, session_id=sid, config={}, name="r", durable=False)
    status = st.layout.status_json(w.run_id)
    info = json.loads(status.read_text())
    # a writer on another host whose heartbeat is fresh: running
    status.write_text(json.dumps({**info, "status": "running", "host": "elsewhere", "heartbeat_at": time.time()}))
    old = time.time() - 3600
    for p in (status, st.layout.run_json(w.run_id)):
        os.utime(p, (old, old))  # old enough to be cached
    assert st.runs().status.tolist() == ["running"]
    assert st.runs().status.tolist() == ["running"]  # from the cache
    monkeypatch.setattr(store_mod, "HEARTBEAT_TIMEOUT_S", 0.0)  # the heartbeat is now too old
    assert st.runs().status.tolist() == ["interrupted"]
    monkeypatch.undo()
    tmp = status.with_name("status.tmp")  # rewritten atomically, with the old time stamp
    tmp.write_text(json.dumps({**info, "status": "finished", "finished_at": "2026-01-01T00:00:00+00:00"}))
    os.utime(tmp, (old, old))
    os.replace(tmp, status)
    assert st.runs().status.tolist() == ["finished"]
    assert st.runs().finished_at.tolist() == [pd.Timestamp("2026-01-01", tz="UTC")]
