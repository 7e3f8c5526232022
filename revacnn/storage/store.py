"""The store object: open a store by path, list sessions and runs, read epoch records, query SQL."""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from ..errors import (
    CorruptStoreError,
    CorruptStoreWarning,
    EpochNotFoundError,
    LayerNotFoundError,
    RunNotFoundError,
    StoreError,
    StoreNotFoundError,
)
from ._backend import parse_location
from ._layout import FORMAT_NAME, FORMAT_VERSION, MARKER, Layout, atomic_write_json, epoch_tag
from ._schema import EVENTS_SCHEMA, PROBES_COLUMNS, RUNS_COLUMNS, SEGMENT_TABLES, SESSIONS_COLUMNS
from ._tables import (
    committed_epochs,
    event_files,
    read_run_table,
    read_tables,
    run_files,
    table_files,
)
from .lease import HEARTBEAT_TIMEOUT_S, HOST, owner_alive
from .sql import SQLEngine

#: The ``epochs`` columns of `Run.metrics` and of the SQL view ``timeline``.
HISTORY_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "duration_s", "cumulative_time_s",
                   "n_batches", "step", "committed_at")

__all__ = ["HEARTBEAT_TIMEOUT_S", "HOST", "EpochRecord", "LayerRecord", "Run", "Store", "open_store"]


def open_store(
    path: str | os.PathLike[str] | None = None, *, mode: str = "a", durable: bool = True,
    cache: str | os.PathLike[str] | None = None,
) -> Store:
    """Open the store at ``path``: a folder, or an fsspec URL (``s3://bucket/prefix``, ``memory://…``).

    Args:
        path: The store's root folder or URL. Defaults to ``$REVACNN_STORE`` or ``./store``.
        mode: ``"a"`` opens and creates it if missing; ``"r"`` requires it to exist.
        durable: writers fsync each epoch's files before its commit (turn off only in tests).
        cache: for a URL, the local cache folder this process works in (default:
            ``$REVACNN_CACHE`` or ``~/.cache/revacnn``, one folder per URL).

    Returns:
        The `Store`.

    Raises:
        StoreNotFoundError: ``mode="r"`` and there is no store at ``path``.
        StoreURLError: ``path`` is a URL of an unknown protocol, or one whose package is missing.

    Example:
        >>> store = revacnn.open_store("store")
        >>> store.sql("SELECT run_id, status FROM runs")
        >>> shared = revacnn.open_store("s3://team-bucket/revacnn")   # needs s3fs
    """
    if path is None:
        path = os.environ.get("REVACNN_STORE", "store")
    if mode not in ("a", "r"):
        raise ValueError(f"Received: mode={mode!r} (expected 'a' or 'r')")
    return Store(path, create=(mode == "a"), durable=durable, cache=cache)


def _file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
        return st.st_mtime_ns, st.st_size
    except OSError:
        return None


def _names(path: Path) -> tuple[str, ...]:
    try:
        return tuple(sorted(n for n in os.listdir(path) if not n.startswith(".")))
    except OSError:
        return ()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise CorruptStoreError(f"Corrupt store file {path}: {exc}") from None


