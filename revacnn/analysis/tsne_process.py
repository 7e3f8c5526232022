"""A persistent child process that runs `EmbeddingTracker`'s t-SNE optimisations off the caller's GIL.

The tracker keeps all its state (previous positions, steps, seed) in the calling process; only the
pure optimisation step (`revacnn.analysis.embedding.optimize_tracks`) runs in the child, which
receives each call's features and start positions and returns the optimised positions. So the
positions are the same as in-thread (same function, same float64 inputs, BLAS on one thread in
both), and checkpoints, forks and resumes see exactly the state they always did.

Why a process: the exact-gradient path makes thousands of small numpy calls, each taking the GIL,
and openTSNE's optimiser loop is Python too; beside a training thread that dispatches one step per
batch they lengthen every step. A child has its own interpreter.

The child is a fresh interpreter (``subprocess``, never a fork: the caller may have TensorFlow
loaded) that loads only numpy, scipy, openTSNE and the embedding module (not the rest of revacnn,
not the caller's ``__main__``). It reads requests on its stdin and answers on its stdout, so it
exits when the caller's end of the pipe closes: at `TsneProcess.close`, at the caller's exit, and
when the caller is killed. One child serves a whole process (`shared_process`); calls are
serialised. If the child dies or cannot be started, the call runs in the caller's thread with a
warning, the next call starts a new child, and after `MAX_CRASHES` failures the process stays
in-thread. Errors of the optimisation itself (`ConfigError`) are raised as in-thread.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

from revacnn.analysis.embedding import Payload, optimize_tracks
from revacnn.errors import ConfigError

__all__ = ["MAX_CRASHES", "TIMEOUT_S", "TsneProcess", "child_enabled", "shared_process"]

log = logging.getLogger("revacnn.tsne")

MAX_CRASHES = 3
"""After this many failed child calls in one process, t-SNE stays in the calling thread."""

TIMEOUT_S = float(os.environ.get("REVACNN_TSNE_TIMEOUT_S", "600") or 600)
"""How long one call waits for the child's answer before it counts as failed (a hung or stopped
child): the child is killed and the call runs in this thread (``$REVACNN_TSNE_TIMEOUT_S``)."""

_PKG_DIR = Path(__file__).resolve().parents[1]  # .../revacnn

#: The child's bootstrap: register ``revacnn`` and ``revacnn.analysis`` as bare packages (their
#: ``__init__`` would import the storage layer: pandas, pyarrow, duckdb, zarr, ~3 s), then serve.
_BOOT = """
import sys, types
pkg_dir, ana_dir = sys.argv[1], sys.argv[2]
for name, path in (("revacnn", pkg_dir), ("revacnn.analysis", ana_dir)):
    m = types.ModuleType(name); m.__path__ = [path]; sys.modules[name] = m
