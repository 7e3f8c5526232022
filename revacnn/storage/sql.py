"""Read-only SQL over a store: a sandboxed DuckDB whose tables are views over the Parquet files in place."""

from __future__ import annotations

import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import CorruptStoreWarning, SQLError, StoreError
from ._schema import _DUCK, EVENTS_SCHEMA, SEGMENT_TABLES, ddl
from ._tables import RunFiles, _corrupt_message, segment_epoch

if TYPE_CHECKING:
    from .store import Store

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_LIMIT = "1GB"  # DuckDB's own memory, per store; queries never spill to disk
_CHUNK_VECTORS = 16  # DuckDB vectors (2,048 rows each) fetched per pandas chunk
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

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

    With ``allowed_paths``, DuckDB's Parquet footer cache is on (each file's footer parsed once).

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
    try:  # it would print into the CLI's output (CSV, JSON)
        con.execute("SET enable_progress_bar = false")
    except duckdb.Error:  # in Jupyter without ipywidgets DuckDB refuses to touch the setting at all
        pass
    load(con)
    if allowed_paths:
        paths = ", ".join("'" + str(p).replace("'", "''") + "'" for p in allowed_paths)
        con.execute(f"SET GLOBAL allowed_paths = [{paths}]")
        # Parquet footers are parsed once per file (DuckDB parses a file's again when its mtime changed).
        con.execute("SET GLOBAL parquet_metadata_cache = true")
    else:
        con.execute("SET GLOBAL disabled_filesystems = 'LocalFileSystem'")
    con.execute("SET GLOBAL allowed_directories = []")
    con.execute("SET GLOBAL python_enable_replacements = false")
    con.execute("SET GLOBAL allow_persistent_secrets = false")
    con.execute("SET GLOBAL enable_external_access = false")
    con.execute("SET GLOBAL lock_configuration = true")
    return con


class _Retry(Exception):
    """The store's files changed under a query (a compaction, a resume) or one turned out corrupt: list again."""


#: A folder modified less than this before it was stamped is listed again on the next query: a second
#: change within the file system's timestamp granularity would not change its stamp.
_RACY_NS = 1_000_000_000
_RETRIES = 50


@dataclass(frozen=True)
class Snapshot:
    """The files SQL reads, listed once: per table (``events`` included) the committed Parquet files.

    Attributes:
        files: per table, the files of every run, in run order.
        runs: each run's `RunFiles` (one compaction generation), for excluding a corrupt file's epochs.
        owner: each file's ``(run_id, table)``.

    Example:
        >>> snap = store._sql.list_files(store.run_ids())
        >>> len(snap.files["filters"]), sorted(snap.runs)[:1]
        (12, ['run-…'])
    """

    files: dict[str, list[Path]]
    runs: dict[str, RunFiles]
    owner: dict[Path, tuple[str, str]]

    def key(self) -> tuple[tuple[str, ...], ...]:
        """What the DuckDB views depend on: the file names, per table."""
        return tuple(tuple(map(str, self.files[t])) for t in _SCHEMAS)


_SCHEMAS: dict[str, pa.Schema] = {**SEGMENT_TABLES, "events": EVENTS_SCHEMA}


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _scan(paths: Sequence[Path], union: bool) -> str:
    """``read_parquet`` over exactly ``paths``.

    Without ``union`` the columns are the first file's (every file the writer writes has them
    all) and DuckDB opens each file only when it scans it; with ``union`` (files written before a
    column existed) columns are matched by name and a file lacking one gives NULLs, but every
    file's footer is read whenever a query is planned.
    """
    names = ", ".join(_sql_str(str(p)) for p in paths)
    opts = "union_by_name = true, " if union else ""
    return f"read_parquet([{names}], {opts}hive_partitioning = false)"


def default_threads() -> int:
    """DuckDB worker threads for SQL: the machine's cores, at most 8.

    Example:
        >>> 1 <= default_threads() <= 8
        True
    """
    return max(1, min(8, os.cpu_count() or 2))


