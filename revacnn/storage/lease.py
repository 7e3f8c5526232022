"""One writer per run: an exclusive lease (``runs/<run>/lease``), and whether a run's writer is alive.

Every process that writes a run (``train``, ``resume``, a fork's child, ``revacnn.fit``) holds the
run's lease for as long as it writes: an open file locked with ``flock(LOCK_EX)``, holding the
owner's pid, host, boot id and process start time. The kernel drops the lock when the process
ends in any way (SIGKILL included), so a lease is never left stale on this host; while it is held a
second writer is refused with `RunBusyError` naming the holder.

Liveness (`owner_alive`): on the writer's own host (same host name and boot id) a running run's
writer is alive exactly when its pid is (and is the same process: its start time matches), however
long since its last heartbeat: a slow validation pass, a long compaction or a SIGSTOP do not make it
`interrupted`. Only across hosts, where the pid cannot be checked, a heartbeat older than the timeout
(`HEARTBEAT_TIMEOUT_S`, 30 s; ``$REVACNN_HEARTBEAT_TIMEOUT_S``) means the writer is gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from ..errors import RunBusyError

try:  # POSIX; elsewhere the lease degrades to the status check
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

HOST = socket.gethostname()


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


BOOT_ID = _boot_id()


def heartbeat_timeout_s() -> float:
    """Seconds without a heartbeat after which a writer on *another* host counts as gone."""
    try:
        return float(os.environ.get("REVACNN_HEARTBEAT_TIMEOUT_S", "30"))
    except ValueError:
        return 30.0


HEARTBEAT_TIMEOUT_S = heartbeat_timeout_s()


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return []
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (None where unknown)."""
    fields = _stat_fields(pid)
    if not fields or len(fields) < 20:
        return None
    return int(fields[19])


def pid_alive(pid: int, start: int | None = None) -> bool:
    """Whether process ``pid`` runs on this host (and, with ``start``, is the same process)."""
    fields = _stat_fields(pid)
    if fields is None:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if not fields or fields[0] in ("Z", "X"):
        return False
    if start is not None and len(fields) >= 20 and int(fields[19]) != int(start):
        return False  # the pid was reused by another process
    return True


def owner_info() -> dict[str, Any]:
    """This process as a writer: pid, host, boot id and start time."""
    pid = os.getpid()
    return {"pid": pid, "host": HOST, "boot_id": BOOT_ID, "pid_start": process_start(pid)}


def same_host(info: dict[str, Any]) -> bool:
    """Whether ``info`` (a status or lease record) was written on this host since its last boot."""
    if info.get("host") != HOST:
        return False
    boot = info.get("boot_id")
    return not (boot and BOOT_ID and boot != BOOT_ID)


def owner_alive(info: dict[str, Any], timeout_s: float | None = None, *, now: float | None = None) -> bool:
    """Whether the writer described by ``info`` (pid, host, boot_id, pid_start, heartbeat_at) lives.

    Same host: its pid is alive (heartbeat ignored). Same host name but another boot: gone.
    Another host: its heartbeat is younger than ``timeout_s`` (default `HEARTBEAT_TIMEOUT_S`).
    """
    pid = info.get("pid")
    if info.get("host") == HOST:
        if not same_host(info):
            return False
        if pid:
            return pid_alive(int(pid), info.get("pid_start"))
    beat = info.get("heartbeat_at")
    if beat is None:
        return True
    limit = HEARTBEAT_TIMEOUT_S if timeout_s is None else timeout_s
    return (time.time() if now is None else now) - float(beat) < limit


def describe(info: dict[str, Any]) -> str:
    """``pid 123 on host h`` for messages."""
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"


class RunLease:
    """The exclusive lease on one run: `acquire` it before writing, `release` it when done.

    Example:
        >>> lease = RunLease(store.layout.lease(run_id), run_id).acquire()
        >>> ...  # write the run
        >>> lease.release()
    """

    def __init__(self, path: str | os.PathLike[str], run_id: str) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> dict[str, Any]:
        """What the lease file says about its (last) holder; ``{}`` when unreadable."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self, status: dict[str, Any] | None = None) -> RunLease:
        """Take the lease, or raise `RunBusyError` naming the live writer that holds it.

        Args:
            status: the run's ``status.json``; a ``running`` run whose writer is another live
                process (on another host: a fresh heartbeat) is refused even where the file
                system does not share locks between hosts.
        """
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    h = self.holder()
                    since = f" since {time.strftime('%H:%M:%S', time.localtime(h['acquired_at']))}" if (
                        isinstance(h.get("acquired_at"), (int, float))) else ""
                    raise RunBusyError(
                        f"Run {self.run_id} is running: another process ({describe(h)}{since}) holds "
                        f"its lease and writes it. Stop it first (`revacnn steer {self.run_id} stop`) "
                        "or wait for it to end"
                    ) from None
            if status and status.get("status") == "running" and status.get("pid") != os.getpid() and (
                owner_alive(status)
            ):
                raise RunBusyError(
                    f"Run {self.run_id} is running: its trainer ({describe(status)}) is alive. "
                    f"Stop it first (`revacnn steer {self.run_id} stop`) or wait for it to end"
                )
            info = {**owner_info(), "run_id": self.run_id, "acquired_at": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lease up (the file stays; its lock is what counts)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.release()
        except Exception:
            pass
