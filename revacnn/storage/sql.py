"""Read-only SQL over a store: DuckDB in memory, tables loaded from the Parquet segments."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import CorruptStoreError, CorruptStoreWarning, SQLError, StoreError
from ._schema import EVENTS_SCHEMA, SEGMENT_TABLES, ddl
from ._tables import _conform, _corrupt_message, generation

if TYPE_CHECKING:
    from .store import Store

DEFAULT_TIMEOUT_S = 10.0

TABLES = ("sessions", "runs", "epochs", "layers", "filters", "events", "probes", "predictions")

TIMELINE_SQL = """
CREATE VIEW timeline AS
WITH RECURSIVE chain(run_id, source_run_id, upto, depth) AS (
    SELECT run_id, run_id, 2147483647, 0 FROM runs
    UNION ALL
    SELECT c.run_id, r.parent_run_id, LEAST(c.upto, r.fork_epoch), c.depth + 1
    FROM chain c JOIN runs r ON r.run_id = c.source_run_id
    WHERE r.parent_run_id IS NOT NULL AND c.depth < 1000
)
SELECT c.run_id, e.epoch, c.source_run_id, c.source_run_id <> c.run_id AS inherited,
       e.loss, e.accuracy, e.val_loss, e.val_accuracy, e.lr, e.duration_s,
       e.cumulative_time_s, e.n_batches, e.step, e.committed_at
FROM chain c JOIN epochs e ON e.run_id = c.source_run_id AND e.epoch < c.upto
"""

EXAMPLE_QUERIES: dict[str, str] = {
    "Runs and their best validation accuracy": (
        "SELECT r.run_id, r.name, r.status, r.parent_run_id, r.fork_epoch,\n"
        "       max(e.epoch) AS epochs, max(e.val_accuracy) AS best_val_acc\n"
        "FROM runs r LEFT JOIN epochs e USING (run_id)\n"
        "GROUP BY r.run_id, r.name, r.status, r.parent_run_id, r.fork_epoch, r.created_at\n"
        "ORDER BY r.created_at"
    ),
    "Dead filters (no gradient in the last epoch)": (
        "SELECT run_id, layer, filter_uid, grad_l1, act_mean FROM filters\n"
        "WHERE epoch = (SELECT max(epoch) FROM filters f2 WHERE f2.run_id = filters.run_id)\n"
        "ORDER BY grad_l1 LIMIT 20"
    ),
    "Cluster and RGB patterns per layer over time": (
        "SELECT run_id, epoch, layer, cluster_score, rgb_mono_fraction FROM layers\n"
        "ORDER BY run_id, layer, epoch"
    ),
    "Steering events": "SELECT run_id, epoch, batch, kind, args, status, message FROM events ORDER BY \"at\"",
    "Full history of every run (forks include their ancestors)": (
        "SELECT run_id, epoch, source_run_id, val_accuracy, cumulative_time_s\n"
        "FROM timeline ORDER BY run_id, epoch"
    ),
}


def check_select(sql: str) -> str:
    """Return ``sql`` if it is exactly one SELECT statement, else raise `SQLError`."""
    if not isinstance(sql, str) or not sql.strip():
        raise SQLError("Empty query. Received: sql='' (expected one SELECT statement)")
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise SQLError(f"SQL syntax error: {_first_line(exc)}") from None
    if len(statements) != 1:
        raise SQLError(
            f"Only one statement per query. Received {len(statements)} statements (expected one SELECT)"
        )
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise SQLError(
            f"Only SELECT queries are allowed (the store is read-only). Received: {kind.name} statement"
        )
    return sql


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _FileCache:
    """Arrow tables of Parquet files, re-read only when a file's size or mtime changes."""

    def __init__(self) -> None:
        self._cache: dict[Path, tuple[tuple[int, int], pa.Table]] = {}
        self._lock = threading.Lock()

    def read(self, path: Path, schema: pa.Schema) -> pa.Table | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        key = (st.st_mtime_ns, st.st_size)
        with self._lock:
            hit = self._cache.get(path)
        if hit and hit[0] == key:
            return hit[1]
        try:
            t = _conform(pq.read_table(path), schema)
        except FileNotFoundError:
            return None
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise CorruptStoreError(_corrupt_message(path, exc)) from None
        with self._lock:
            self._cache[path] = (key, t)
        return t


class _Changed(Exception):
    """The files changed generation while they were read: list and read again."""


