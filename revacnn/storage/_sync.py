"""The sync layer of a store on an object store: a local cache folder mirrored to a `Backend`, commit order kept.

Every process works on a local cache folder (the existing, folder-based store code reads and writes
it) and a `Mirror` moves whole files between that folder and the backend:

- **Push** (writers): the files that changed below a prefix are put in commit order: data first
  (Zarr chunks, checkpoints, table segments, events, status), then the files that name others
  (``tables/manifest.json``, ``run.json``, ``session.json``), then the epochs' commit markers
  (``tables/epochs/eNNNNN.parquet``), and deletions last. An object store has no rename: the
  marker is the last object put, so a reader that lists a marker finds every object of its epoch.
  The markers pushed are those seen by a first scan, the data by a second one after it, so a
  marker renamed into place mid-scan waits for the next push.
- **Pull** (readers): the backend is listed twice; the commit markers of the first listing are
  the committed epochs, the objects of the second are complete for them. Objects of uncommitted
  epochs are left out, so no reader's cache ever holds a partial epoch. Zarr arrays and checkpoints
  are fetched on demand (`Mirror.ensure`), when an epoch record or a checkpoint is opened.
  A run whose lease is held on this machine (its trainer writes this cache) is never pulled over.
- **Steering**: `revacnn steer` pushes its command file; a trainer's `RunSync` thread pulls the
  run's commands and pushes its events, status and heartbeat every `sync_interval_s`.

Example:
    >>> m = Mirror.shared("memory://team", Path("/tmp/cache"))
    >>> m.push("runs/run-1")      # after a commit
    >>> m.pull()                  # a reader, another process
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from .._faults import kill_point
from ._backend import Backend, open_backend
from ._layout import atomic_write_bytes

log = logging.getLogger("revacnn.storage")

try:  # POSIX: tell whether a run's lease is held by a process on this machine
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_MARKER_RE = re.compile(r"^runs/[^/]+/tables/epochs/e\d{5,}\.parquet$")
_NAMING = re.compile(r"^(revacnn-store\.json|sessions/[^/]+/session\.json|runs/[^/]+/run\.json|"
                     r"runs/[^/]+/tables/manifest\.json)$")
#: epoch-scoped objects: (run, epoch)
_EPOCH_RE = re.compile(r"^runs/([^/]+)/(?:arrays\.zarr/e(\d{5,})/|checkpoints/e(\d{5,})[./_-]|"
                       r"tables/[^/]+/e(\d{5,})\.parquet$)")
#: fetched on demand, not by `Mirror.pull`
_LAZY_RE = re.compile(r"^(runs/[^/]+/(arrays\.zarr|checkpoints)/|sessions/[^/]+/probes\.zarr/)")
#: changed in place by their writer (others are written once): always fetched when their version changes
_MUTABLE_RE = re.compile(r"(^|/)(status\.json|run\.json|manifest\.json|snapshot\.npz|revacnn-store\.json)$")
_SKIP_NAMES = ("lease",)
_PUSHED = ("pushed",)
#: parallel puts of one rank of a push (an epoch's arrays are dozens of small objects)
PUT_THREADS = 8


def sync_interval_s() -> float:
    """Seconds between a trainer's background syncs (commands in; status, events out): ``$REVACNN_SYNC_INTERVAL_S``."""
    try:
        return max(0.05, float(os.environ.get("REVACNN_SYNC_INTERVAL_S", "1.0")))
    except ValueError:
        return 1.0


def pull_interval_s() -> float:
    """At most one pull per this many seconds from store reads (`Store.refresh` forces one): ``$REVACNN_PULL_INTERVAL_S``."""
    try:
        return max(0.0, float(os.environ.get("REVACNN_PULL_INTERVAL_S", "0.5")))
    except ValueError:
        return 0.5


def _rank(key: str) -> int:
    if _MARKER_RE.match(key):
        return 2
    if _NAMING.match(key):
        return 1
    return 0


def _epoch_of(key: str) -> tuple[str, int] | None:
    m = _EPOCH_RE.match(key)
    if not m:
        return None
    e = m.group(2) or m.group(3) or m.group(4)
    return m.group(1), int(e)