class SQLEngine:
    """Answers read-only SQL over a store, reading the Parquet files where they lie.

    The segment tables (epochs, layers, filters, predictions, diagnoses) and ``events`` are DuckDB
    views over ``read_parquet`` of exactly the files that hold committed rows (`run_files`: one
    compaction generation per run, per-epoch segments of a live run only once their epoch is
    committed), so DuckDB reads only the columns and row groups a query needs (projection and
    predicate push-down) and a live run's new epochs are visible at once. ``sessions``, ``runs``,
    ``probes`` and the lineage behind the ``timeline`` view are small in-memory tables.

    The connection is sealed by `sandboxed_connection`: queries may read those Parquet files and no
    other file (``allowed_paths``), write none, use at most ``memory_limit`` of memory and
    ``timeout_s`` of time, and only single SELECT statements are accepted; a result may take at
    most ``memory_limit`` as a DataFrame too. The connection and its views are reused while the set
    of files (checked with a few ``stat`` calls per run), the runs and the sessions are unchanged;
    the runs, sessions and probes tables are read again only when their files' stamps (or a running
    trainer's liveness) changed (`Store._meta_key`).

    A file that vanishes under a query (a compaction switched generation, a resume discarded an
    epoch) makes the query start over on a fresh listing; a corrupt file is left out with a
    `CorruptStoreWarning`, together with its epochs' rows in every table of that run.

    Example:
        >>> SQLEngine(store, memory_limit="256MB").query("SELECT count(*) FROM epochs")
    """

    def __init__(
        self, store: Store, *, memory_limit: str = DEFAULT_MEMORY_LIMIT, threads: int | None = None
    ) -> None:
        self._store = store
        self._memory_limit = memory_limit
        self._max_result_bytes = memory_bytes(memory_limit)
        self._threads = threads or default_threads()
        self._lock = threading.Lock()
        self._con: duckdb.DuckDBPyConnection | None = None
        self._fingerprint: object = None
        self._frames: tuple[pd.DataFrame, ...] = ()  # the runs, sessions and probes tables of the connection
        self._meta: object = None  # `Store._meta_key` of the files behind ``_frames``
        self._paths: dict[str, tuple[Path, str]] = {}  # the files the views read: name -> (path, table)
        self._union: set[str] = set()  # tables whose files do not all have every column
        self._listed: dict[str, tuple[tuple[int, ...], RunFiles, tuple[Path, ...]]] = {}
        self._stamp_paths: dict[str, list[str]] = {}
        # the last `list_files` answer and the runs' listings it was made of (the same objects: the same files)
        self._last_snapshot: tuple[tuple[tuple[str, RunFiles, tuple[Path, ...]], ...], Snapshot] | None = None
        self._bad: dict[Path, tuple[tuple[int, int], str]] = {}  # corrupt files: (mtime, size), message
        self._checked: dict[Path, tuple[int, int]] = {}  # files whose Parquet frame looked whole

    # ------------------------------------------------------------------ listing (the one place)
    def list_files(self, run_ids: Sequence[str]) -> Snapshot:
        """The committed Parquet files of ``run_ids``: the one place SQL lists the store's files.

        Each run's files come from one compaction generation (`run_files`) and are listed again
        only when one of the run's table folders (or its manifest) changed; a run whose files
        cannot be listed is left out with a `CorruptStoreWarning`.

        Example:
            >>> engine.list_files(store.run_ids()).files["filters"][:1]
            [PosixPath('store/runs/run-…/tables/filters/compact-g000001.parquet')]
        """
        listings: list[tuple[str, RunFiles, tuple[Path, ...]]] = []
        for run_id in run_ids:
            try:
                listings.append((run_id, *self._run_listing(run_id)))
            except StoreError as exc:
                warnings.warn(f"the tables of run {run_id} are left out: {exc}", CorruptStoreWarning, stacklevel=4)
        last = self._last_snapshot
        if last is not None and len(last[0]) == len(listings) and all(  # the very listings of the last answer
                a[0] == b[0] and a[1] is b[1] and a[2] is b[2] for a, b in zip(last[0], listings, strict=True)):
            return last[1]
        files: dict[str, list[Path]] = {t: [] for t in _SCHEMAS}
        runs: dict[str, RunFiles] = {}
        owner: dict[Path, tuple[str, str]] = {}
        for run_id, rf, events in listings:
            runs[run_id] = rf
            for t in SEGMENT_TABLES:
                files[t].extend(rf.files[t])
                owner.update((p, (run_id, t)) for p in rf.files[t])
            files["events"].extend(events)
            owner.update((p, (run_id, "events")) for p in events)
        snap = Snapshot(files, runs, owner)
        self._last_snapshot = (tuple(listings), snap)
        return snap

    def _stamp(self, run_id: str) -> tuple[int, ...]:
        paths = self._stamp_paths.get(run_id)
        if paths is None:
            lay = self._store.layout
            tables = lay.run_dir(run_id) / "tables"
            paths = [str(p) for p in (tables, lay.manifest(run_id), lay.events_dir(run_id),
                                      *(lay.table_dir(run_id, t) for t in SEGMENT_TABLES))]
            self._stamp_paths[run_id] = paths
        out: list[int] = []
        for p in paths:
            try:
                st = os.stat(p)
                out += (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                out += (0, 0, 0)
        return tuple(out)

    def _run_listing(self, run_id: str) -> tuple[RunFiles, tuple[Path, ...]]:
        now = time.time_ns()
        stamp = self._stamp(run_id)
        hit = self._listed.get(run_id)
        if hit is not None and hit[0] == stamp:
            return hit[1], hit[2]
        rf = self._store._run_files(run_id)
        events = tuple(self._store._event_files(run_id))
        if max(stamp[::3]) < now - _RACY_NS:
            self._listed[run_id] = (stamp, rf, events)
        else:
            self._listed.pop(run_id, None)
        return rf, events

    # ------------------------------------------------------------------ corrupt and vanished files
    def _usable(self, snap: Snapshot) -> tuple[dict[str, list[Path]], dict[str, set[int]]]:
        """The files to read, without corrupt ones and their epochs' segments; the epochs left out per run.

        A file not seen before (or changed) is checked first: a truncated one (its ``PAR1`` frame
        broken) is corrupt. Damage inside a whole frame shows when a query reads it (`_file_trouble`).
        """
        for p in snap.owner:
            stamp = _stat(p)
            if stamp is None or self._checked.get(p) == stamp:
                continue
            if p in self._bad:
                if self._bad[p][0] == stamp:
                    continue
                del self._bad[p]  # rewritten (restored from a backup?): check it again
            problem = _frame_problem(p, stamp[1])
            if problem:
                self._bad[p] = (stamp, _corrupt_message(p, ValueError(problem)))
            else:
                self._checked[p] = stamp
        for p in [p for p in self._checked if p not in snap.owner]:
            del self._checked[p]
        bad_files: list[Path] = []
        for p in list(self._bad):
            if p in snap.owner and _stat(p) == self._bad[p][0]:
                bad_files.append(p)
            elif p not in snap.owner:
                del self._bad[p]  # gone (a compaction, a restore): forget it
        if not bad_files:
            return snap.files, {}
        epochs: dict[str, set[int]] = {}
        for p in bad_files:
            run_id, table = snap.owner[p]
            warnings.warn(self._bad[p][1], CorruptStoreWarning, stacklevel=6)
            if table != "events":
                epochs.setdefault(run_id, set()).update(snap.runs[run_id].epochs_of(p))
        drop = set(bad_files)
        files = {}
        for t, paths in snap.files.items():
            keep = []
            for p in paths:
                run_id, _ = snap.owner[p]
                e = segment_epoch(p)
                if p in drop or (t != "events" and e is not None and e in epochs.get(run_id, ())):
                    continue
                keep.append(p)
            files[t] = keep
        return files, epochs

    def _file_trouble(self, exc: BaseException) -> bool:
        """Whether ``exc`` is about one of the files read (vanished: list again; corrupt: leave it out).

        DuckDB names the file in most errors; when it does not (a garbled page), the files changed
        since they were checked are the suspects.
        """
        text = str(exc)
        path, table = next((v for name, v in self._paths.items() if name in text), (None, ""))
        if path is None:
            suspects = [p for p, _ in self._paths.values() if _stat(p) != self._checked.get(p)]
            return any([self._check_file(p) for p in suspects])
        if "union_by_name" in text and table not in self._union:  # a file lacks one of the columns
            self._union.add(table)
            return True
        return self._check_file(path)

    def _check_file(self, path: Path) -> bool:
        """True when ``path`` vanished (the listing is dropped) or is corrupt (it is left out from now on)."""
        stamp = _stat(path)
        if stamp is None:  # removed meanwhile: a compaction switched generation, or a resume
            self._listed.clear()
            return True
        try:
            pq.read_table(path)
        except FileNotFoundError:
            self._listed.clear()
            return True
        except (pa.ArrowException, OSError, ValueError) as err:
            self._bad[path] = (stamp, _corrupt_message(path, err))
            return True
        self._checked[path] = stamp
        return False  # pyarrow reads it: a DuckDB error, not the file's

    # ------------------------------------------------------------------ the connection
    def connection(self) -> duckdb.DuckDBPyConnection:
        """A locked-down connection over the store's current files (rebuilt when they changed).

        Each run's tables come from one compaction generation; when a compaction switches
        generation while the views are built, the files are listed again.
        """
        for _ in range(_RETRIES):
            try:
                return self._connection()
            except _Retry:
                continue
        raise SQLError("The store kept changing while the query's tables were listed; try again")

    def _connection(self) -> duckdb.DuckDBPyConnection:
        store = self._store
        meta = store._meta_key()  # before the tables are read: a change after it shows next time
        with self._lock:
            known, frames = self._meta, self._frames
        same_meta = meta is not None and meta == known
        if same_meta:  # the runs, sessions and probes files are those of the connection's tables
            runs, sessions, probes = frames
        else:
            runs, sessions, probes = store.runs(), store.sessions(), store._probe_rows()
        snap = self.list_files(list(runs["run_id"]))
        key = snap.key()

        def fingerprint() -> tuple[object, ...]:  # the files, and what was learnt about them
            return key, tuple(sorted((str(p), v[0]) for p, v in self._bad.items())), tuple(sorted(self._union))

        with self._lock:
            if (self._con is not None and fingerprint() == self._fingerprint
                    and all(a is b or a.equals(b) for a, b in zip((runs, sessions, probes), self._frames,
                                                                  strict=True))):
                self._meta = meta
                return self._con
            files, bad_epochs = self._usable(snap)
            history = store.history_rows()
            where = _excluding(bad_epochs)
            paths = [p for ps in files.values() for p in ps]
            self._paths = {str(p): (p, t) for t, ps in files.items() for p in ps}

            def load(con: duckdb.DuckDBPyConnection) -> None:
                for table, schema in _SCHEMAS.items():
                    if not files[table]:
                        con.execute(ddl(table, schema))
                        continue
                    union = table in self._union
                    scan = _scan(files[table], union)
                    have = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {scan}").fetchall()}
                    if not union and not set(schema.names) <= have:  # the first file lacks a column
                        self._union.add(table)
                        scan = _scan(files[table], True)
                        have = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {scan}").fetchall()}
                    cols = ", ".join(
                        f'CAST({_col(f.name) if f.name in have else "NULL"} AS {_DUCK[f.type]}) AS {_col(f.name)}'
                        for f in schema
                    )
                    cond = where if table != "events" else ""
                    con.execute(f'CREATE VIEW "{table}" AS SELECT {cols} FROM {scan}{cond}')
                con.register("_hist", history)
                con.execute("CREATE TABLE _history AS SELECT * FROM _hist")
                con.unregister("_hist")
                for name, df in (("sessions", sessions), ("runs", runs), ("probes", probes)):
                    con.register("_df", df)
                    con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM _df')
                    con.unregister("_df")
                con.execute(TIMELINE_SQL)

            try:
                con = sandboxed_connection(load, allowed_paths=paths, memory_limit=self._memory_limit,
                                           threads=self._threads)
            except duckdb.Error as exc:
                if self._file_trouble(exc):
                    raise _Retry from None
                raise SQLError(f"Cannot read the store's tables: {_first_line(exc)}") from None
            # The old connection is not closed here: another thread may still be reading from a
            # cursor of it; it is freed when the last reference goes.
            self._con, self._fingerprint, self._frames = con, fingerprint(), (runs, sessions, probes)
            self._meta = meta
        return con

    def query(self, sql: str, *, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> pd.DataFrame:
        """Run one read-only SELECT and return its rows; refused or failed queries raise `SQLError`."""
        check_select(sql)
        for _ in range(_RETRIES):
            try:
                return self._query(self.connection(), sql, timeout_s)
            except _Retry:
                with self._lock:
                    self._con = None
        raise SQLError("The store kept changing while the query ran; try again")

    def _query(self, con: duckdb.DuckDBPyConnection, sql: str, timeout_s: float | None) -> pd.DataFrame:
        cur = con.cursor()
        timer = None
        if timeout_s:
            timer = threading.Timer(timeout_s, cur.interrupt)
            timer.daemon = True
            timer.start()
        try:
            cur.execute(sql)
            parts = [cur.fetch_df_chunk(_CHUNK_VECTORS)]
            size = _frame_bytes(parts[0])
            while len(parts[-1]) and size <= self._max_result_bytes:
                parts.append(cur.fetch_df_chunk(_CHUNK_VECTORS))
                size += _frame_bytes(parts[-1])
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
        except duckdb.PermissionException as exc:
            if self._file_trouble(exc):  # a listed file vanished: DuckDB then tries it as a folder
                raise _Retry from None
            raise SQLError(
                "Queries cannot read or write files; query the store's tables "
                f"({', '.join(TABLES)}, timeline) instead"
            ) from None
        except duckdb.Error as exc:
            if self._file_trouble(exc):
                raise _Retry from None
            raise SQLError(f"SQL error: {_first_line(exc)}") from None
        finally:
            if timer is not None:
                timer.cancel()
            cur.close()


def _frame_bytes(df: pd.DataFrame) -> int:
    """Bytes of ``df``'s columns, strings included (`DataFrame.memory_usage` without its Series of results)."""
    return sum(int(df.iloc[:, i].memory_usage(index=False, deep=True)) for i in range(df.shape[1]))


def _col(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _frame_problem(path: Path, size: int) -> str:
    """Why ``path`` is not a whole Parquet file (``PAR1`` at both ends, a footer that fits), or ``""``."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
            if size < 12:
                return f"{size} bytes, too small for a Parquet file"
            fh.seek(size - 8)
            tail = fh.read(8)
    except FileNotFoundError:
        return ""  # vanished: the listing is redone when a query misses it
    except OSError as exc:
        return str(exc)
    if head != b"PAR1" or tail[4:] != b"PAR1":
        return "no Parquet magic bytes: the file is truncated or not Parquet"
    if int.from_bytes(tail[:4], "little") > size - 12:
        return "the footer is longer than the file: truncated"
    return ""


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _excluding(epochs: dict[str, set[int]]) -> str:
    """A WHERE clause leaving out the rows of ``epochs`` (per run), or ``""``."""
    conds = [f"(run_id = {_sql_str(r)} AND epoch IN ({', '.join(str(int(e)) for e in sorted(es))}))"
             for r, es in sorted(epochs.items()) if es]
    return f" WHERE NOT coalesce({' OR '.join(conds)}, false)" if conds else ""
