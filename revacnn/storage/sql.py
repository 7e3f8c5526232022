"""Read-only SQL over a store: DuckDB in memory, tables loaded from the Parquet segments."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import SQLError
from ._schema import EVENTS_SCHEMA, SEGMENT_TABLES, ddl
from ._tables import _conform

if TYPE_CHECKING:
    from .store import Store

DEFAULT_TIMEOUT_S = 10.0

TABLES = ("sessions", "runs", "epochs", "layers", "filters", "events", "probes", "predictions")

#: The ``timeline`` view: the epochs rows of every run's lineage, `Run.history` (the one definition
#: of lineage; its rows are the hidden table ``_history``, built with each connection).
TIMELINE_SQL = """
CREATE VIEW timeline AS
SELECT h.run_id, e.epoch, h.source_run_id, h.source_run_id <> h.run_id AS inherited,
       e.loss, e.accuracy, e.val_loss, e.val_accuracy, e.lr, e.duration_s,
       e.cumulative_time_s, e.n_batches, e.step, e.committed_at
FROM _history h JOIN epochs e ON e.run_id = h.source_run_id AND e.epoch = h.epoch
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
        with self._lock:
            self._cache[path] = (key, t)
        return t


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
        for run_id in runs["run_id"]:
            committed = set(store._committed(run_id))
            for t in SEGMENT_TABLES:
                files[t].extend(store._table_files(run_id, t, committed))
            files["events"].extend(store._event_files(run_id))
        return files, sessions, runs, probes

    def connection(self) -> duckdb.DuckDBPyConnection:
        """A locked-down connection over the store's current contents (rebuilt when it changed)."""
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
            con = duckdb.connect(":memory:", config={"threads": 2})
            schemas = dict(SEGMENT_TABLES)
            schemas["events"] = EVENTS_SCHEMA
            for table, schema in schemas.items():
                parts = [t for t in (self._files.read(p, schema) for p in files[table]) if t is not None]
                if parts:
                    arrow = pa.concat_tables(parts)  # noqa: F841 - read by DuckDB's replacement scan
                    con.execute(f'CREATE TABLE "{table}" AS SELECT * FROM arrow')
                else:
                    con.execute(ddl(table, schema))
            history = self._store.history_rows()  # noqa: F841 - read by DuckDB's replacement scan
            con.execute("CREATE TABLE _history AS SELECT * FROM history")
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
