"""Writing side of the store: create sessions and runs, commit epoch records, events, status."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from .._faults import kill_point, write_point
from ._durable import SyncSet, fsync_dir, tree_paths
from ._layout import atomic_write_json, new_id, tmp_path_for, utcnow
from ._schema import EVENTS_SCHEMA, SEGMENT_TABLES
from ._tables import (
    COMPACT_PREFIX,
    RunFiles,
    compact_name,
    event_files,
    read_tables,
    run_files,
    segment_epoch,
    to_table,
    write_parquet,
    write_parquet_atomic,
)
from .lease import RunLease, owner_info
from .store import Store

log = logging.getLogger("revacnn.storage")

#: Blosc settings of the epoch arrays by dtype (all lossless; measured in ``benchmarks/bench_store.py``):
#: float16 (the probes' activations) with zstd level 5 and byte shuffle (bit shuffle is larger),
#: everything else (float32 kernels, ints) with zstd level 3 and bit shuffle (2.5 % smaller than
#: byte shuffle, and faster). Level 5, not 7: on resnet20's 16 probes (6.4 MB of float16 per
#: epoch) level 7 took 0.63 s of the worker's CPU per epoch for 0.618 of the raw size, level 5
#: 0.13 s for 0.630, level 3 0.054 s for 0.668 (one epoch's arrays re-encoded, 2-core machine).
_BLOSC_FLOAT16 = {"cname": "zstd", "clevel": 5, "shuffle": "shuffle"}
_BLOSC_DEFAULT = {"cname": "zstd", "clevel": 3, "shuffle": "bitshuffle"}


def _blosc_conf(dtype: np.dtype) -> dict[str, Any]:
    return _BLOSC_FLOAT16 if np.dtype(dtype) == np.float16 else _BLOSC_DEFAULT


def array_codec(dtype: Any) -> BloscCodec:
    """The compressor of an epoch array of ``dtype``, as zarr's codec (what `_ZarrTree` writes itself).

    Example:
        >>> array_codec(np.float16).clevel
        5
    """
    return BloscCodec(**_blosc_conf(np.dtype(dtype)))


_FLOAT_CODEC = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")  # the session's probe images
_INT_CODEC = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def create_session(
    store: Store,
    *,
    dataset: str,
    model: str,
    probe_images: np.ndarray,
    probe_labels: np.ndarray,
    probe_indices: Sequence[int],
    class_names: Sequence[str],
    config: Mapping[str, Any],
) -> str:
    """Create a session (dataset, probes, initial architecture) and return its id."""
    sid = new_id("session")
    layout = store.layout
    g = zarr.open_group(str(layout.probes_zarr(sid)), mode="w")
    images = np.asarray(probe_images)  # as the model sees them: any numeric dtype
    g.create_array("images", data=images, compressors=_FLOAT_CODEC if images.dtype.kind == "f" else _INT_CODEC)
    g.create_array("labels", data=np.asarray(probe_labels, dtype=np.int64))
    atomic_write_json(
        layout.session_json(sid),
        {
            "session_id": sid,
            "created_at": utcnow().isoformat(),
            "dataset": dataset,
            "model": model,
            "n_probes": int(len(probe_labels)),
            "probe_labels": [int(v) for v in probe_labels],
            "probe_indices": [int(v) for v in probe_indices],
            "class_names": list(class_names),
            "config": dict(config),
        },
    )
    if getattr(store, "_mirror", None) is not None:  # a store at a URL: put the session (marker last)
        store._mirror.push(f"sessions/{sid}")
    return sid


#: Axis names of the arrays an epoch record holds, so ``xarray.open_zarr`` labels them.
_DIMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("conv", "kernel"): ("filter", "ky", "kx", "channel"),
    ("conv", "depthwise_kernel"): ("channel", "ky", "kx", "multiplier"),
    ("conv", "activations"): ("probe", "filter", "y", "x"),
    ("conv", "embedding"): ("filter", "xy"),
    ("conv", "layer_embedding"): ("filter", "xy"),
    ("dense", "kernel"): ("unit", "input"),
    ("extra", "predictions"): ("probe", "class"),
}


def dimension_names(key: str, ndim: int, kind: str) -> tuple[str, ...] | None:
    """The axis names of array ``key`` of a layer of ``kind`` (``conv``, ``dense`` or ``extra``).

    Per-filter vectors (bias, grad_l1, uids …) are ``("filter",)`` (``("unit",)`` for dense).

    Example:
        >>> dimension_names("activations", 4, "conv")
        ('probe', 'filter', 'y', 'x')
    """
    names = _DIMS.get((kind, key))
    if names is None and ndim == 1 and kind in ("conv", "dense"):
        names = ("filter",) if kind == "conv" else ("unit",)
    if names is None or len(names) != ndim:
        return None
    return names


class RunWriter:
    """Writes one run: its metadata, status and heartbeat, epoch records, checkpoints and events.

    An epoch is committed by writing its ``epochs`` row last: readers only see epochs whose row
    exists, so a crash at any point leaves the previous epochs intact and the current one invisible.
    With ``durable`` (the store's default), every file of the epoch and the folders listing them are
    fsynced before the row's file is renamed into place, so the marker never outlives its data.

    A writer holding the run's lease (`create` takes it, `acquire` for a resume) is the run's only
    writer until it releases it or ends; see `revacnn.storage.lease`.
    """

    def __init__(self, store: Store, run_id: str, *, durable: bool | None = None) -> None:
        self.store = store
        self.run_id = run_id
        self.layout = store.layout
        self.durable = bool(getattr(store, "durable", True) if durable is None else durable)
        self.lease = RunLease(self.layout.lease(run_id), run_id)
        self._sync = SyncSet()
        self._event_seq = 0
        self._last_beat = 0.0
        self._mirror = getattr(store, "_mirror", None)
        self._run_sync: Any = None

    # ------------------------------------------------------------------ a store at a URL
    def _push(self) -> None:
        """Put the run's new files to the store's URL in commit order (no-op for a folder).

        A failed push is logged, not raised: the epoch is committed in the cache, and the next push
        (the background sync, the next commit) puts it.
        """
        if self._mirror is None:
            return
        try:
            self._mirror.push(f"runs/{self.run_id}")
        except Exception as exc:
            log.warning("run %s not pushed to %s yet: %s", self.run_id, self._mirror.url, exc)

    def _start_sync(self) -> None:
        if self._mirror is not None and self._run_sync is None:
            from ._sync import RunSync

            self._run_sync = RunSync(self._mirror, self.run_id).start()

    def _stop_sync(self) -> None:
        sync, self._run_sync = self._run_sync, None
        if sync is not None:
            sync.stop()

    @classmethod
    def create(
        cls,
        store: Store,
        *,
        session_id: str,
        config: Mapping[str, Any],
        name: str | None = None,
        parent_run_id: str | None = None,
        fork_epoch: int | None = None,
        durable: bool | None = None,
    ) -> RunWriter:
        """Create a new run in ``session_id``, take its lease and return its writer."""
        rid = new_id("run")
        w = cls(store, rid, durable=durable)
        w.lease.acquire()
        atomic_write_json(
            store.layout.run_json(rid),
            {
                "run_id": rid,
                "session_id": session_id,
                "parent_run_id": parent_run_id,
                "fork_epoch": fork_epoch,
                "name": name or rid,
                "created_at": utcnow().isoformat(),
                "config": dict(config),
            },
            durable=w.durable,
        )
        w.set_status("running")
        w._start_sync()
        return w

    # ------------------------------------------------------------------ lease
    def acquire(self) -> RunWriter:
        """Take the run's lease (before resuming it).

        Raises:
            RunBusyError: another live process writes the run; the message names it.
        """
        try:
            status = json.loads(self.layout.status_json(self.run_id).read_text())
        except (OSError, ValueError):
            status = None
        self.lease.acquire(status if isinstance(status, dict) else None)
        self._start_sync()
        return self

    def release(self) -> None:
        """Give up the run's lease (done by a terminal `set_status`)."""
        self._stop_sync()
        self.lease.release()

    # ------------------------------------------------------------------ status
    def set_status(self, status: str, message: str | None = None) -> None:
        """Write the run's status; terminal statuses also record ``finished_at`` and free the lease."""
        info: dict[str, Any] = {
            "status": status,
            **owner_info(),
            "heartbeat_at": time.time(),
            "message": message,
        }
        if status != "running":
            info["finished_at"] = utcnow().isoformat()
        self._write_status(info, durable=self.durable and status != "running")
        self._status = info
        if status != "running":
            self._stop_sync()
        self._push()
        if status != "running":
            self.release()

    def _write_status(self, info: dict[str, Any], *, durable: bool = False) -> None:
        path = self.layout.status_json(self.run_id)
        try:
            atomic_write_json(path, info, durable=durable)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or not path.exists():
                raise
            # A full disk: no room for a new file, but the old one's block can be rewritten in place.
            data = json.dumps(info, indent=1, sort_keys=True, default=str).encode()
            with open(path, "r+b") as fh:
                fh.write(data)
                fh.truncate()

    def heartbeat(self, *, every_s: float = 2.0, **extra: Any) -> None:
        """Refresh the heartbeat (at most every ``every_s`` seconds) so readers know we are alive.

        On the writer's own host, readers go by its pid; the heartbeat matters across hosts.
        """
        now = time.time()
        if now - self._last_beat < every_s:
            return
        self._last_beat = now
        info = dict(getattr(self, "_status", {"status": "running"}))
        info.update(extra, heartbeat_at=now, **owner_info())
        try:
            self._write_status(info)
        except OSError as exc:  # a heartbeat that cannot be written must not stop training
            log.warning("heartbeat of %s not written: %s", self.run_id, exc)
        self._status = info

    # ------------------------------------------------------------------ epochs
    def write_arrays(
        self, epoch: int, layers: Mapping[str, Mapping[str, np.ndarray]], attrs: Mapping[str, Any],
        extra: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Write an epoch's arrays: one Zarr group per layer, plus top-level arrays in ``extra``.

        Each array is one chunk (the whole array, Blosc/zstd), as ``zarr.create_array(data=a,
        chunks=a.shape)`` lays it out; the files are written directly (`_ZarrTree`), a few hundred
        small arrays per epoch in one pass instead of one Zarr call (an event-loop round trip and
        its metadata writes) per array. Readers open them with plain ``zarr``.
        """
        path = self.layout.epoch_arrays(self.run_id, epoch)
        write_point(path)
        if path.exists():  # left over by a crash or an uncommitted attempt: replace it
            shutil.rmtree(path)
        tree = _ZarrTree(path, {"layers": list(layers), **dict(attrs)})
        for lname, arrays in layers.items():
            layer_attrs = dict(arrays.get("_attrs", {}))
            kind = layer_attrs.get("kind", "conv")
            g = tree.group(lname, layer_attrs)
            for key, value in arrays.items():
                if key != "_attrs":
                    a = np.ascontiguousarray(value)  # (a 0-d value becomes 1-d, as it always was)
                    tree.array(g, key, a, dimension_names(key, a.ndim, kind))
        for key, value in (extra or {}).items():
            a = np.ascontiguousarray(value)
            tree.array(tree.root, key, a, dimension_names(key, a.ndim, "extra"))
        if self.durable:
            for f in tree.files:
                self._sync.add_file(f)
            self._sync.add_dirs(tree.dirs)
            self._sync.add_dirs([self.layout.arrays_dir(self.run_id), self.layout.run_dir(self.run_id)])

    def write_rows(self, table: str, epoch: int, rows: Any) -> None:
        """Write one epoch's rows of a segment table (not yet visible: see `commit`)."""
        path = self.layout.table_segment(self.run_id, table, epoch)
        write_point(path)
        write_parquet_atomic(to_table(rows, SEGMENT_TABLES[table]), path)
        if self.durable:  # synced with the rest of the epoch, before its marker
            self._sync.add_file(path)
            self._sync.add_dir(path.parent.parent)

    def commit(self, epoch: int, row: Mapping[str, Any]) -> None:
        """Commit ``epoch`` by writing its ``epochs`` row; call after its arrays and other rows.

        Durable: the epoch's files and folders are fsynced first, the row's folder after the rename.
        """
        row = {"run_id": self.run_id, "epoch": epoch, "committed_at": utcnow(), **row}
        path = self.layout.table_segment(self.run_id, "epochs", epoch)
        write_point(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path_for(path)
        try:
            write_parquet(to_table([row], SEGMENT_TABLES["epochs"]), tmp)
            if self.durable:
                self._sync.add_file(tmp)
                self._sync.add_dir(path.parent.parent)
                self._sync.flush()
            kill_point("before_commit")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self.durable:
            fsync_dir(path.parent)
        self._push()  # a URL: the epoch's objects, then its marker last

    def write_checkpoint(self, epoch: int, arrays: bytes | Mapping[str, np.ndarray]) -> None:
        """Write the checkpoint of ``epoch`` atomically.

        ``arrays``: the bytes of a compact checkpoint (`revacnn.storage.checkpoints.encode`,
        written as ``eNNNNN.ckpt``), or named arrays for an old-style ``.npz``.
        """
        if isinstance(arrays, (bytes, bytearray, memoryview)):
            from .checkpoints import compact_path, write_file

            path = compact_path(self.layout, self.run_id, epoch)
            write_file(path, bytes(arrays))
            if self.durable:  # synced with the rest of the epoch, before its marker
                self._sync.add_file(path)
                self._sync.add_dir(path.parent.parent)
            return
        path = self.layout.checkpoint(self.run_id, epoch)
        write_point(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp.npz"
        np.savez(tmp, **arrays)
        kill_point("checkpoint_write")
        os.replace(tmp, path)
        if self.durable:  # synced with the rest of the epoch, before its marker
            self._sync.add_file(path)
            self._sync.add_dir(path.parent.parent)

    def sync(self) -> None:
        """Flush (fsync) what this writer wrote since the last commit (durable stores)."""
        if self.durable:
            self._sync.flush()

    def discard_after(self, epoch: int) -> None:
        """Remove every trace of epochs after ``epoch`` and half-written files (before resuming)."""
        for table in SEGMENT_TABLES:
            d = self.layout.table_dir(self.run_id, table)
            if d.exists():
                for p in d.iterdir():
                    e = segment_epoch(p)
                    if (e is not None and e > epoch) or p.name.endswith(".tmp"):
                        p.unlink(missing_ok=True)
        arr = self.layout.arrays_dir(self.run_id)
        if arr.exists():
            for p in arr.iterdir():
                if p.name.startswith("e") and p.name[1:].isdigit() and int(p.name[1:]) > epoch:
                    shutil.rmtree(p, ignore_errors=True)
        ck = self.layout.checkpoint(self.run_id, 0).parent
        if ck.exists():
            for p in ck.iterdir():
                stem = p.name.split(".")[0]
                if p.name.startswith(".") or (stem[1:].isdigit() and int(stem[1:]) > epoch):
                    p.unlink(missing_ok=True)
        if self._mirror is not None:  # and the uncommitted objects a killed writer left in the bucket
            self._mirror.discard_after(self.run_id, epoch)
            self._push()

    def abandon(self) -> None:
        """Remove the run entirely (a fork whose changes were refused): its folder, and its objects at a URL.

        Example:
            >>> w = RunWriter.create(store, session_id=sid, config={}); w.abandon()
        """
        self._stop_sync()
        self.lease.release()
        shutil.rmtree(self.layout.run_dir(self.run_id), ignore_errors=True)
        if self._mirror is not None:
            try:
                keys = sorted(self._mirror.backend.list(f"runs/{self.run_id}/"), key=lambda k: "/run.json" not in k)
                self._mirror.delete_remote(keys)  # run.json first: readers stop listing the run at once
            except Exception as exc:
                log.warning("run %s not removed from %s: %s", self.run_id, self._mirror.url, exc)

    # ------------------------------------------------------------------ events
    def find_event(self, event_id: str) -> dict[str, Any] | None:
        """The event already recorded for ``event_id`` (a command id), or None."""
        suffix = f"-{_safe(event_id)}.parquet"
        for p in event_files(self.layout, self.run_id):
            if p.name.endswith(suffix):
                for row in read_tables([p], EVENTS_SCHEMA).to_pylist():
                    if row["event_id"] == event_id:
                        return row
        return None

    def write_event(
        self,
        *,
        event_id: str,
        epoch: int,
        batch: int,
        kind: str,
        args: Mapping[str, Any],
        status: str,
        message: str,
        sent_at: float | None = None,
    ) -> dict[str, Any]:
        """Record a steering event (one small Parquet file, durable) and return its row."""
        self._event_seq += 1
        at = utcnow()
        row = {
            "run_id": self.run_id,
            "event_id": event_id,
            "epoch": epoch,
            "batch": batch,
            "at": at,
            "kind": kind,
            "args": json.dumps(dict(args), default=str),
            "status": status,
            "message": message,
            "sent_at": None if sent_at is None else _dt(sent_at),
            "latency_ms": None if sent_at is None else (at.timestamp() - sent_at) * 1000.0,
        }
        name = f"{at.strftime('%Y%m%dT%H%M%S%f')}-{self._event_seq:06d}-{_safe(event_id)}.parquet"
        d = self.layout.events_dir(self.run_id)
        write_parquet_atomic(to_table([row], EVENTS_SCHEMA), d / name)
        if self.durable:  # on disk before its command leaves the queue
            sync = SyncSet()
            sync.add_file(d / name)
            sync.flush()
        if self._mirror is not None:  # in the bucket before its command leaves the queue
            self._mirror.put_file(f"runs/{self.run_id}/tables/events/{name}")
        return row

    # ------------------------------------------------------------------ compaction
    def compact(self) -> None:
        """Merge each table's committed files into one file per table, published as a new generation.

        The merged files get new names (``compact-gNNNNNN.parquet``); one atomic write of
        ``tables/manifest.json`` then switches readers to them, and only after that are the old
        segments removed. A reader lists one generation or the other (`run_files`), never a mix,
        so it never sees an epoch's ``epochs`` row without its other rows. A crash before the
        switch leaves unnamed merged files (ignored, removed next time); after it, old segments
        (ignored, removed next time).
        """
        rf = run_files(self.layout, self.run_id)
        if not rf.epochs:
            return
        upto = max(rf.epochs)
        if rf.generation and rf.upto == upto and all(len(v) <= 1 for v in rf.files.values()):
            self._remove_stale(rf)
            return
        gen = rf.generation + 1
        names: dict[str, str | None] = {}
        for i, (table, schema) in enumerate(SEGMENT_TABLES.items()):
            files = rf.files[table]
            if not files:
                names[table] = None
                continue
            merged = read_tables(files, schema)
            name = compact_name(gen)
            target = self.layout.table_dir(self.run_id, table) / name
            write_parquet_atomic(merged, target)
            if self.durable:
                self._sync.add_file(target)
            names[table] = name
            if i == 0:
                kill_point("compaction_written")
        if self.durable:
            self._sync.flush()  # the merged files are on disk before the manifest names them
        manifest = {"generation": gen, "upto": upto, "epochs": rf.epochs, "files": names,
                    "written_at": utcnow().isoformat()}
        atomic_write_json(self.layout.manifest(self.run_id), manifest, durable=self.durable)
        kill_point("compaction_published")
        self._push()  # a URL: merged files, then the manifest, then the old segments' deletion
        now = run_files(self.layout, self.run_id)
        self._remove_stale(now)
        self._push()
        if now.epochs != rf.epochs:  # pragma: no cover - defensive
            raise RuntimeError(f"compaction lost epochs: {sorted(set(rf.epochs) - set(now.epochs))}")

    def _remove_stale(self, rf: RunFiles) -> None:
        """Delete what generation ``rf`` no longer names: old segments and merged files, temp files."""
        if not rf.generation:
            return
        keep = {p.name for t in SEGMENT_TABLES for p in rf.files[t]}
        for table in SEGMENT_TABLES:
            d = self.layout.table_dir(self.run_id, table)
            try:
                names = os.listdir(d)
            except FileNotFoundError:
                continue
            for n in names:
                if n in keep:
                    continue
                e = segment_epoch(Path(n))
                stale = (
                    (e is not None and e <= rf.upto)
                    or n.startswith(COMPACT_PREFIX)
                    or (n.startswith(".") and n.endswith(".tmp"))
                )
                if stale:
                    (d / n).unlink(missing_ok=True)


#: Zarr v3 ``data_type`` names of the dtypes `_ZarrTree` writes itself (others go through zarr)
_DIRECT_DTYPES = {
    np.dtype(t): t
    for t in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
              "float16", "float32", "float64")
}
_BLOSC_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


class _ZarrTree:
    """Writes a Zarr v3 hierarchy of single-chunk arrays straight to files, as zarr itself would.

    The documents (``zarr.json``) and chunk files are the ones ``zarr.create_array(data=a,
    chunks=a.shape, compressors=array_codec(a.dtype))`` writes (checked against zarr in
    ``tests/storage/test_writer_arrays.py``), except that a chunk equal to the fill value is
    written too (zarr skips it; both read back the same), the JSON is compact (no indentation or
    spaces) and the optional members zarr writes empty (``attributes``, ``storage_transformers``)
    are left out where empty; zarr and xarray read them as the same defaults. Arrays of other
    dtypes or byte order, 0-d or empty arrays are handed to zarr.
    `files` and `dirs` list what was written (for the durable commit).

    Example:
        >>> t = _ZarrTree(Path("store/runs/r/arrays.zarr/e00001"), {"layers": ["conv1"]})
        >>> g = t.group("conv1", {"kind": "conv"})
        >>> t.array(g, "bias", np.zeros(8, np.float32), ("filter",))
    """

    def __init__(self, root: Path, attrs: Mapping[str, Any]) -> None:
        from numcodecs.blosc import Blosc

        self.root = str(root)
        self._files: list[str] = []
        self._dirs: list[str] = []
        self._blosc = Blosc
        self._codecs: dict[tuple[int, int, str], Any] = {}
        self._groups: set[str] = set()
        os.makedirs(os.path.dirname(self.root), exist_ok=True)
        self._mkdir(self.root)
        self.group_at(self.root, attrs)

    @property
    def files(self) -> list[Path]:
        return [Path(f) for f in self._files]

    @property
    def dirs(self) -> list[Path]:
        return [Path(d) for d in self._dirs]

    def _mkdir(self, d: str) -> None:
        os.mkdir(d)
        self._dirs.append(d)

    def _write(self, path: str, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        self._files.append(path)

    def group(self, name: str, attrs: Mapping[str, Any]) -> str:
        """The group ``name`` (a nested name such as ``block1/conv1`` gets its parents, as zarr's)."""
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            d = f"{self.root}/{'/'.join(parts[:i])}"
            if d not in self._groups:
                self._mkdir(d)
                self._groups.add(d)
                if i < len(parts):
                    self.group_at(d, {})
        self.group_at(d, attrs)
        return d

    def group_at(self, d: str, attrs: Mapping[str, Any]) -> None:
        doc = {"attributes": dict(attrs), "zarr_format": 3, "node_type": "group"} if attrs else _EMPTY_GROUP
        self._write(f"{d}/zarr.json", _json_bytes(doc))

    def array(self, parent: str, key: str, value: Any, dims: tuple[str, ...] | None) -> None:
        a = np.asarray(value)
        dt = _DIRECT_DTYPES.get(a.dtype) if a.dtype.byteorder != ">" else None
        if dt is None or a.ndim == 0 or a.size == 0:
            codec = array_codec(a.dtype)
            g = zarr.open_group(parent, mode="r+")
            a = np.ascontiguousarray(a)
            g.create_array(key, data=a, chunks=a.shape or None, compressors=codec, dimension_names=dims)
            files, dirs = tree_paths(f"{parent}/{key}")
            self._files += [str(f) for f in files]
            self._dirs += [str(d) for d in dirs]
            return
        d = f"{parent}/{key}"
        self._mkdir(d)
        item = a.dtype.itemsize
        bytes_codec: dict[str, Any] = {"name": "bytes"}
        if item > 1:
            bytes_codec["configuration"] = {"endian": "little"}
        shape = list(a.shape)
        conf = _blosc_conf(a.dtype)
        doc: dict[str, Any] = {
            "shape": shape,
            "data_type": dt,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": shape}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": False if dt == "bool" else 0.0 if a.dtype.kind == "f" else 0,
            "codecs": [bytes_codec, {"name": "blosc", "configuration": {"typesize": item, **conf, "blocksize": 0}}],
            "zarr_format": 3,
            "node_type": "array",
        }
        if dims is not None:
            doc["dimension_names"] = list(dims)
        self._write(f"{d}/zarr.json", _json_bytes(doc))
        ckey = (item, conf["clevel"], conf["shuffle"])
        codec = self._codecs.get(ckey)
        if codec is None:
            codec = self._codecs[ckey] = self._blosc(cname=conf["cname"], clevel=conf["clevel"],
                                                     shuffle=_BLOSC_SHUFFLE[conf["shuffle"]], blocksize=0,
                                                     typesize=item)
        chunk_dir = f"{d}/c"
        self._mkdir(chunk_dir)
        for _ in range(a.ndim - 1):
            chunk_dir += "/0"
            self._mkdir(chunk_dir)
        self._write(f"{chunk_dir}/0", codec.encode(np.ascontiguousarray(a)))


_EMPTY_GROUP = {"zarr_format": 3, "node_type": "group"}


def _json_bytes(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, allow_nan=True, default=_json_default, separators=(",", ":")).encode()


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"Object of type {type(v).__name__} is not JSON serializable")


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:40]