class Store:
    """A revacnn store: sessions, runs and their epoch records in one folder.

    Arrays live in Zarr (one group per run and epoch), tables in Parquet segments that
    DuckDB queries. Any number of processes may read while a trainer writes.

    Example:
        >>> store = revacnn.open_store("store")
        >>> run = store.run(store.runs().run_id.iloc[-1])
        >>> run.epoch(0).layer("conv1").kernel.shape
        (16, 5, 5, 3)
    """

    def __init__(
        self, root: str | os.PathLike[str], *, create: bool = True, durable: bool = True,
        cache: str | os.PathLike[str] | None = None,
    ) -> None:
        loc = parse_location(root, cache=cache)
        #: the store's URL (``s3://…``), or None for a local folder
        self.url: str | None = loc.url
        #: the folder the store code reads and writes: the store itself, or a URL's local cache
        self.root = loc.cache
        self.durable = durable
        self.layout = Layout(self.root)
        # run id -> (stamps of run.json and status.json, run.json, status.json) as `runs` last read them
        self._run_meta: dict[str, tuple[tuple[int, ...], dict[str, Any], dict[str, Any]]] = {}
        self._mirror = None
        if self.url is not None:
            self._open_remote(create)
        marker = self.layout.marker
        if not marker.exists():
            if not create:
                if self.root.exists() and not any(self.root.iterdir()):
                    raise StoreNotFoundError(f"The store at {self.root} is empty: record a run first")
                raise StoreNotFoundError(
                    f"No revacnn store at {self.root} (pass --store PATH or set REVACNN_STORE)"
                )
            if self.root.exists() and not self.root.is_dir():
                raise StoreError(f"Received: store={str(root)!r}, which is a file (expected a folder)")
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(marker, {"format": FORMAT_NAME, "version": FORMAT_VERSION})
        else:
            meta = _read_json(marker)
            if meta.get("format") != FORMAT_NAME:
                raise StoreError(f"{marker} is not a revacnn store marker")
            if int(meta.get("version", 0)) > FORMAT_VERSION:
                raise StoreError(
                    f"The store at {self.root} has format version {meta.get('version')}; "
                    f"this revacnn reads up to {FORMAT_VERSION}: upgrade revacnn"
                )
        self._sql = SQLEngine(self)

    def __repr__(self) -> str:
        return f"Store({self.url or str(self.root)!r})"

    @property
    def location(self) -> str:
        """What to pass to ``--store`` to open this store again: its URL or its folder."""
        return self.url or str(self.root)

    # ------------------------------------------------------------------ remote stores (URLs)
    def _open_remote(self, create: bool) -> None:
        from ._sync import Mirror

        assert self.url is not None
        try:
            self._mirror = m = Mirror.shared(self.url, self.root)
            exists = m.backend.exists(MARKER)
            if not exists and not create:
                raise StoreNotFoundError(f"No revacnn store at {self.url} (record a run there first)")
            self.root.mkdir(parents=True, exist_ok=True)
            if exists:
                m.pull()
            else:
                atomic_write_json(self.layout.marker, {"format": FORMAT_NAME, "version": FORMAT_VERSION})
                m.put_file(MARKER)
        except StoreError:
            raise
        except Exception as exc:  # credentials, a missing bucket, no network: one line
            raise StoreError(
                f"Cannot open the store {self.url}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                " (check the bucket exists, the credentials, and AWS_ENDPOINT_URL for a custom S3 server)"
            ) from None

    def refresh(self, *, force: bool = True) -> None:
        """For a store at a URL: bring the local cache up to the committed state of the bucket.

        Store reads call it themselves (at most every ``$REVACNN_PULL_INTERVAL_S``, 0.5 s); a
        local folder needs nothing. Never shows a partial epoch.

        Example:
            >>> store = revacnn.open_store("s3://bucket/team", mode="r")
            >>> store.refresh(); store.runs()
        """
        if self._mirror is None:
            return
        from ._sync import pull_interval_s

        try:
            self._mirror.pull(min_interval_s=0.0 if force else pull_interval_s())
        except Exception as exc:  # a reader keeps what it has; the next poll retries
            warnings.warn(f"store {self.url} not refreshed: {type(exc).__name__}: {exc}", stacklevel=2)

    def _auto_refresh(self) -> None:
        if self._mirror is not None:
            self.refresh(force=False)

    def _remote_checkpoints(self, run_id: str) -> set[int]:
        """Epochs of ``run_id`` with a checkpoint object on the object store (empty for a folder)."""
        if self._mirror is None:
            return set()
        from .checkpoints import _epoch_of as ckpt_epoch

        names = self._mirror.backend.list(f"runs/{run_id}/checkpoints/")
        return {e for k in names if (e := ckpt_epoch(k.rsplit("/", 1)[-1])) is not None}

    def checkpoint_epochs_of(self, run_id: str) -> list[int]:
        """The epochs ``run_id`` itself holds a checkpoint for (in the folder, or on the object store).

        Example:
            >>> store.checkpoint_epochs_of(run.run_id)
            [0, 5, 10]
        """
        from .checkpoints import checkpoint_epochs

        return sorted(set(checkpoint_epochs(self.layout, run_id)) | self._remote_checkpoints(run_id))

    def _ensure(self, prefix: str) -> None:
        """Fetch the objects below ``prefix`` (arrays of a committed epoch, a checkpoint) into the cache."""
        if self._mirror is not None:
            self._mirror.ensure(prefix)

    def _publish(self, path: str | os.PathLike[str]) -> None:
        """Put one file of the cache (a steering command) to the store's URL now; no-op for a folder."""
        if self._mirror is not None:
            self._mirror.put_file(Path(path).absolute().relative_to(self.root).as_posix())

    def _pull_prefix(self, prefix: str) -> None:
        """Fetch what is new below ``prefix`` (a run's events, for `steer`); no-op for a folder."""
        if self._mirror is not None:
            self._mirror.pull_prefix(prefix)

    # ------------------------------------------------------------------ sessions and runs
    def session_ids(self) -> list[str]:
        """Ids of every session, oldest first."""
        self._auto_refresh()
        d = self.layout.sessions_dir
        if not d.exists():
            return []
        return sorted(p.name for p in d.iterdir() if (p / "session.json").exists())

    def run_ids(self) -> list[str]:
        """Ids of every run, oldest first."""
        self._auto_refresh()
        d = str(self.layout.runs_dir)
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if os.path.exists(os.path.join(d, n, "run.json")))

    def session_info(self, session_id: str) -> dict[str, Any]:
        """The session's metadata (``session.json``)."""
        try:
            return _read_json(self.layout.session_json(session_id))
        except FileNotFoundError:
            raise RunNotFoundError(f"No session {session_id!r} in {self.root}") from None

    def sessions(self) -> pd.DataFrame:
        """The ``sessions`` table as a DataFrame."""
        rows = []
        for sid in self.session_ids():
            try:
                info = self.session_info(sid)
            except StoreError:
                continue
            rows.append(
                {
                    "session_id": sid,
                    "created_at": pd.Timestamp(info.get("created_at")),
                    "dataset": info.get("dataset"),
                    "model": info.get("model"),
                    "n_probes": int(info.get("n_probes", 0)),
                    "config": json.dumps(info.get("config", {})),
                }
            )
        df = pd.DataFrame(rows, columns=SESSIONS_COLUMNS)
        df["created_at"] = pd.to_datetime(df["created_at"], utc=True)
        df["n_probes"] = df["n_probes"].astype("int64")
        return df

    def runs(self) -> pd.DataFrame:
        """The ``runs`` table as a DataFrame (status reads ``interrupted`` for dead trainers)."""
        rows = []
        for rid in self.run_ids():
            try:
                info, status, status_info = self._run_meta_of(rid)
            except (StoreError, RunNotFoundError) as exc:
                warnings.warn(f"run {rid} left out: {exc}", CorruptStoreWarning, stacklevel=2)
                continue
            rows.append(
                {
                    "run_id": rid,
                    "session_id": info["session_id"],
                    "parent_run_id": info.get("parent_run_id"),
                    "fork_epoch": info.get("fork_epoch"),
                    "name": info.get("name"),
                    "status": status,
                    "created_at": pd.Timestamp(info.get("created_at")),
                    "finished_at": pd.Timestamp(status_info.get("finished_at"))
                    if status_info.get("finished_at")
                    else pd.NaT,
                    "config": json.dumps(info.get("config", {})),
                }
            )
        df = pd.DataFrame(rows, columns=RUNS_COLUMNS)
        df["fork_epoch"] = df["fork_epoch"].astype("Int32")
        for col in ("created_at", "finished_at"):
            df[col] = pd.to_datetime(df[col], utc=True)
        for col in ("parent_run_id", "name"):
            df[col] = df[col].astype("string")
        return df

    def _run_meta_of(self, run_id: str) -> tuple[dict[str, Any], str, dict[str, Any]]:
        """``(run.json, status, status.json)`` of a run; the files are read again only when they changed.

        A file is known unchanged by its ``(mtime, size, inode)`` (both are replaced atomically, so
        each write gets a new inode), and only once it is older than the file system's timestamp
        granularity could hide a second write; a ``running`` status is checked against its writer
        (`Run.status`) on every call.
        """
        key, newest = _stamps(os.path.join(str(self.layout.runs_dir), run_id), ("run.json", "status.json"))
        hit = self._run_meta.get(run_id)
        if hit is not None and hit[0] == key:
            info, raw = hit[1], hit[2]
        else:
            run = self.run(run_id)
            info = run.info
            status, raw = run._status_or_warn()
            if raw and newest < time.time_ns() - 1_000_000_000:
                self._run_meta[run_id] = (key, info, raw)
            else:
                self._run_meta.pop(run_id, None)
            return info, status, raw
        status = raw.get("status", "interrupted")
        if status == "running" and not Run._trainer_alive(raw):
            status = "interrupted"
        return info, status, raw

    def _meta_key(self) -> tuple[object, ...] | None:
        """What `runs`, `sessions` and the probes table read, as file stamps; None when it cannot tell.

        Equal keys mean equal tables: the ``run.json``/``status.json`` of every run are those `runs`
        last read and cached (unchanged ``(mtime, size, inode)``, older than the file system's
        timestamp granularity), each ``running`` run's writer is as alive as before, and every
        ``session.json`` has the same stamp and is that old. None (a run not cached, a file too
        new): build the tables again. This lets SQL skip building three DataFrames per query.

        Example:
            >>> store.runs(); key = store._meta_key()
            >>> key == store._meta_key()
            True
        """
        racy = time.time_ns() - 1_000_000_000
        parts: list[object] = []
        sessions, runs = str(self.layout.sessions_dir), str(self.layout.runs_dir)
        for sid in self.session_ids():
            stamp, newest = _stamps(os.path.join(sessions, sid), ("session.json",))
            if newest >= racy:
                return None
            parts.append((sid, stamp))
        for rid in self.run_ids():
            hit = self._run_meta.get(rid)
            if hit is None:
                return None
            stamp, _ = _stamps(os.path.join(runs, rid), ("run.json", "status.json"))
            if stamp != hit[0]:
                return None
            alive = hit[2].get("status") == "running" and Run._trainer_alive(hit[2])
            parts.append((rid, stamp, alive))
        return tuple(parts)

    def run(self, run_id: str) -> Run:
        """The run ``run_id``.

        Raises:
            RunNotFoundError: there is no such run.
        """
        if not isinstance(run_id, str) or not run_id or "/" in run_id or run_id.startswith("."):
            raise RunNotFoundError(f"Received: run={run_id!r} (expected a run id; see `revacnn runs`)")
        if not self.layout.run_json(run_id).exists() and self._mirror is not None:
            self.refresh()
        if not self.layout.run_json(run_id).exists():
            known = self.run_ids()
            hint = ", ".join(known[-5:]) if known else "none yet"
            raise RunNotFoundError(
                f"No run {run_id!r} in {self.root}. Received: run={run_id!r} (runs: {hint})"
            )
        return Run(self, run_id)

    def probes(self, session_id: str) -> tuple[np.ndarray, np.ndarray]:
        """The session's probe images ``(P, H, W, C)`` as the model sees them (dtype as given) and labels ``(P,)``."""
        if self.layout.session_json(session_id).exists():  # put after its probes: they are whole
            self._ensure(f"sessions/{session_id}/probes.zarr/")
        path = self.layout.probes_zarr(session_id)
        if not path.exists():
            raise RunNotFoundError(f"No session {session_id!r} in {self.root}")
        g = zarr.open_group(str(path), mode="r")
        return np.asarray(g["images"][:]), np.asarray(g["labels"][:])

    def class_names(self, session_id: str) -> list[str]:
        """Class names of the session's dataset."""
        return list(self.session_info(session_id).get("class_names", []))

    def _probe_rows(self) -> pd.DataFrame:
        rows = []
        for sid in self.session_ids():
            try:
                info = self.session_info(sid)
            except StoreError:
                continue
            names = info.get("class_names", [])
            for i, (label, vidx) in enumerate(
                zip(info.get("probe_labels", []), info.get("probe_indices", []), strict=False)
            ):
                rows.append(
                    {
                        "session_id": sid,
                        "probe": i,
                        "label": int(label),
                        "class_name": names[label] if label < len(names) else str(label),
                        "val_index": int(vidx),
                    }
                )
        df = pd.DataFrame(rows, columns=PROBES_COLUMNS)
        for col in ("probe", "label", "val_index"):
            df[col] = df[col].astype("int32")
        return df

    # ------------------------------------------------------------------ SQL
    def sql(self, query: str, *, timeout_s: float | None = 10.0) -> pd.DataFrame:
        """Run one read-only SELECT over the store's tables.

        Tables: sessions, runs, epochs, layers, filters, events, probes, predictions, and the
        view timeline. Queries cannot read or write files.

        Raises:
            SQLError: the query is not a single SELECT, touches files, fails or times out.

        Example:
            >>> store.sql("SELECT epoch, val_accuracy FROM epochs WHERE run_id = 'run-…'")
        """
        self._auto_refresh()
        return self._sql.query(query, timeout_s=timeout_s)

    # ------------------------------------------------------------------ internals used by SQL
    def _committed(self, run_id: str) -> list[int]:
        return committed_epochs(self.layout, run_id)

    def _run_files(self, run_id: str):  # noqa: ANN202 - RunFiles
        return run_files(self.layout, run_id)

    def _table_files(self, run_id: str, table: str, committed: set[int]) -> list[Path]:
        return table_files(self.layout, run_id, table, committed)

    def _event_files(self, run_id: str) -> list[Path]:
        return event_files(self.layout, run_id)

    def history_rows(self) -> pd.DataFrame:
        """Every run's lineage (`Run.history`): rows ``(run_id, epoch, source_run_id)``.

        Example:
            >>> store.history_rows().query("run_id == @fork_id")
        """
        rows = []
        for rid in self.run_ids():
            try:
                hist = self.run(rid).history()
            except (StoreError, RunNotFoundError):
                continue
            rows.extend((rid, int(e), src) for e, src in hist)
        df = pd.DataFrame(rows, columns=["run_id", "epoch", "source_run_id"])
        df["epoch"] = df["epoch"].astype("int32")
        return df

    # ------------------------------------------------------------------ change stamps (for pollers)
    # Everything above `revacnn.storage` polls the store through these, never with os.stat/listdir.
    def stamp(self) -> tuple[Any, ...]:
        """A cheap fingerprint of the whole store: run folders, committed epochs, status, events.

        It changes when a run appears, an epoch commits, an event is written or a status changes.

        Example:
            >>> before = store.stamp()
            >>> store.stamp() == before   # nothing happened in between
            True
        """
        self._auto_refresh()
        runs_dir = self.layout.runs_dir
        out: list[Any] = []
        try:
            entries = sorted(os.scandir(runs_dir), key=lambda d: d.name)
        except OSError:
            return ("no-runs",)
        for d in entries:
            if not d.is_dir():
                continue
            row: list[Any] = [d.name]
            for sub in ("tables/epochs", "tables/events", "status.json"):
                p = os.path.join(d.path, sub)
                try:
                    st = os.stat(p)
                    row.append((st.st_mtime_ns, st.st_size))
                    if sub != "status.json":
                        row.append(len(os.listdir(p)))
                except OSError:
                    row.append(None)
            out.append(tuple(row))
        try:
            out.append(("sessions", os.stat(self.layout.sessions_dir).st_mtime_ns))
        except OSError:
            pass
        return tuple(out)

    def present(self) -> bool:
        """Whether the store is still there (its marker file exists)."""
        self._auto_refresh()
        return self.layout.marker.exists()

    def runs_stamp(self) -> tuple[Any, ...]:
        """A fingerprint of the run list and every run's status file (cheaper than `stamp`)."""
        self._auto_refresh()
        names = _names(self.layout.runs_dir)
        return names, tuple(_file_stamp(self.layout.status_json(n)) for n in names)

    def run_stamp(self, run_id: str) -> dict[str, Any]:
        """Fingerprints of one run's parts: ``status``, ``snapshot`` (live), ``events``, ``epochs``.

        ``status`` and ``snapshot`` are ``(mtime_ns, size)`` or None; ``events`` and ``epochs`` the
        sorted names of the committed event and epoch segments (the epochs' commit markers).

        Example:
            >>> store.run_stamp(run_id)["epochs"]
            ('e00000.parquet', 'e00001.parquet')
        """
        self._auto_refresh()
        lay = self.layout
        return {
            "status": _file_stamp(lay.status_json(run_id)),
            "snapshot": _file_stamp(lay.live_dir(run_id) / "snapshot.npz"),
            "events": tuple(n for n in _names(lay.events_dir(run_id)) if n.endswith(".parquet")),
            "epochs": tuple(n for n in _names(lay.table_dir(run_id, "epochs")) if n.endswith(".parquet")),
        }

    def read_events(self, run_id: str, names: Any = None) -> pd.DataFrame:
        """The run's own events (only the segment files ``names`` when given), unsorted.

        Example:
            >>> new = store.read_events(run_id, names=["0001-cmd-ab.parquet"])
        """
        if names is None:
            files = event_files(self.layout, run_id)
        else:  # vanished files are skipped by read_tables
            files = [self.layout.events_dir(run_id) / n for n in sorted(names)]
        return read_tables(files, EVENTS_SCHEMA).to_pandas()

    def epoch_arrays(self, run_id: str, epoch: int) -> str | None:
        """Where the Zarr group of one epoch record lives (for async readers), or None if missing."""
        if int(epoch) in set(self._committed(run_id)):
            self._ensure(f"runs/{run_id}/arrays.zarr/{epoch_tag(epoch)}/")
        path = self.layout.epoch_arrays(run_id, epoch)
        return str(path) if path.exists() else None


