"""On-disk layout of a revacnn store: paths, ids, and atomic file writes."""

from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

FORMAT_NAME = "revacnn-store"
FORMAT_VERSION = 1
MARKER = "revacnn-store.json"

EPOCH_RE = re.compile(r"^e(\d{5,})\.parquet$")


def epoch_tag(epoch: int) -> str:
    """File-name tag of an epoch: ``e00003``."""
    return f"e{int(epoch):05d}"


def new_id(prefix: str) -> str:
    """A short, sortable, unique id such as ``run-20261125-2203-4f2a``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{prefix}-{stamp}-{secrets.token_hex(3)}"


def utcnow() -> datetime:
    """The current time in UTC, timezone-aware."""
    return datetime.now(timezone.utc)


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    With ``durable``, the data and the folder entry are on disk when this returns (fsync).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if durable:
            from ._durable import fsync_dir

            fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: Path, obj: Any, *, durable: bool = False) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (and durably with ``durable``)."""
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode(), durable=durable)


def tmp_path_for(path: Path) -> Path:
    """A hidden temporary sibling of ``path`` for write-then-rename."""
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"


class Layout:
    """Paths inside a store root. Pure path arithmetic, no I/O."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @property
    def marker(self) -> Path:
        return self.root / MARKER

    @property
    def sessions_dir(self) -> Path:
        return self.root / "sessions"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def session_dir(self, session_id: str) -> Path:
        return self.sessions_dir / session_id

    def session_json(self, session_id: str) -> Path:
        return self.session_dir(session_id) / "session.json"

    def probes_zarr(self, session_id: str) -> Path:
        return self.session_dir(session_id) / "probes.zarr"

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    def run_json(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "run.json"

    def status_json(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "status.json"

    def lease(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "lease"

    def manifest(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "tables" / "manifest.json"

    def arrays_dir(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "arrays.zarr"

    def epoch_arrays(self, run_id: str, epoch: int) -> Path:
        return self.arrays_dir(run_id) / epoch_tag(epoch)

    def checkpoint(self, run_id: str, epoch: int) -> Path:
        return self.run_dir(run_id) / "checkpoints" / f"{epoch_tag(epoch)}.npz"

    def table_dir(self, run_id: str, table: str) -> Path:
        return self.run_dir(run_id) / "tables" / table

    def table_segment(self, run_id: str, table: str, epoch: int) -> Path:
        return self.table_dir(run_id, table) / f"{epoch_tag(epoch)}.parquet"

    def events_dir(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "tables" / "events"

    def commands_dir(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "commands"

    def live_dir(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "live"
