"""The recording worker's threads and t-SNE child: embeddings equal a sequential in-thread tracker's; priority."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import numpy as np
import pytest

import revacnn
from revacnn.analysis import EmbeddingTracker
from revacnn.analysis.tsne_process import child_enabled, shared_process
from revacnn.trainer.recorder import lower_thread_priority

from ..conftest import tiny_cnn


def _check_against_sequential_tracker(run) -> None:
    # the reference: one tracker with the run's seed, fed each epoch's recorded kernels in order
    ref = EmbeddingTracker(seed=int(run.config.get("seed", 0)))
    for e in range(3):
        rec = run.epoch(e)
        for name in rec.conv_layers:
            layer = rec.layer(name)
            feats = layer.kernel.reshape(len(layer.kernel), -1).astype(np.float64)
            want = ref.embed(name, layer.filter_uids, feats)
            np.testing.assert_array_equal(layer.embedding, want)
            rows = run.store.sql(f"SELECT tsne_x, tsne_y FROM filters WHERE run_id='{run.run_id}' "
                                 f"AND epoch={e} AND layer='{name}' ORDER BY filter")
            np.testing.assert_allclose(rows[["tsne_x", "tsne_y"]].to_numpy(), want, rtol=1e-6)


def test_recorded_embeddings_equal_a_sequential_tracker(tmp_path, keras_mod, tiny_data):
    """The worker's embeddings (t-SNE in the child process) equal one in-thread tracker's."""
    proc = shared_process()
    before = proc.calls_in_child
    in_child = child_enabled()
    keras_mod.utils.set_random_seed(0)
    (x, y), (xv, yv) = tiny_data
    run = revacnn.fit(tiny_cnn(keras_mod), (x, y), validation_data=(xv, yv), epochs=2, store=tmp_path / "s",
                      probes=4, progress=False)
    assert (proc.calls_in_child > before) == in_child  # the recording used the child (unless turned off)
    _check_against_sequential_tracker(run)


@pytest.mark.skipif(not child_enabled(), reason="REVACNN_TSNE_PROCESS=0: no t-SNE child")
def test_killing_the_tsne_child_never_stops_training(tmp_path, keras_mod, tiny_data, caplog):
    """The child killed mid-run: a warning, the epoch embedded in-thread, the run finishes with the same embeddings."""
    proc = shared_process()
    proc.start()
    crashes = proc.crashes

    class KillChild(keras_mod.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0 and proc.pid is not None:
                os.kill(proc.pid, signal.SIGKILL)

    keras_mod.utils.set_random_seed(0)
    (x, y), (xv, yv) = tiny_data
    try:
        with caplog.at_level(logging.WARNING, logger="revacnn.tsne"):
            run = revacnn.fit(tiny_cnn(keras_mod), (x, y), validation_data=(xv, yv), epochs=3,
                              store=tmp_path / "s", probes=4, progress=False, callbacks=[KillChild()])
        assert run.status == "finished"
        assert run.epochs() == [0, 1, 2, 3]
        assert any("t-SNE child process failed" in r.getMessage() for r in caplog.records)
        assert proc.crashes == crashes + 1
        _check_against_sequential_tracker(run)
    finally:
        proc.crashes = crashes  # later tests use the child again


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_lower_thread_priority_changes_only_the_calling_thread():
    main = os.getpriority(os.PRIO_PROCESS, os.getpid())
    seen: dict[str, object] = {}

    def body() -> None:
        seen["lowered"] = lower_thread_priority(3)
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == {"lowered": True, "nice": min(19, main + 3)}
    assert os.getpriority(os.PRIO_PROCESS, os.getpid()) == main
    assert lower_thread_priority(0) is False  # 0: left as it is


def test_a_diverged_layer_misses_its_embedding_alone():
    """One layer's NaN kernel fails its embedding only; the others equal a sequential tracker's."""
    from revacnn.trainer.recorder import EpochSnapshot, LayerSnapshot, Recorder

    rng = np.random.default_rng(0)

    def layer(name: str, index: int, kernel: np.ndarray) -> LayerSnapshot:
        f = kernel.shape[-1]
        return LayerSnapshot(name=name, kind="conv", index=index, kernel=kernel, bias=np.zeros(f, np.float32),
                             grad_l1=np.ones(f, np.float32), uids=np.arange(f), frozen_mask=np.zeros(f, bool),
                             layer_frozen=False)

    kernels = {"c1": rng.normal(size=(3, 3, 3, 8)), "c2": rng.normal(size=(3, 3, 8, 8)),
               "c3": rng.normal(size=(3, 3, 8, 16))}
    kernels["c2"][0, 0, 0, 3] = np.nan
    snap = EpochSnapshot(epoch=0, metrics={}, layers=[layer(n, i, k) for i, (n, k) in enumerate(kernels.items())],
                         probabilities=np.zeros((1, 2)), probe_labels=np.zeros(1, np.int64), checkpoint=None)
    rec = Recorder(None, embeddings=True, seed=3)  # the worker thread is not used: no writer needed
    try:
        embeddings, _ = rec._embed_epoch(snap, [])
    finally:
        rec.close()
    assert sorted(embeddings) == ["c1", "c3"]
    assert any("c2" in e and "non-finite" in e for e in rec.errors), rec.errors
    ref = EmbeddingTracker(seed=3)
    for name in ("c1", "c3"):
        k = np.moveaxis(kernels[name], -1, 0)
        np.testing.assert_array_equal(embeddings[name], ref.embed(name, np.arange(len(k)), k.reshape(len(k), -1)))