class Run:
    """One training trajectory in a store: its metadata, status and epoch records."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.store = store
        self.run_id = run_id
        self.info = _read_json(store.layout.run_json(run_id))
        self.session_id: str = self.info["session_id"]
        self.parent_run_id: str | None = self.info.get("parent_run_id")
        self.fork_epoch: int | None = self.info.get("fork_epoch")
        self.name: str | None = self.info.get("name")
        self.config: dict[str, Any] = self.info.get("config", {})

    def __repr__(self) -> str:
        return f"Run({self.run_id!r}, name={self.name!r}, status={self.status!r})"

    @property
    def status_info(self) -> dict[str, Any]:
        """The raw ``status.json`` (status, pid, host, boot_id, heartbeat_at, finished_at, message).

        A missing file reads as ``{"status": "interrupted"}``.

        Raises:
            CorruptStoreError: the file exists but is not a JSON object.
        """
        path = self.store.layout.status_json(self.run_id)
        for attempt in range(3):  # a writer on a full disk rewrites it in place: read again
            try:
                info = _read_json(path)
                if not isinstance(info, dict):
                    raise CorruptStoreError(f"Corrupt store file {path}: not a JSON object")
                return info
            except FileNotFoundError:
                return {"status": "interrupted"}
            except CorruptStoreError:
                if attempt == 2:
                    raise CorruptStoreError(
                        f"The status file {path} of run {self.run_id} is corrupt. Its epochs are "
                        f"intact: delete the file (the run then reads `interrupted`) and "
                        f"`revacnn resume {self.run_id}`"
                    ) from None
                time.sleep(0.01)
        raise AssertionError("unreachable")  # pragma: no cover

    @property
    def status(self) -> str:
        """``running``, ``finished``, ``stopped``, ``interrupted`` or ``failed``, checked now.

        A ``running`` run is `interrupted` once its writer is gone: on the writer's host, when its
        pid is (however long since the last heartbeat); from another host, when its heartbeat is
        older than `HEARTBEAT_TIMEOUT_S`.
        """
        info = self.status_info
        status = info.get("status", "interrupted")
        if status == "running" and not self._trainer_alive(info):
            return "interrupted"
        return status

    def _status_or_warn(self) -> tuple[str, dict[str, Any]]:
        """(status, status_info); a corrupt status file warns and reads as interrupted."""
        try:
            info = self.status_info
        except CorruptStoreError as exc:
            warnings.warn(str(exc), CorruptStoreWarning, stacklevel=3)
            return "interrupted", {}
        status = info.get("status", "interrupted")
        if status == "running" and not self._trainer_alive(info):
            status = "interrupted"
        return status, info

    @staticmethod
    def _trainer_alive(info: dict[str, Any]) -> bool:
        return owner_alive(info, HEARTBEAT_TIMEOUT_S)

    @property
    def session(self) -> dict[str, Any]:
        """The session's metadata."""
        return self.store.session_info(self.session_id)

    @property
    def parent(self) -> Run | None:
        """The run this one was forked from, or None for a root run."""
        return self.store.run(self.parent_run_id) if self.parent_run_id else None

    def epochs(self) -> list[int]:
        """This run's own committed epochs, ascending (a fork's start at its fork epoch)."""
        return committed_epochs(self.store.layout, self.run_id)

    def history(self) -> list[tuple[int, str]]:
        """The run's lineage: ``(epoch, source_run_id)`` of its full history, oldest first.

        A root run's history is its own committed epochs. A fork's is its parent's history before
        the fork epoch, then its own epochs (from the fork epoch on). This is the one definition
        of lineage: the SQL view ``timeline`` is built from it, and so are `metrics`, the apps
        (`revacnn.ui.data.RunBundle.timeline`) and `revacnn.storage.compare.compare_runs`.

        Example:
            >>> store.run(fork_id).history()[:3]
            [(0, 'run-…-root'), (1, 'run-…-root'), (2, 'run-…-fork')]
        """
        out = [(e, self.run_id) for e in self.epochs()]
        if self.parent_run_id is not None and self.fork_epoch is not None:
            upto = int(self.fork_epoch)
            inherited = [(e, r) for e, r in self.parent.history() if e < upto]
            out = inherited + out
        return out

    def timeline(self) -> list[tuple[int, str]]:
        """Alias of `history` (the name of the SQL view built from it)."""
        return self.history()

    def last_epoch(self) -> int | None:
        """The last committed epoch of the run's full history, or None."""
        tl = self.timeline()
        return tl[-1][0] if tl else None

    def epoch(self, epoch: int) -> EpochRecord:
        """The record of ``epoch`` (an ancestor's for a fork's epochs before its fork point).

        Raises:
            EpochNotFoundError: the epoch is not committed (yet) in this run's history.
        """
        for e, source in self.timeline():
            if e == epoch:
                return EpochRecord(self.store, source, e)
        tl = self.timeline()
        span = f"{tl[0][0]}..{tl[-1][0]}" if tl else "none committed yet"
        raise EpochNotFoundError(
            f"Run {self.run_id} has no committed epoch {epoch}. Received: epoch={epoch} "
            f"(epochs: {span})"
        )

    def metrics(self) -> pd.DataFrame:
        """Per-epoch metrics of the full history: the ``epochs`` rows of `history`, in its order.

        The columns are the SQL view ``timeline``'s (run_id, epoch, source_run_id, inherited,
        then the metrics); read from the Parquet segments directly, without the SQL engine.

        Example:
            >>> store.run(fork_id).metrics()[["epoch", "source_run_id", "val_accuracy"]]
        """
        hist = self.history()
        cols = ["run_id", "epoch", "source_run_id", "inherited", *HISTORY_METRICS]
        parts = []
        for source in dict.fromkeys(s for _, s in hist):
            want = {e for e, s in hist if s == source}
            df = self.store.run(source).table("epochs") if source != self.run_id else self.table("epochs")
            parts.append(df[df["epoch"].isin(want)].assign(source_run_id=source))
        parts = [p for p in parts if len(p)]
        if not parts:
            return pd.DataFrame({c: pd.Series(dtype="object") for c in cols})
        df = pd.concat(parts, ignore_index=True).sort_values("epoch", kind="stable").reset_index(drop=True)
        df["run_id"] = self.run_id
        df["inherited"] = df["source_run_id"] != self.run_id
        for c in cols:
            if c not in df:
                df[c] = np.nan
        return df[cols]

    def events(self) -> pd.DataFrame:
        """This run's steering events, oldest first."""
        t = read_tables(event_files(self.store.layout, self.run_id), EVENTS_SCHEMA)
        return t.to_pandas().sort_values("at", kind="stable").reset_index(drop=True)

    def table(self, table: str) -> pd.DataFrame:
        """This run's own committed rows of a segment table (epochs, layers, filters, predictions)."""
        if table not in SEGMENT_TABLES:
            raise KeyError(f"Received: table={table!r} (expected one of {', '.join(SEGMENT_TABLES)})")
        return read_run_table(self.store.layout, self.run_id, table).to_pandas()

    def checkpoint_path(self, epoch: int) -> Path:
        """Path of the checkpoint of ``epoch`` (resolved to the ancestor that recorded it).

        The compact ``.ckpt`` file, else an old store's ``.npz``; with retention
        (``checkpoint_every`` > 1) the path may not exist: see `checkpoint_epochs`.
        """
        from .checkpoints import checkpoint_file, compact_path

        rec = self.epoch(epoch)
        self.store._ensure(f"runs/{rec.run_id}/checkpoints/{epoch_tag(epoch)}")
        self.store._ensure(f"runs/{rec.run_id}/arrays.zarr/{epoch_tag(epoch)}/")
        return checkpoint_file(self.store.layout, rec.run_id, epoch) or compact_path(
            self.store.layout, rec.run_id, epoch
        )

    def checkpoint_epochs(self) -> list[int]:
        """The epochs of this run's full history that have an exact checkpoint, ascending.

        Example:
            >>> run.checkpoint_epochs()
            [0, 5, 10]
        """

        own = {}
        for e, source in self.history():
            own.setdefault(source, set()).add(e)
        out = []
        for source, epochs in own.items():
            out += [e for e in self.store.checkpoint_epochs_of(source) if e in epochs]
        return sorted(out)

    def read_checkpoint(self, epoch: int) -> Any:
        """The decoded checkpoint of ``epoch`` (`revacnn.storage.checkpoints.CheckpointData`).

        Kernels the checkpoint shares with the epoch record are read from the record.

        Raises:
            EpochNotFoundError: no such committed epoch. StoreError: it has no checkpoint.
        """
        from .checkpoints import read_checkpoint_file

        rec = self.epoch(epoch)

        def record(layer: str, key: str) -> np.ndarray:
            return getattr(rec.layer(layer), key) if key in ("kernel", "bias") else rec.layer(layer).array(key)

        return read_checkpoint_file(self.checkpoint_path(epoch), record)

    # fork / steer / load_model cross layers (trainer, steering): `revacnn._facade` installs them.


