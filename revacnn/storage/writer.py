"""Writing side of the store: create sessions and runs, commit epoch records, events, status."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from ._layout import atomic_write_json, epoch_tag, new_id, utcnow
from ._schema import EVENTS_SCHEMA, SEGMENT_TABLES
from ._tables import (
    COMPACT_PREFIX,
    read_tables,
    table_files,
    to_table,
    write_parquet_atomic,
)
from .store import HOST, Store

_FLOAT_CODEC = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")
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
    """

    def __init__(self, store: Store, run_id: str) -> None:
        self.store = store
        self.run_id = run_id
        self.layout = store.layout
        self._event_seq = 0
        self._last_beat = 0.0

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
    ) -> RunWriter:
        """Create a new run in ``session_id`` and return its writer."""
        rid = new_id("run")
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
        )
        w = cls(store, rid)
        w.set_status("running")
        return w

    # ------------------------------------------------------------------ status
    def set_status(self, status: str, message: str | None = None) -> None:
        """Write the run's status; terminal statuses also record ``finished_at``."""
        info: dict[str, Any] = {
            "status": status,
            "pid": os.getpid(),
            "host": HOST,
            "heartbeat_at": time.time(),
            "message": message,
        }
        if status != "running":
            info["finished_at"] = utcnow().isoformat()
        atomic_write_json(self.layout.status_json(self.run_id), info)
        self._status = info

    def heartbeat(self, *, every_s: float = 2.0, **extra: Any) -> None:
        """Refresh the heartbeat (at most every ``every_s`` seconds) so readers know we are alive."""
        now = time.time()
        if now - self._last_beat < every_s:
            return
        self._last_beat = now
        info = dict(getattr(self, "_status", {"status": "running"}))
        info.update(extra, heartbeat_at=now, pid=os.getpid(), host=HOST)
        atomic_write_json(self.layout.status_json(self.run_id), info)
        self._status = info

    # ------------------------------------------------------------------ epochs
    def write_arrays(
        self, epoch: int, layers: Mapping[str, Mapping[str, np.ndarray]], attrs: Mapping[str, Any],
        extra: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Write an epoch's arrays: one Zarr group per layer, plus top-level arrays in ``extra``."""
        path = self.layout.epoch_arrays(self.run_id, epoch)
        if path.exists():  # left over by a crash or an uncommitted attempt: replace it
            shutil.rmtree(path)
        root = zarr.open_group(str(path), mode="w")
        for lname, arrays in layers.items():
            g = root.create_group(lname)
            kind = dict(arrays.get("_attrs", {})).get("kind", "conv")
            for key, value in arrays.items():
                if key == "_attrs":
                    continue
                a = np.ascontiguousarray(value)
                codec = _FLOAT_CODEC if a.dtype.kind == "f" else _INT_CODEC
                g.create_array(key, data=a, chunks=a.shape or None, compressors=codec,
                               dimension_names=dimension_names(key, a.ndim, kind))
            g.attrs.update(dict(arrays.get("_attrs", {})))  # type: ignore[arg-type]
        for key, value in (extra or {}).items():
            a = np.ascontiguousarray(value)
            root.create_array(key, data=a, chunks=a.shape or None, compressors=_FLOAT_CODEC,
                              dimension_names=dimension_names(key, a.ndim, "extra"))
        root.attrs.update({"layers": list(layers), **dict(attrs)})

    def write_rows(self, table: str, epoch: int, rows: Any) -> None:
        """Write one epoch's rows of a segment table (not yet visible: see `commit`)."""
        write_parquet_atomic(to_table(rows, SEGMENT_TABLES[table]), self.layout.table_segment(self.run_id, table, epoch))

    def commit(self, epoch: int, row: Mapping[str, Any]) -> None:
        """Commit ``epoch`` by writing its ``epochs`` row; call after its arrays and other rows."""
        row = {"run_id": self.run_id, "epoch": epoch, "committed_at": utcnow(), **row}
        self.write_rows("epochs", epoch, [row])

    def write_checkpoint(self, epoch: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write the checkpoint of ``epoch`` (an ``.npz``) atomically."""
        path = self.layout.checkpoint(self.run_id, epoch)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    def discard_after(self, epoch: int) -> None:
        """Remove every trace of epochs after ``epoch`` (before resuming from it)."""
        for table in SEGMENT_TABLES:
            d = self.layout.table_dir(self.run_id, table)
            if d.exists():
                for p in d.iterdir():
                    if p.name.startswith("e") and p.suffix == ".parquet" and int(p.stem[1:]) > epoch:
                        p.unlink(missing_ok=True)
        arr = self.layout.arrays_dir(self.run_id)
        if arr.exists():
            for p in arr.iterdir():
                if p.name.startswith("e") and p.name[1:].isdigit() and int(p.name[1:]) > epoch:
                    shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ events
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
        """Record a steering event (one small Parquet file) and return its row."""
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
        write_parquet_atomic(to_table([row], EVENTS_SCHEMA), self.layout.events_dir(self.run_id) / name)
        return row

    # ------------------------------------------------------------------ compaction
    def compact(self) -> None:
        """Merge each table's committed segments into one ``compact-eNNNNN.parquet`` file."""
        committed = set(self.store._committed(self.run_id))
        if not committed:
            return
        upto = max(committed)
        for table, schema in SEGMENT_TABLES.items():
            files = table_files(self.layout, self.run_id, table, committed)
            if len(files) <= 1:
                continue
            merged = read_tables(files, schema)
            target = self.layout.table_dir(self.run_id, table) / f"{COMPACT_PREFIX}{epoch_tag(upto)}.parquet"
            write_parquet_atomic(merged, target)
            for f in files:
                if f != target:
                    f.unlink(missing_ok=True)
        # Verify: the compacted epochs table must still list every committed epoch.
        got = set(self.store._committed(self.run_id))
        if got != committed:  # pragma: no cover - defensive
            raise RuntimeError(f"compaction lost epochs: {sorted(committed - got)}")


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:40]
