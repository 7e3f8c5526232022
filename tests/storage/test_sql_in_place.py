"""SQL reads the Parquet files in place: results equal a pyarrow/pandas reference over the same files,
live runs' committed segments are visible at once, compacted runs read their merged files, and the
views push projections and filters down to the Parquet scan."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import revacnn
from revacnn.errors import CorruptStoreWarning, SQLError
from revacnn.storage import RunWriter, create_session
from revacnn.storage._schema import EVENTS_SCHEMA, SEGMENT_TABLES
from revacnn.storage.sql import SQLEngine
from revacnn.storage.store import Run

F = 4  # filters per layer
LAYERS = ("conv1", "conv2")


def _epoch_rows(w: RunWriter, e: int, *, commit: bool = True) -> None:
    """One epoch of ``w``'s run: 2 layers x F filters with values derived from (run, epoch, filter)."""
    rid = w.run_id
    seed = sum(map(ord, rid)) + 97 * e
    n = F * len(LAYERS)
    w.write_rows("filters", e, {
        "run_id": [rid] * n, "epoch": [e] * n, "layer": [la for la in LAYERS for _ in range(F)],
        "filter": [i for _ in LAYERS for i in range(F)], "filter_uid": list(range(n)),
        "grad_l1": [float((seed + i) % 13) / 7 for i in range(n)], "act_mean": [float(i * e) for i in range(n)],
    })
    w.write_rows("layers", e, {"run_id": [rid] * 2, "epoch": [e] * 2, "layer": list(LAYERS), "kind": ["conv"] * 2,
                               "n_filters": [F, F], "grad_l1": [float(e), float(e) + 0.5]})
    if commit:
        w.commit(e, {"loss": 1.0 / (e + 1), "val_accuracy": 0.1 * e})


@pytest.fixture()
def store(tmp_path):
    st = revacnn.open_store(tmp_path / "store", durable=False)
    sid = create_session(st, dataset="toy", model="toy", probe_images=np.zeros((2, 4, 4, 3), np.uint8),
                         probe_labels=np.array([0, 1]), probe_indices=[0, 1], class_names=["a", "b"], config={})
    done = RunWriter.create(st, session_id=sid, config={}, name="done", durable=False)
    for e in range(4):
        _epoch_rows(done, e)
    done.write_event(event_id="c1", epoch=2, batch=0, kind="freeze", args={"layer": "conv1"}, status="applied",
                     message="ok")
    done.compact()
    done.set_status("finished")
    live = RunWriter.create(st, session_id=sid, config={}, name="live", parent_run_id=done.run_id, fork_epoch=2,
                            durable=False)
    for e in range(2, 5):
        _epoch_rows(live, e)
    _epoch_rows(live, 5, commit=False)  # half written: rows on disk, no commit marker yet
    st.writers = (done, live)
    return st


def _reference(st, table: str) -> pd.DataFrame:
    """The committed rows of ``table``, read with pyarrow from the files the store's layout names:
    a compacted run's manifest files plus the segments of epochs after it, and per-epoch segments
    only for epochs whose ``epochs`` segment (the commit marker) exists."""
    schema = EVENTS_SCHEMA if table == "events" else SEGMENT_TABLES[table]
    parts = []
    for rid in sorted(os.listdir(st.root / "runs")):
        tables = st.root / "runs" / rid / "tables"
        if table == "events":
            paths = sorted((tables / "events").glob("*.parquet"))
        else:
            man = json.loads((tables / "manifest.json").read_text()) if (tables / "manifest.json").exists() else None
            upto = man["upto"] if man else -1
            committed = {int(p.stem[1:]) for p in (tables / "epochs").glob("e*.parquet")}
            paths = [tables / table / man["files"][table]] if man and man["files"].get(table) else []
            paths += sorted(p for p in (tables / table).glob("e*.parquet")
                            if int(p.stem[1:]) in committed and int(p.stem[1:]) > upto)
        parts += [pq.read_table(p) for p in paths]
    if not parts:
        return schema.empty_table().to_pandas()
    return pa.concat_tables(parts, promote_options="default").to_pandas()