def _array(key: str) -> cached_property:
    """A lazily read, cached array attribute of a `LayerRecord`."""
    return cached_property(lambda self: self._get(key))


@dataclass
class LayerRecord:
    """One conv (or dense) layer of an epoch record; arrays are read lazily from Zarr.

    Attributes:
        kernel: ``(F, kh, kw, c_in)`` filter-major (dense: ``(units, in)``).
        bias: ``(F,)``.
        activations: ``(P, F, H, W)`` post-activation outputs for the probes (conv only).
        grad_l1: ``(F,)`` gradient L1 summed over the epoch's batches.
        embedding: ``(F, 2)`` t-SNE position of each filter (NaN where it failed).
        filter_uids: ``(F,)`` stable filter identities.
    """

    group: Any
    name: str
    epoch: int
    run_id: str

    def _get(self, key: str) -> np.ndarray:
        try:
            arr = self.group[key]
        except KeyError:
            raise KeyError(
                f"Layer {self.name} of run {self.run_id} epoch {self.epoch} has no array {key!r}"
            ) from None
        try:
            return np.asarray(arr[:])
        except Exception as exc:  # a garbled chunk: numcodecs/blosc raise assorted errors
            raise CorruptStoreError(
                f"The array {self.name}/{key} of run {self.run_id} epoch {self.epoch} is corrupt "
                f"({type(exc).__name__}: {exc}); the other arrays and epochs stay readable"
            ) from None

    def has(self, key: str) -> bool:
        return key in self.group

    def array(self, key: str) -> np.ndarray:
        """Any array of the layer's record by name (e.g. a separable conv's ``depthwise_kernel``)."""
        return self._get(key)

    @cached_property
    def kind(self) -> str:
        return str(self.group.attrs.get("kind", "conv"))

    kernel = _array("kernel")
    bias = _array("bias")
    activations = _array("activations")
    grad_l1 = _array("grad_l1")
    weight_change_l1 = _array("weight_change_l1")
    act_mean = _array("act_mean")
    embedding = _array("embedding")
    layer_embedding = _array("layer_embedding")
    filter_uids = _array("filter_uids")

    @cached_property
    def frozen(self) -> np.ndarray:
        """``(F,)`` bool: which filters were frozen (all True when the layer is frozen)."""
        return self._get("frozen").astype(bool)

    @property
    def n_filters(self) -> int:
        return int(self.group["filter_uids"].shape[0])


