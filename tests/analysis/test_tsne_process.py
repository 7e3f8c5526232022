"""The t-SNE child process: the same embeddings as in-thread, in-thread fallback when it dies, exit with its parent."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from revacnn.analysis import EmbeddingTracker
from revacnn.analysis import embedding as emb_mod
from revacnn.analysis.tsne_process import TsneProcess


def _epochs(rng: np.random.Generator, n_epochs: int = 3) -> list[list[tuple]]:
    """Tracks as a recorder sees them: equal-sized layers, one larger, filters added with a parent."""
    base = {"c1": rng.normal(size=(16, 27)), "c2": rng.normal(size=(16, 144)),
            "c3": rng.normal(size=(32, 144)), "big": rng.normal(size=(210, 12))}
    out = []
    for e in range(n_epochs):
        items = []
        for key, x in base.items():
            feats = x + 0.05 * e * rng.normal(size=x.shape)
            uids = np.arange(len(x))
            parents = None
            if key == "c3" and e == 2:  # two filters added, one of them from a parent
                feats = np.vstack([feats, rng.normal(size=(2, x.shape[1]))])
                uids = np.arange(len(x) + 2)
                parents = {len(x): 3}
            items.append((key, uids, feats, parents))
        out.append(items)
    return out


def _wait_until(cond, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


@pytest.mark.parametrize("exact_max", [0, 192], ids=["openTSNE", "exact"])
def test_child_process_gives_the_in_thread_embeddings(monkeypatch, exact_max):
    """Bit for bit, epoch after epoch, and the same tracker state (what checkpoints save)."""
    monkeypatch.setattr(emb_mod, "EXACT_MAX", exact_max)
    epochs = _epochs(np.random.default_rng(0))
    ref, child = EmbeddingTracker(seed=5), EmbeddingTracker(seed=5)
    proc = TsneProcess()
    child.runner = proc
    try:
        for items in epochs:
            want = ref.embed_many(items)
            got = child.embed_many(items)
            for w, g in zip(want, got, strict=True):
                np.testing.assert_array_equal(g, w)
        assert child.state_dict() == ref.state_dict()
        assert proc.calls_in_child == len(epochs)  # really computed in the child
        assert proc.pid is not None and proc.pid != os.getpid()
    finally:
        proc.close()
    assert proc.pid is None


def test_killed_child_falls_back_in_thread_with_a_warning(caplog):
    epochs = _epochs(np.random.default_rng(1))
    ref, child = EmbeddingTracker(seed=2), EmbeddingTracker(seed=2)
    proc = TsneProcess()
    child.runner = proc
    try:
        proc.start()
        first = proc.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        assert _wait_until(lambda: proc._proc.poll() is not None)
        with caplog.at_level(logging.WARNING, logger="revacnn.tsne"):
            got = child.embed_many(epochs[0])
        assert any("t-SNE child process failed" in r.getMessage() for r in caplog.records)
        for w, g in zip(ref.embed_many(epochs[0]), got, strict=True):
            np.testing.assert_array_equal(g, w)
        assert proc.calls_in_child == 0 and proc.crashes == 1
        # the next call starts a new child, with the same results
        for w, g in zip(ref.embed_many(epochs[1]), child.embed_many(epochs[1]), strict=True):
            np.testing.assert_array_equal(g, w)
        assert proc.calls_in_child == 1 and proc.pid not in (None, first)
    finally:
        proc.close()


def test_a_hung_child_times_out_and_the_call_runs_in_thread(caplog):
    epochs = _epochs(np.random.default_rng(3))
    ref, child = EmbeddingTracker(seed=4), EmbeddingTracker(seed=4)
    proc = TsneProcess(timeout_s=1.0)
    child.runner = proc
    try:
        proc.start()
        hung = proc.pid
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)  # alive but never answers
        with caplog.at_level(logging.WARNING, logger="revacnn.tsne"):
            got = child.embed_many(epochs[0])
        assert any("TimeoutError" in r.getMessage() for r in caplog.records)
        for w, g in zip(ref.embed_many(epochs[0]), got, strict=True):
            np.testing.assert_array_equal(g, w)
        assert proc.crashes == 1 and proc.pid != hung  # the stopped child was killed
        with pytest.raises(ProcessLookupError):
            os.kill(hung, 0)
    finally:
        proc.close()


def test_child_exits_when_its_parent_is_killed():
    code = ("from revacnn.analysis.tsne_process import shared_process\n"
            "p = shared_process(); p.start(); print(p.pid, flush=True)\n"
            "import time\nwhile True: time.sleep(1)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True)
    try:
        pid = int(parent.stdout.readline())
        assert _alive(pid)
    finally:
        parent.kill()
        parent.wait()
    assert _wait_until(lambda: not _alive(pid)), f"t-SNE child {pid} outlived its killed parent"