def _norm(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Sorted by ``keys``; numbers as float64 (NaN for NULL), the rest as objects (None for NULL)."""
    df = df.sort_values(keys).reset_index(drop=True)
    out = {}
    for c in df.columns:
        col = df[c]
        if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
            out[c] = col.astype("float64")
        else:
            out[c] = col.astype(object).where(col.notna(), None)
    return pd.DataFrame(out)


def _same(got: pd.DataFrame, want: pd.DataFrame, keys: list[str]) -> None:
    assert len(got) == len(want) and len(got) > 0
    pd.testing.assert_frame_equal(_norm(got, keys), _norm(want, keys), check_dtype=False, rtol=1e-12)


def _check_against_reference(st) -> None:
    filters = _reference(st, "filters")
    want = filters.groupby(["run_id", "layer"], as_index=False).agg(g=("grad_l1", "mean"), n=("grad_l1", "size"))
    got = st.sql("SELECT run_id, layer, avg(grad_l1) AS g, count(*) AS n FROM filters GROUP BY ALL")
    _same(got, want, ["run_id", "layer"])
    want = filters[filters.epoch >= 3][["run_id", "epoch", "filter_uid", "act_mean"]]
    got = st.sql("SELECT run_id, epoch, filter_uid, act_mean FROM filters WHERE epoch >= 3")
    _same(got, want, ["run_id", "epoch", "filter_uid"])
    for table in ("epochs", "layers", "events"):
        ref = _reference(st, table)
        got = st.sql(f"SELECT * FROM {table}")
        assert list(got.columns) == [f.name for f in (EVENTS_SCHEMA if table == "events" else SEGMENT_TABLES[table])]
        keys = ["run_id", "event_id"] if table == "events" else ["run_id", "epoch"] + (["layer"] if table == "layers" else [])
        _same(got, ref[list(got.columns)], keys)


def test_results_equal_a_pyarrow_reference_live_then_compacted(store):
    done, live = store.writers
    reader = revacnn.open_store(store.root, mode="r")
    _check_against_reference(reader)
    # the live run's committed segments are read one by one; its half-written epoch 5 is not seen
    assert reader.sql(f"SELECT list(DISTINCT epoch ORDER BY epoch) AS e FROM filters WHERE run_id = '{live.run_id}'"
                      ).e[0].tolist() == [2, 3, 4]
    # epoch 5 commits: visible to the next query at once, all its rows together
    live.commit(5, {"loss": 0.1})
    got = reader.sql(f"SELECT epoch, count(*) AS n FROM filters WHERE run_id = '{live.run_id}' GROUP BY epoch ORDER BY epoch")
    assert got.epoch.tolist() == [2, 3, 4, 5] and (got.n == F * len(LAYERS)).all()
    _check_against_reference(reader)
    # the live run compacts, then goes on with segments after the merged files
    live.compact()
    assert sorted(os.listdir(store.layout.table_dir(live.run_id, "filters"))) == ["compact-g000001.parquet"]
    _epoch_rows(live, 6)
    _check_against_reference(reader)
    tl = reader.sql(f"SELECT epoch, source_run_id FROM timeline WHERE run_id = '{live.run_id}' ORDER BY epoch")
    assert tl.epoch.tolist() == list(range(7))
    assert tl.source_run_id.tolist() == [done.run_id] * 2 + [live.run_id] * 5


def test_views_push_projection_and_filters_down_to_the_parquet_scan(store):
    _, live = store.writers
    plan = store._sql.connection().execute(
        f"EXPLAIN SELECT avg(grad_l1) FROM filters WHERE run_id = '{live.run_id}' AND epoch = 3").fetchall()[0][1]
    scan = plan[plan.index("READ_PARQUET"):]
    assert "Projections: grad_l1" in scan and "Filters:" in scan and "epoch = 3" in scan, plan
    assert "act_mean" not in plan  # only the columns the query needs are read


def _age(st, years: float = 1.0) -> None:
    """Date every folder and file of the store back, as if nothing had changed for a while."""
    t = os.path.getmtime(st.root) - years * 3.15e7
    for dirpath, dirnames, filenames in os.walk(st.root):
        for n in dirnames + filenames:
            os.utime(os.path.join(dirpath, n), (t, t))


def test_warm_queries_reuse_the_listing_and_the_views_until_a_file_changes(store, monkeypatch):
    _, live = store.writers
    engine = SQLEngine(store)
    _age(store)
    con = engine.connection()
    listed = []
    real = type(store)._run_files
    monkeypatch.setattr(type(store), "_run_files", lambda self, rid: listed.append(rid) or real(self, rid))
    assert engine.connection() is con and listed == []  # nothing changed: no listing, the same views
    live.commit(5, {"loss": 0.1})  # the epochs folder changes
    con2 = engine.connection()
    assert con2 is not con and listed == [live.run_id]
    assert engine.query(f"SELECT max(epoch) AS m FROM filters WHERE run_id = '{live.run_id}'").m[0] == 5


def test_empty_tables_and_files_missing_a_column_keep_every_column(store, tmp_path):
    empty = revacnn.open_store(tmp_path / "empty")
    for table, schema in {**SEGMENT_TABLES, "events": EVENTS_SCHEMA}.items():
        assert list(empty.sql(f"SELECT * FROM {table}").columns) == [f.name for f in schema]
    assert list(empty.sql("SELECT * FROM timeline").columns)[:4] == ["run_id", "epoch", "source_run_id", "inherited"]
    # a segment written before a column existed (an older writer): the column reads NULL there
    _, live = store.writers
    seg = store.layout.table_segment(live.run_id, "filters", 3)
    pq.write_table(pq.read_table(seg).drop(["act_max", "act_mean"]), seg)
    got = store.sql(f"SELECT epoch, act_mean, act_max FROM filters WHERE run_id = '{live.run_id}' ORDER BY epoch, filter_uid")
    assert got[got.epoch == 3].act_mean.isna().all() and got[got.epoch == 4].act_mean.notna().all()
    assert got.act_max.isna().all()


def test_a_corrupt_merged_file_drops_its_epochs_from_every_table_of_that_run(store):
    done, live = store.writers
    merged = store.layout.table_dir(done.run_id, "filters") / "compact-g000001.parquet"
    merged.write_bytes(merged.read_bytes()[:30])
    with pytest.warns(CorruptStoreWarning, match=r"filters/compact-g000001\.parquet"):
        got = store.sql("SELECT run_id, count(*) AS n FROM epochs GROUP BY run_id")
    assert dict(zip(got.run_id, got.n, strict=True)) == {live.run_id: 3}  # the compacted run's epochs 0-3 are gone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptStoreWarning)
        assert store.sql(f"SELECT count(*) AS n FROM layers WHERE run_id = '{done.run_id}'").n[0] == 0
        assert store.sql(f"SELECT count(*) AS n FROM events WHERE run_id = '{done.run_id}'").n[0] == 1
        assert store.sql(f"SELECT count(*) AS n FROM filters WHERE run_id = '{live.run_id}'").n[0] == 3 * F * 2


def test_a_compaction_of_a_cached_run_is_seen(store):
    """A compaction after the engine cached a run's listing: the next query reads the merged files."""
    _, live = store.writers
    reader = revacnn.open_store(store.root, mode="r")
    assert reader.sql("SELECT count(*) AS n FROM filters").n[0] == 7 * F * 2
    _age(store)
    reader.sql("SELECT 1")  # listing cached, views over the live run's segments
    live.compact()
    assert not store.layout.table_segment(live.run_id, "filters", 2).exists()
    _age(store)  # the folders' times as before: the new manifest file still tells
    assert reader.sql("SELECT count(*) AS n FROM filters").n[0] == 7 * F * 2
    with pytest.raises(SQLError, match="Only SELECT"):
        reader.sql("DROP VIEW filters")


@pytest.mark.parametrize("old", [0, 1], ids=["first-file-old", "later-file-old"])
def test_an_older_segment_lacking_columns_reads_nulls_wherever_it_is_listed(tmp_path, old):
    st = revacnn.open_store(tmp_path / "store", durable=False)
    sid = create_session(st, dataset="toy", model="toy", probe_images=np.zeros((2, 4, 4, 3), np.uint8),
                         probe_labels=np.array([0, 1]), probe_indices=[0, 1], class_names=["a", "b"], config={})
    w = RunWriter.create(st, session_id=sid, config={}, name="r", durable=False)
    for e in range(2):
        _epoch_rows(w, e)
    seg = st.layout.table_segment(w.run_id, "filters", old)
    pq.write_table(pq.read_table(seg).drop(["act_mean"]), seg)
    got = st.sql("SELECT epoch, act_mean, grad_l1 FROM filters ORDER BY epoch, filter_uid")
    want = pd.concat([pq.read_table(st.layout.table_segment(w.run_id, "filters", e)).to_pandas() for e in range(2)])
    assert got.epoch.tolist() == want.epoch.tolist() and got.grad_l1.tolist() == want.grad_l1.tolist()
    assert got[got.epoch == old].act_mean.isna().all()
    assert got[got.epoch != old].act_mean.tolist() == want[want.epoch != old].act_mean.tolist()


def test_a_segment_damaged_after_the_views_were_built_is_found_by_the_query(store):
    """Damage to a file the cached views already read: the query that meets it leaves its epoch out."""
    _, live = store.writers
    q = f"SELECT epoch, count(*) AS n FROM filters WHERE run_id = '{live.run_id}' GROUP BY epoch ORDER BY epoch"
    assert store.sql(q).epoch.tolist() == [2, 3, 4]
    con = store._sql.connection()
    seg = store.layout.table_segment(live.run_id, "filters", 3)
    data = bytearray(seg.read_bytes())
    data[4:-8] = b"\x00" * (len(data) - 12)  # the frame whole (PAR1 ... footer length PAR1), the rest zeroed
    seg.write_bytes(bytes(data))
    with pytest.warns(CorruptStoreWarning, match=r"filters/e00003\.parquet"):
        got = store.sql(q)
    assert got.epoch.tolist() == [2, 4] and store._sql.connection() is not con


def _rewrite_the_old_way(path) -> None:
    """Rewrite a Parquet file as the store wrote every file before: dictionary encoding and zstd everywhere."""
    pq.write_table(pq.read_table(path), path, compression="zstd")


def test_float_columns_are_written_plain_and_files_of_the_old_encoding_still_read_the_same(store):
    """New files: float columns plain (no dictionary) with LZ4, the rest dictionary + zstd. A store
    mixing files of the old encoding (dictionary + zstd for every column) with new ones reads the
    same rows as a pyarrow reference, and compacting old segments rewrites them losslessly."""
    done, live = store.writers
    seg = store.layout.table_segment(live.run_id, "filters", 3)
    meta = pq.ParquetFile(seg).metadata.row_group(0)
    cols = {meta.column(i).path_in_schema: meta.column(i) for i in range(meta.num_columns)}
    assert not cols["grad_l1"].has_dictionary_page and cols["grad_l1"].compression == "LZ4"
    assert cols["layer"].has_dictionary_page and cols["layer"].compression == "ZSTD"
    assert cols["grad_l1"].statistics.has_min_max  # row-group statistics stay (filter push-down)
    before = {p: pq.read_table(p) for p in [seg, store.layout.table_dir(done.run_id, "filters") / "compact-g000001.parquet"]}
    for p in before:
        _rewrite_the_old_way(p)
        assert pq.ParquetFile(p).metadata.row_group(0).column(6).has_dictionary_page  # grad_l1, old encoding
        assert pq.read_table(p).equals(before[p])
    reader = revacnn.open_store(store.root, mode="r")
    _check_against_reference(reader)
    live.compact()  # merges the old-encoding segment with new ones into a new-encoding file
    merged = store.layout.table_dir(live.run_id, "filters") / "compact-g000001.parquet"
    assert not pq.ParquetFile(merged).metadata.row_group(0).column(6).has_dictionary_page
    got = pq.read_table(merged).to_pandas()
    assert got[got.epoch == 3].reset_index(drop=True).equals(before[seg].to_pandas())
    _check_against_reference(reader)


def _status_files(st) -> dict[str, str]:
    """Each run's status as its ``status.json`` says (the reference; a live writer in this process is alive)."""
    return {rid: json.loads((st.root / "runs" / rid / "status.json").read_text())["status"]
            for rid in sorted(os.listdir(st.root / "runs"))}


def test_the_runs_and_sessions_tables_follow_their_files_while_the_views_are_reused(store, monkeypatch):
    """Queries reuse the runs, sessions and probes tables while their files are unchanged, and see at once
    a status written, a trainer that died (same file) and a new session."""
    done, live = store.writers
    reader = revacnn.open_store(store.root, mode="r")
    _age(store)
    q = "SELECT run_id, status FROM runs ORDER BY run_id"
    got = reader.sql(q)
    assert dict(zip(got.run_id, got.status, strict=True)) == _status_files(store) == {
        done.run_id: "finished", live.run_id: "running"}
    con = reader._sql.connection()  # the files now known unchanged (cached by the first query): reused from here
    built = []
    real = type(reader).runs
    monkeypatch.setattr(type(reader), "runs", lambda self: built.append(1) or real(self))
    assert reader.sql(q).status.tolist() == got.status.tolist() and built == []  # nothing changed: reused
    assert reader._sql.connection() is con
    live.set_status("finished")
    _age(store)  # the file's time as old as before: its new inode and size still tell
    got = reader.sql(q)
    assert dict(zip(got.run_id, got.status, strict=True)) == _status_files(store)
    assert got.status.tolist() == ["finished", "finished"] and built
    # a running run whose trainer died, its status file unchanged: interrupted at the next query
    status = store.layout.status_json(live.run_id)
    status.write_text(json.dumps({**json.loads(status.read_text()), "status": "running"}))
    _age(store)
    assert reader.sql(f"SELECT status FROM runs WHERE run_id = '{live.run_id}'").status[0] == "running"
    n = len(built)
    assert reader.sql(f"SELECT status FROM runs WHERE run_id = '{live.run_id}'").status[0] == "running"
    reader.sql("SELECT 1")
    assert len(built) == n + 1  # the tables are now reused: only the trainer's liveness can tell
    monkeypatch.setattr(Run, "_trainer_alive", staticmethod(lambda info: False))
    assert reader.sql(f"SELECT status FROM runs WHERE run_id = '{live.run_id}'").status[0] == "interrupted"
    # a new session (and its probes) appear in the next query
    sid = create_session(store, dataset="toy2", model="toy", probe_images=np.zeros((3, 4, 4, 3), np.uint8),
                         probe_labels=np.array([0, 1, 1]), probe_indices=[5, 6, 7], class_names=["a", "b"], config={})
    got = reader.sql("SELECT session_id, dataset FROM sessions ORDER BY created_at")
    assert sorted(got.session_id) == sorted(os.listdir(store.root / "sessions")) and sid in set(got.session_id)
    probes = reader.sql(f"SELECT probe, val_index FROM probes WHERE session_id = '{sid}' ORDER BY probe")
    assert probes.val_index.tolist() == [5, 6, 7]