from revacnn.analysis.tsne_process import _serve
_serve()
"""


def child_enabled() -> bool:
    """Whether the recorder runs t-SNE in a child process: ``REVACNN_TSNE_PROCESS`` is not ``0``.

    Example:
        >>> isinstance(child_enabled(), bool)
        True
    """
    return os.environ.get("REVACNN_TSNE_PROCESS", "1").strip().lower() not in ("0", "false", "no", "off")


class TsneProcess:
    """A callable `EmbeddingTracker.runner` that runs `optimize_tracks` in a persistent child process.

    Args:
        nice: how many ``nice`` steps below the caller the child runs (0: equal).
        timeout_s: how long a call waits for the child's answer (`TIMEOUT_S`); a child that does
            not answer in time is killed and the call runs in this thread.

    Example:
        >>> import numpy as np
        >>> from revacnn.analysis import EmbeddingTracker
        >>> tracker = EmbeddingTracker()
        >>> proc = TsneProcess()
        >>> tracker.runner = proc
        >>> tracker.embed("conv1", np.arange(8), np.random.default_rng(0).normal(size=(8, 9))).shape
        (8, 2)
        >>> proc.close()
    """

    def __init__(self, *, nice: int = 0, timeout_s: float = TIMEOUT_S) -> None:
        self.nice = int(nice)
        self.timeout_s = float(timeout_s)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self.crashes = 0
        self.calls_in_child = 0

    @property
    def pid(self) -> int | None:
        """The running child's process id, None when none runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        """Start the child now (it loads numpy/scipy/openTSNE while the caller goes on); idempotent."""
        with self._lock:
            self._ensure()

    def _ensure(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        env = dict(os.environ)
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"  # as `single_threaded_blas` in the recorder's threads: same results, no spinning
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env["REVACNN_TSNE_NICE"] = str(max(0, self.nice))
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(_PKG_DIR), str(_PKG_DIR / "analysis")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
        )
        return self._proc

    def __call__(self, payloads: list[Payload], settings: dict[str, Any]) -> list[np.ndarray]:
        """`optimize_tracks(payloads, settings)`, in the child; in this thread if the child fails.

        Raises:
            ConfigError: as `optimize_tracks` (non-finite positions).
        """
        with self._lock:
            if self.crashes < MAX_CRASHES:
                try:
                    if self._proc is not None and self._proc.poll() is not None:
                        raise EOFError(f"the child exited with status {self._proc.returncode}")
                    proc = self._ensure()
                    assert proc.stdin is not None and proc.stdout is not None
                    deadline = time.monotonic() + self.timeout_s
                    _write_by(proc.stdin, pickle.dumps((payloads, settings), protocol=pickle.HIGHEST_PROTOCOL),
                              deadline)
                    ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
                    if not ready:
                        raise TimeoutError(f"no answer within {self.timeout_s:g} s")
                    status, value = pickle.load(proc.stdout)
                except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
                    self.crashes += 1
                    self._kill()
                    tail = "; t-SNE stays in this thread from now on" if self.crashes >= MAX_CRASHES else ""
                    log.warning("t-SNE child process failed (%s: %s), embedding in this thread instead%s",
                                type(exc).__name__, exc, tail)
                else:
                    if status == "ok":
                        self.calls_in_child += 1
                        return value
                    raise value  # the optimisation's own error, as in-thread
        return optimize_tracks(payloads, settings)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for f in (proc.stdin, proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the child: close its stdin (it exits), kill it if it has not after `timeout` seconds."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None:
                return
            try:
                if proc.stdin is not None:
                    proc.stdin.close()
                proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
            finally:
                if proc.stdout is not None:
                    proc.stdout.close()


def _write_by(pipe: IO[bytes], data: bytes, deadline: float) -> None:
    """Write ``data`` to ``pipe`` in pieces the pipe takes at once; TimeoutError after ``deadline``.

    A child that stops reading (stopped, hung) fills the pipe; a plain write would then block forever.
    """
    fd = pipe.fileno()
    view = memoryview(data)
    while view:
        _, ready, _ = select.select([], [fd], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(f"the child took no request within the timeout ({len(view)} bytes left)")
        n = os.write(fd, view[:select.PIPE_BUF])
        view = view[n:]


_shared: TsneProcess | None = None
_shared_lock = threading.Lock()


def shared_process(*, nice: int = 0) -> TsneProcess:
    """This process's one `TsneProcess` (started on first use, ended with the process).

    Args:
        nice: ``nice`` steps below the caller for the child; taken from the first call.

    Example:
        >>> shared_process() is shared_process()
        True
    """
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = TsneProcess(nice=nice)
        return _shared


def _serve() -> None:
    """The child's loop: read ``(payloads, settings)``, answer ``("ok", positions)`` or ``("err", exc)``."""
    nice = int(os.environ.get("REVACNN_TSNE_NICE", "0") or 0)
    if nice > 0 and hasattr(os, "nice"):
        try:
            os.nice(nice)
        except OSError:
            pass
    out_fd = os.dup(1)
    os.dup2(2, 1)  # anything printed by a library goes to stderr, never into the answers
    inp: IO[bytes] = sys.stdin.buffer
    out: IO[bytes] = os.fdopen(out_fd, "wb")
    import openTSNE  # noqa: F401  (load it before the first request)

    while True:
        try:
            payloads, settings = pickle.load(inp)
        except EOFError:  # the caller closed the pipe or ended
            return
        try:
            answer: tuple[str, Any] = ("ok", optimize_tracks(payloads, settings))
        except Exception as exc:  # sent back and raised in the caller
            try:
                pickle.dumps(exc)
                answer = ("err", exc)
            except Exception:
                answer = ("err", ConfigError(f"t-SNE failed in the child process: {type(exc).__name__}: {exc}"))
        try:
            pickle.dump(answer, out, protocol=pickle.HIGHEST_PROTOCOL)
            out.flush()
        except (BrokenPipeError, OSError):
            return