class SQLEngine:
    """Answers read-only SQL over a store.

    Each query runs on an in-memory DuckDB database holding the store's tables, with
    ``enable_external_access=false`` and ``lock_configuration=true``: a query cannot read or
    write files, and only SELECT statements are accepted. The database is rebuilt when the
    store's files change (new epochs, new runs) and reused otherwise.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._files = _FileCache()
        self._lock = threading.Lock()
        self._con: duckdb.DuckDBPyConnection | None = None
        self._fingerprint: object = None

    def _gather(self) -> tuple[dict[str, list[Path]], pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        store = self._store
        runs = store.runs()
        sessions = store.sessions()
        probes = store._probe_rows()
        files: dict[str, list[Path]] = {t: [] for t in SEGMENT_TABLES}
        files["events"] = []
        self._views = {}
        for run_id in runs["run_id"]:
            try:
                rf = store._run_files(run_id)  # one compaction generation of the run, never a mix
            except StoreError as exc:
                warnings.warn(f"the tables of run {run_id} are left out: {exc}", CorruptStoreWarning,
                              stacklevel=4)
                continue
            self._views[run_id] = rf
            for t in SEGMENT_TABLES:
                files[t].extend(rf.files[t])
            files["events"].extend(store._event_files(run_id))
        return files, sessions, runs, probes

    def _read_all(self, files: dict[str, list[Path]], schemas: dict[str, pa.Schema]) -> dict[str, pa.Table | None]:
        """Every table's rows; a corrupt file drops its epochs (warned); a vanished one restarts."""
        bad: dict[str, set[int]] = {}
        parts: dict[str, list[pa.Table]] = {}
        for table, schema in schemas.items():
            parts[table] = []
            for p in files[table]:
                try:
                    t = self._files.read(p, schema)
                except CorruptStoreError as exc:
                    run_id = p.parent.parent.parent.name
                    warnings.warn(str(exc), CorruptStoreWarning, stacklevel=5)
                    view = self._views.get(run_id)
                    if table != "events":
                        bad.setdefault(run_id, set()).update(view.epochs_of(p) if view else ())
                    continue
                if t is None:  # removed meanwhile: a compaction switched generation, or a resume
                    raise _Changed
                parts[table].append(t)
        for run_id, view in self._views.items():
            if generation(self._store.layout, run_id) != view.generation:
                raise _Changed
        out: dict[str, pa.Table | None] = {}
        for table, ps in parts.items():
            t = pa.concat_tables(ps) if ps else None
            if t is not None and bad and table != "events":
                keep = None
                for run_id, epochs in bad.items():
                    drop = pc.and_(pc.equal(t["run_id"], run_id), pc.is_in(t["epoch"], pa.array(sorted(epochs), pa.int32())))
                    keep = pc.invert(drop) if keep is None else pc.and_(keep, pc.invert(drop))
                t = t.filter(keep)
            out[table] = t
        return out

    def connection(self) -> duckdb.DuckDBPyConnection:
        """A locked-down connection over the store's current contents (rebuilt when it changed).

        Each run's tables come from one compaction generation; when a compaction switches
        generation while the files are read, they are listed and read again.
        """
        for _ in range(50):
            try:
                return self._connection()
            except _Changed:
                continue
        raise SQLError("The store kept changing while the query's tables were read; try again")

    def _connection(self) -> duckdb.DuckDBPyConnection:
        files, sessions, runs, probes = self._gather()
        stamp = []
        for t, paths in files.items():
            for p in paths:
                try:
                    st = p.stat()
                    stamp.append((t, str(p), st.st_mtime_ns, st.st_size))
                except FileNotFoundError:
                    stamp.append((t, str(p), 0, 0))
        fingerprint = (
            tuple(stamp),
            pd.util.hash_pandas_object(runs.astype(str), index=False).sum(),
            len(sessions),
            len(probes),
        )
        with self._lock:
            if self._con is not None and fingerprint == self._fingerprint:
                return self._con
            schemas = dict(SEGMENT_TABLES)
            schemas["events"] = EVENTS_SCHEMA
            tables = self._read_all(files, schemas)
            con = duckdb.connect(":memory:", config={"threads": 2})
            for table, schema in schemas.items():
                arrow = tables[table]  # read by DuckDB's replacement scan
                if arrow is not None:
                    con.execute(f'CREATE TABLE "{table}" AS SELECT * FROM arrow')
                else:
                    con.execute(ddl(table, schema))
            for name, df in (("sessions", sessions), ("runs", runs), ("probes", probes)):
                con.register("_df", df)
                con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM _df')
                con.unregister("_df")
            # Rows of epochs whose marker is missing were already excluded by file selection.
            con.execute(TIMELINE_SQL)
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            # The old connection is not closed here: another thread may still be reading from a
            # cursor of it; it is freed when the last reference goes.
            self._con, self._fingerprint = con, fingerprint
        return con

    def query(self, sql: str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> pd.DataFrame:
        """Run one read-only SELECT and return its rows; refused or failed queries raise `SQLError`."""
        check_select(sql)
        cur = self.connection().cursor()
        timer = None
        if timeout_s:
            timer = threading.Timer(timeout_s, cur.interrupt)
            timer.daemon = True
            timer.start()
        try:
            return cur.execute(sql).df()
        except duckdb.InterruptException:
            raise SQLError(f"Query cancelled after the time limit of {timeout_s:g} s") from None
        except duckdb.PermissionException:
            raise SQLError(
                "Queries cannot read or write files; query the store's tables "
                f"({', '.join(TABLES)}, timeline) instead"
            ) from None
        except duckdb.Error as exc:
            raise SQLError(f"SQL error: {_first_line(exc)}") from None
        finally:
            if timer is not None:
                timer.cancel()
            cur.close()
