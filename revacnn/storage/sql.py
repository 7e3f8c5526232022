"""Read-only SQL over a store: DuckDB in memory, tables loaded from the Parquet segments."""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Callable, Sequence
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
DEFAULT_MEMORY_LIMIT = "1GB"  # DuckDB's own memory, per store; queries never spill to disk
_CHUNK_VECTORS = 16  # DuckDB vectors (2,048 rows each) fetched per pandas chunk
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

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


def memory_bytes(limit: str) -> int:
    """Bytes of a DuckDB-style memory size such as ``"1GB"`` or ``"512MiB"``.

    Raises:
        SQLError: the text is not such a size.

    Example:
        >>> memory_bytes("64MB")
        64000000
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b)\s*", str(limit).lower())
    if not m or m.group(2) not in _UNITS:
        raise SQLError(f"Received: memory_limit={limit!r} (expected a size such as '1GB' or '512MiB')")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def sandboxed_connection(
    load: Callable[[duckdb.DuckDBPyConnection], None],
    *,
    allowed_paths: Sequence[str | Path] = (),
    memory_limit: str = DEFAULT_MEMORY_LIMIT,
    threads: int = 2,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB database filled by ``load``, then sealed so that queries touch no file.

    What a query can do after sealing:

    - read no file and write none: the local file system is disabled (``disabled_filesystems``),
      external access is off, and no directory is allowed. Not even DuckDB's own temp folder:
      by default DuckDB allows ``<cwd>/.tmp/`` even with external access off, so here
      ``temp_directory`` is empty and ``max_temp_directory_size`` is 0 (nothing spills to disk);
    - use at most ``memory_limit`` of memory (a bigger query fails instead of spilling);
    - install or load no extension (no auto-install or auto-load, no community extensions),
      use no persistent secret, and scan no Python variable;
    - change none of this: ``lock_configuration`` is set last.

    Args:
        load: fills the database (CREATE TABLE ...) before it is sealed; it may read files.
        allowed_paths: files queries may still read (for example Parquet segments read in place).
            Empty (the default): the local file system is disabled altogether.
        memory_limit: DuckDB's memory limit, such as ``"1GB"``.
        threads: DuckDB worker threads.

    Example:
        >>> con = sandboxed_connection(lambda c: c.execute("CREATE TABLE t AS SELECT 1 AS x"))
        >>> con.execute("SELECT x FROM t").fetchall()
        [(1,)]
    """
    con = duckdb.connect(
        ":memory:",
        config={
            "threads": threads,
            "memory_limit": memory_limit,
            "temp_directory": "",
            "max_temp_directory_size": "0B",
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "allow_community_extensions": False,
        },
    )
    load(con)
    if allowed_paths:
        paths = ", ".join("'" + str(p).replace("'", "''") + "'" for p in allowed_paths)
        con.execute(f"SET GLOBAL allowed_paths = [{paths}]")
    else:
        con.execute("SET GLOBAL disabled_filesystems = 'LocalFileSystem'")
    con.execute("SET GLOBAL allowed_directories = []")
    con.execute("SET GLOBAL python_enable_replacements = false")
    con.execute("SET GLOBAL allow_persistent_secrets = false")
    con.execute("SET GLOBAL enable_external_access = false")
    con.execute("SET GLOBAL lock_configuration = true")
    return con


class _Changed(Exception):
    """The files changed generation while they were read: list and read again."""


class SQLEngine:
    """Answers read-only SQL over a store.

    Each query runs on an in-memory DuckDB database holding the store's tables, sealed by
    `sandboxed_connection`: a query cannot read or write any file (DuckDB's temp folder
    included), uses at most ``memory_limit`` of memory and ``timeout_s`` of time, and only
    single SELECT statements are accepted; a result may take at most ``memory_limit`` as a
    DataFrame too. The database is rebuilt when the store's files
    change (new epochs, new runs) and reused otherwise.

    Example:
        >>> SQLEngine(store, memory_limit="256MB").query("SELECT count(*) FROM epochs")
    """

    def __init__(
        self, store: Store, *, memory_limit: str = DEFAULT_MEMORY_LIMIT
    ) -> None:
        self._store = store
        self._memory_limit = memory_limit
        self._max_result_bytes = memory_bytes(memory_limit)
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

            def load(con: duckdb.DuckDBPyConnection) -> None:
                for table, schema in schemas.items():
                    arrow = tables[table]
                    if arrow is not None:
                        con.register("_arrow", arrow)
                        con.execute(f'CREATE TABLE "{table}" AS SELECT * FROM _arrow')
                        con.unregister("_arrow")
                    else:
                        con.execute(ddl(table, schema))
                for name, df in (("sessions", sessions), ("runs", runs), ("probes", probes)):
                    con.register("_df", df)
                    con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM _df')
                    con.unregister("_df")
                # Rows of epochs whose marker is missing were already excluded by file selection.
                con.execute(TIMELINE_SQL)

            try:
                con = sandboxed_connection(load, memory_limit=self._memory_limit)
            except duckdb.OutOfMemoryException:
                raise SQLError(
                    f"The store's tables need more than the SQL memory limit of {self._memory_limit}"
                ) from None
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
            cur.execute(sql)
            parts = [cur.fetch_df_chunk(_CHUNK_VECTORS)]
            size = int(parts[0].memory_usage(deep=True).sum())
            while len(parts[-1]) and size <= self._max_result_bytes:
                parts.append(cur.fetch_df_chunk(_CHUNK_VECTORS))
                size += int(parts[-1].memory_usage(deep=True).sum())
            if size > self._max_result_bytes:
                raise SQLError(
                    f"Query result needs more than the memory limit of {self._memory_limit} "
                    f"(more than {sum(len(c) for c in parts):,} rows so far); aggregate, filter or add a LIMIT"
                )
            parts = [c for c in parts if len(c)] or parts[:1]
            return parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)
        except duckdb.InterruptException:
            raise SQLError(f"Query cancelled after the time limit of {timeout_s:g} s") from None
        except duckdb.OutOfMemoryException:
            raise SQLError(
                f"Query stopped: it needs more than the memory limit of {self._memory_limit} "
                "(aggregate or filter more, or add a LIMIT)"
            ) from None
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