class EpochRecord:
    """The full recorded state of one run after one epoch (epoch 0: initialisation)."""

    def __init__(self, store: Store, run_id: str, epoch: int) -> None:
        self.store = store
        self.run_id = run_id
        self.epoch = epoch
        store._ensure(f"runs/{run_id}/arrays.zarr/{epoch_tag(epoch)}/")
        path = store.layout.epoch_arrays(run_id, epoch)
        try:
            self._group = zarr.open_group(str(path), mode="r")
            self.layer_names: list[str] = list(self._group.attrs["layers"])
        except (FileNotFoundError, KeyError, ValueError, OSError) as exc:
            raise CorruptStoreError(
                f"The arrays of run {run_id} epoch {epoch} are missing or corrupt ({path}): {exc}"
            ) from None

    def __repr__(self) -> str:
        return f"EpochRecord(run_id={self.run_id!r}, epoch={self.epoch})"

    @property
    def conv_layers(self) -> list[str]:
        """Names of the conv layers, in model order."""
        return [n for n in self.layer_names if self._group[n].attrs.get("kind") == "conv"]

    def layer(self, name: str) -> LayerRecord:
        """The record of layer ``name``.

        Raises:
            LayerNotFoundError: the epoch has no such layer.
        """
        if name not in self.layer_names:
            raise LayerNotFoundError(
                f"Received: layer={name!r} (layers are {', '.join(self.layer_names)})"
            )
        return LayerRecord(self._group[name], name, self.epoch, self.run_id)

    def __iter__(self) -> Iterator[LayerRecord]:
        return (self.layer(n) for n in self.layer_names)

    @cached_property
    def probabilities(self) -> np.ndarray:
        """``(P, classes)`` predicted class probabilities of the probes."""
        return np.asarray(self._group["predictions"][:])

    @cached_property
    def metrics(self) -> dict[str, Any]:
        """The epoch's metrics (loss, accuracy, val_loss, val_accuracy, lr, duration_s …)."""
        return dict(self._group.attrs.get("metrics", {}))


def _stamps(folder: str, names: tuple[str, ...]) -> tuple[tuple[int, ...], int]:
    """``(mtime_ns, size, inode)`` of each file ``names`` in ``folder`` (zeros when missing), and the newest mtime."""
    stamp: list[int] = []
    newest = 0
    for name in names:
        try:
            st = os.stat(os.path.join(folder, name))
            stamp += (st.st_mtime_ns, st.st_size, st.st_ino)
            newest = max(newest, st.st_mtime_ns)
        except OSError:
            stamp += (0, 0, 0)
    return tuple(stamp), newest
