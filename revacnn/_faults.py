"""Fault injection for tests and benchmarks: ``REVACNN_FAULT`` kills the process or fails writes at named points.

``REVACNN_FAULT`` holds comma-separated ``POINT[@N]`` items. A kill point (`kill_point`) sends
SIGKILL to the process itself the N-th time (default: the first) the code reaches it. The special
item ``enospc[@N]`` makes the N-th data write of the store and every one after it raise
``OSError(ENOSPC)``, as a full disk would. Without the variable every hook is a no-op costing one
dictionary lookup.

Kill points (where the code calls `kill_point`):

- ``before_commit``: an epoch's arrays, checkpoint and rows are written, its ``epochs`` marker not.
- ``checkpoint_write``: the checkpoint's temporary file is written, not yet renamed into place.
- ``command_popped``: a steering command was read and applied, its event not yet written.
- ``event_written``: the event was written, the command file not yet moved out of the queue.
- ``compaction_written``: compaction wrote its first merged file, the new manifest not yet published.
- ``compaction_published``: the new manifest is published, the old segments not yet removed.
- ``object_put``: a store on an object store (``s3://…``) put one object of a push, not the next.

Example:
    >>> import os, subprocess
    >>> env = {**os.environ, "REVACNN_FAULT": "before_commit@3"}  # dies before epoch 2's marker
    >>> subprocess.run(["revacnn", "train", "--epochs", "4"], env=env).returncode
    -9
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "REVACNN_FAULT"

KILL_POINTS = (
    "before_commit",
    "checkpoint_write",
    "command_popped",
    "event_written",
    "compaction_written",
    "compaction_published",
    "object_put",
)

_counts: dict[str, int] = {}


def _spec() -> dict[str, int]:
    raw = os.environ.get(ENV, "")
    out: dict[str, int] = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, nth = item.partition("@")
        out[name] = int(nth) if nth else 1
    return out


def _hit(point: str) -> tuple[int, int] | None:
    """Count one pass through ``point``; return (count, armed N) when the point is armed."""
    if ENV not in os.environ:
        return None
    spec = _spec()
    if point not in spec:
        return None
    _counts[point] = _counts.get(point, 0) + 1
    return _counts[point], spec[point]


def kill_point(point: str) -> None:
    """SIGKILL this process if ``REVACNN_FAULT`` arms ``point`` and this is its N-th pass."""
    hit = _hit(point)
    if hit is not None and hit[0] == hit[1]:
        os.kill(os.getpid(), signal.SIGKILL)


def write_point(path: object = None) -> None:
    """Raise ``OSError(ENOSPC)`` from the N-th data write on when ``REVACNN_FAULT`` holds ``enospc@N``."""
    hit = _hit("enospc")
    if hit is not None and hit[0] >= hit[1]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), None if path is None else str(path))


def reset() -> None:
    """Forget the pass counts (for in-process tests)."""
    _counts.clear()
