"""Durability helpers: fsync files, folders and whole trees, so a commit marker never outlives its data.

A rename (``os.replace``) is atomic for readers but not durable: after a power cut the new name
may survive while the data it points to does not. The commit protocol therefore fsyncs every data
file and the folders that list them *before* it renames the epoch's commit marker into place, and
fsyncs the marker's folder after. `SyncSet` collects what an epoch wrote and syncs it in one go:
on Linux with one ``syncfs(2)`` of the store's file system (one journal commit, a few ms), elsewhere
with an fsync per file and folder (about 10 ms each on ext4, a second for an epoch's Zarr tree).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
from pathlib import Path

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _SYNCFS = getattr(_libc, "syncfs", None)
except OSError:  # pragma: no cover - no C library to load
    _SYNCFS = None


def syncfs(path: str | os.PathLike[str]) -> bool:
    """Flush the whole file system holding ``path`` (data and metadata); False where unavailable."""
    if _SYNCFS is None or os.environ.get("REVACNN_NO_SYNCFS"):
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        return _SYNCFS(fd) == 0
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush ``path``'s data to disk (a no-op for a file that vanished)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (the names created or renamed in it) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; their renames are then best effort
        pass
    finally:
        os.close(fd)


def tree_paths(root: str | os.PathLike[str]) -> tuple[list[Path], list[Path]]:
    """Every file and folder under ``root`` (``root`` included), for `SyncSet.add_tree`."""
    files: list[Path] = []
    dirs: list[Path] = []
    for here, _subdirs, names in os.walk(root):
        dirs.append(Path(here))
        files.extend(Path(here) / n for n in names)
    return files, dirs


class SyncSet:
    """Files and folders written since the last `flush`; `flush` fsyncs files first, then folders.

    Example:
        >>> s = SyncSet()
        >>> s.add_file(path)          # also marks its folder
        >>> s.flush()                 # before the commit marker's rename
    """

    def __init__(self) -> None:
        self.files: dict[Path, None] = {}
        self.dirs: dict[Path, None] = {}

    def add_file(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        self.files[p] = None
        self.dirs[p.parent] = None

    def add_dir(self, path: str | os.PathLike[str]) -> None:
        self.dirs[Path(path)] = None

    def add_tree(self, root: str | os.PathLike[str]) -> None:
        files, dirs = tree_paths(root)
        for f in files:
            self.files[f] = None
        for d in dirs:
            self.dirs[d] = None
        self.dirs[Path(root).parent] = None

    def add_dirs(self, paths: Iterable[str | os.PathLike[str]]) -> None:
        for p in paths:
            self.add_dir(p)

    def flush(self) -> None:
        """Make every collected file and folder durable, and forget them.

        One ``syncfs`` when the system has it (the store lives on one file system), else an fsync
        of every file, then of every folder, deepest first.
        """
        if not self.files and not self.dirs:
            return
        anchor = next(iter(self.dirs), None) or next(iter(self.files)).parent
        if not syncfs(anchor):
            for f in self.files:
                fsync_file(f)
            for d in sorted(self.dirs, key=lambda p: len(p.parts), reverse=True):
                fsync_dir(d)
        self.files.clear()
        self.dirs.clear()

    def __len__(self) -> int:
        return len(self.files) + len(self.dirs)