def _arrays_dir(key: str) -> str | None:
    """``runs/<run>/arrays.zarr/eNNNNN`` of a key inside an epoch's Zarr group, else None."""
    parts = key.split("/", 4)
    if len(parts) == 5 and parts[0] == "runs" and parts[2] == "arrays.zarr":
        return "/".join(parts[:4])
    return None


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class Mirror:
    """A local cache folder kept in step with a `Backend`; one per (URL, cache) and process (`shared`).

    Thread-safe: pushes and pulls of one process are serialised.

    Example:
        >>> m = Mirror.shared("s3://bucket/team", Path.home() / ".cache/revacnn/x")
        >>> m.pull(); m.ensure("runs/run-1/arrays.zarr/e00002/")
    """

    _instances: dict[tuple[str, str], Mirror] = {}
    _ilock = threading.Lock()

    def __init__(self, backend: Backend, cache: Path) -> None:
        self.backend = backend
        self.cache = Path(cache)
        self.lock = threading.RLock()
        # key -> (local stamp, remote version or _PUSHED)
        self.state: dict[str, tuple[Any, Any]] = {}
        self._last_pull = 0.0
        self._ensured: set[str] = set()
        # epoch array folders whose marker is pushed: written whole, never scanned again
        self._sealed: set[str] = set()
        self._primed: set[str] = set()
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def shared(cls, url: str, cache: Path) -> Mirror:
        """The process's mirror of ``url`` into ``cache`` (created on first use)."""
        key = (url, str(Path(cache).absolute()))
        with cls._ilock:
            m = cls._instances.get(key)
            if m is None:
                m = cls._instances[key] = cls(open_backend(url), Path(key[1]))
            return m

    @property
    def url(self) -> str:
        return self.backend.url

    # ------------------------------------------------------------------ push
    def _scan(self, prefix: str, sealed: set[str] | None = None) -> dict[str, tuple[int, int]]:
        """Stamps of the files below ``prefix``; sealed epoch folders are skipped (and added to ``sealed``)."""
        base = self.cache / prefix if prefix else self.cache
        out: dict[str, tuple[int, int]] = {}
        if base.is_file():
            s = _stamp(base)
            return {prefix: s} if s else {}
        for here, dirs, names in os.walk(base):
            keep = []
            for d in dirs:
                if d.startswith("."):
                    continue
                rel = (Path(here) / d).relative_to(self.cache).as_posix()
                if rel in self._sealed:
                    if sealed is not None:
                        sealed.add(rel)
                    continue
                keep.append(d)
            dirs[:] = keep
            for n in names:
                if n.startswith(".") or n in _SKIP_NAMES or n.endswith(".tmp"):
                    continue
                p = Path(here) / n
                s = _stamp(p)
                if s is not None:
                    out[p.relative_to(self.cache).as_posix()] = s
        return out

    def push(self, prefix: str = "", *, delete: bool = True) -> int:
        """Put what changed locally below ``prefix`` in commit order; return how many objects were put.

        Data first, then naming files (manifest, run.json, session.json), then commit markers, then
        the deletions of files this process had pushed or pulled and that are gone locally.
        """
        with self.lock:
            first = self._scan(prefix)  # the markers of this scan are pushed ...
            markers = {k for k in first if _rank(k) == 2}
            seen_sealed: set[str] = set()
            now = self._scan(prefix, seen_sealed)  # ... with the data of this later one
            if prefix not in self._primed:  # this process's first push here (a resume): skip what is there
                self._prime(prefix, now)
            todo = [k for k, s in now.items() if (_rank(k) < 2 or k in markers) and self.state.get(k, (None,))[0] != s]
            todo.sort(key=lambda k: (_rank(k), k))
            for rank in (0, 1, 2):  # each rank's puts done before the next rank's start
                self._put_all([k for k in todo if _rank(k) == rank], now)
            for k in markers:  # the epoch's arrays are in the bucket: never scanned again
                ep = _epoch_of(k)
                if ep is not None and k in now:
                    self._sealed.add(f"runs/{ep[0]}/arrays.zarr/e{ep[1]:05d}")
            gone: list[str] = []
            if delete:
                pre = prefix.rstrip("/")
                gone = [k for k in self.state if (not pre or k == pre or k.startswith(pre + "/")) and k not in now
                        and _arrays_dir(k) not in seen_sealed and not (self.cache / k).exists()]
                gone.sort(key=lambda k: -_rank(k))  # markers go first when a whole epoch goes
                if gone:
                    self.backend.delete(gone)
                    for k in gone:
                        self.state.pop(k, None)
            return len(todo) + len(gone)

    def _put_all(self, keys: list[str], stamps: dict[str, tuple[int, int]]) -> None:
        """Put ``keys`` (in parallel, `PUT_THREADS`); return once every one is in the backend."""
        if len(keys) <= 1:
            for k in keys:
                self.backend.put_file(k, self.cache / k)
                self.state[k] = (stamps[k], _PUSHED)
                kill_point("object_put")
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=PUT_THREADS, thread_name_prefix="revacnn-put")
        futures = {self._pool.submit(self.backend.put_file, k, self.cache / k): k for k in keys}
        error: BaseException | None = None
        for f in as_completed(futures):
            k = futures[f]
            try:
                f.result()
            except Exception as exc:  # the others still finish; the push fails as a whole
                error = error or exc
                continue
            self.state[k] = (stamps[k], _PUSHED)
            kill_point("object_put")
        if error is not None:
            raise error

    def _prime(self, prefix: str, local: dict[str, tuple[int, int]]) -> None:
        """Adopt the backend's objects that the cache already holds (same size, written once)."""
        listed = self.backend.list(prefix.rstrip("/") + "/" if prefix else "")
        for k, s in local.items():
            v = listed.get(k)
            if k not in self.state and v is not None and not _MUTABLE_RE.search(k) and v[0] == s[1]:
                self.state[k] = (s, v)
        self._primed.add(prefix)

    def put_file(self, key: str) -> None:
        """Put one local file now (a steering command, the store's marker)."""
        with self.lock:
            s = _stamp(self.cache / key)
            self.backend.put_file(key, self.cache / key)
            self.state[key] = (s, _PUSHED)

    def delete_remote(self, keys: list[str]) -> None:
        """Delete objects of the backend (and forget them)."""
        with self.lock:
            self.backend.delete(keys)
            for k in keys:
                self.state.pop(k, None)

    def discard_after(self, run_id: str, epoch: int) -> None:
        """Delete the backend's objects of ``run_id``'s epochs after ``epoch`` (a resume's leftovers)."""
        with self.lock:
            listed = self.backend.list(f"runs/{run_id}/")
            stale = [k for k in listed if (ep := _epoch_of(k)) is not None and ep[1] > epoch]
            stale.sort(key=lambda k: -_rank(k))  # a marker before its data
            if stale:
                self.delete_remote(stale)

    # ------------------------------------------------------------------ pull
    def _fetch(self, key: str, version: Any) -> bool:
        try:
            data = self.backend.get(key)
        except FileNotFoundError:
            return False
        path = self.cache / key
        atomic_write_bytes(path, data)
        self.state[key] = (_stamp(path), version)
        return True

    def _wanted(self, key: str, version: Any) -> bool:
        st = self.state.get(key)
        local = self.cache / key
        if st is not None:
            if st[1] == version:
                return False
            if st[1] == _PUSHED and st[0] == _stamp(local):  # our own put: adopt its version
                self.state[key] = (st[0], version)
                return False
            return True
        s = _stamp(local)
        if s is not None and not _MUTABLE_RE.search(key) and version and version[0] == s[1]:
            self.state[key] = (s, version)  # written once, already in the cache (an earlier process)
            return False
        return True

    def _busy_runs(self) -> set[str]:
        """Runs whose lease is held by a process on this machine: their files in the cache are the truth."""
        out: set[str] = set()
        runs = self.cache / "runs"
        if fcntl is None or not runs.is_dir():
            return out
        for d in runs.iterdir():
            lease = d / "lease"
            if not lease.exists():
                continue
            try:
                fd = os.open(lease, os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:
                out.add(d.name)
            finally:
                os.close(fd)
        return out

    def pull(self, *, min_interval_s: float = 0.0) -> int:
        """Bring the cache up to the backend's committed state; return how many objects changed.

        Zarr arrays and checkpoints are left to `ensure`. At most one pull per ``min_interval_s``.
        """
        with self.lock:
            if min_interval_s and time.monotonic() - self._last_pull < min_interval_s:
                return 0
            first = self.backend.list("")
            committed = {ep for k in first if _MARKER_RE.match(k) and (ep := _epoch_of(k))}
            listed = self.backend.list("")
            busy = self._busy_runs()
            todo: list[tuple[str, Any]] = []
            for k, v in listed.items():
                if _LAZY_RE.match(k):
                    continue
                parts = k.split("/")
                if parts[0] == "runs" and len(parts) > 2 and parts[1] in busy:
                    continue
                ep = _epoch_of(k)
                if ep is not None and ep not in committed:
                    continue  # an epoch not committed (yet): never show it
                if self._wanted(k, v):
                    todo.append((k, v))
            todo.sort(key=lambda kv: (_rank(kv[0]), kv[0]))
            n = 0
            for k, v in todo:
                if k.endswith("tables/manifest.json"):
                    n += self._fetch_manifest(k, v)
                elif self._fetch(k, v):
                    n += 1
            # files pulled before and gone from the backend (compacted segments, handled commands)
            gone = [k for k, (_, ver) in self.state.items()
                    if ver != _PUSHED and k not in listed and not _LAZY_RE.match(k)
                    and not (k.startswith("runs/") and k.split("/")[1] in busy)]
            for k in sorted(gone, key=_rank, reverse=True):
                (self.cache / k).unlink(missing_ok=True)
                self.state.pop(k, None)
            self._last_pull = time.monotonic()
            return n + len(gone)

    def _fetch_manifest(self, key: str, version: Any) -> int:
        """Fetch a compaction manifest after the files it names (fetched now if missing)."""
        try:
            data = self.backend.get(key)
            manifest = json.loads(data)
        except (FileNotFoundError, ValueError):
            return 0
        tables = key.rsplit("/", 1)[0]
        n = 0
        for table, name in (manifest.get("files") or {}).items():
            if name and not (self.cache / tables / table / name).exists():
                n += self._fetch(f"{tables}/{table}/{name}", None)
        atomic_write_bytes(self.cache / key, data)
        self.state[key] = (_stamp(self.cache / key), version)
        return n + 1

    def pull_prefix(self, prefix: str) -> int:
        """Fetch the new or changed objects below ``prefix`` (a trainer's commands), no deletions."""
        with self.lock:
            n = 0
            for k, v in sorted(self.backend.list(prefix).items()):
                if self._wanted(k, v) and self._fetch(k, v):
                    n += 1
            return n

    def ensure(self, prefix: str) -> None:
        """Fetch the objects below ``prefix`` missing from the cache (an epoch's arrays, a checkpoint).

        Call it only for committed epochs: their objects never change.
        """
        with self.lock:
            if prefix in self._ensured:
                return
            for k, v in self.backend.list(prefix).items():
                if not (self.cache / k).exists():
                    self._fetch(k, v)
            self._ensured.add(prefix)


class RunSync:
    """A trainer's background sync of one run: pulls its commands, pushes status, events and files.

    Runs every `sync_interval_s` in a daemon thread, so the training loop never waits on the network.

    Example:
        >>> sync = RunSync(mirror, run_id).start()
        >>> sync.stop()                  # a final push
    """

    def __init__(self, mirror: Mirror, run_id: str, interval_s: float | None = None) -> None:
        self.mirror = mirror
        self.run_id = run_id
        self.interval_s = sync_interval_s() if interval_s is None else interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"revacnn-sync-{run_id}", daemon=True)

    def start(self) -> RunSync:
        self._thread.start()
        return self

    def once(self) -> None:
        """One round: new commands in, changed files out."""
        prefix = f"runs/{self.run_id}"
        listed = self.mirror.backend.list(f"{prefix}/commands/")
        with self.mirror.lock:
            for k, v in sorted(listed.items()):
                if "/done/" in k[len(prefix):]:
                    continue
                if self.mirror._wanted(k, v):
                    self.mirror._fetch(k, v)
        self.mirror.push(prefix)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.once()
            except Exception as exc:  # a network hiccup must not stop training; the next round retries
                log.warning("sync of run %s with %s failed: %s", self.run_id, self.mirror.url, exc)

    def stop(self) -> None:
        """Stop the thread (the caller pushes a last time)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
