"""Exact replay of a user's compiled training: a no-change fork and a resume after SIGKILL match the parent bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import revacnn
from revacnn.models import recorded_layers
from revacnn.trainer import fork, resume

from . import user_setups as us

COLS = "epoch, loss, accuracy, val_loss, val_accuracy, lr, step"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=["adamw", "resnet20"])
def parent(request, tmp_path_factory):
    kind = request.param
    model, train, val = us.build(kind)
    store = revacnn.open_store(tmp_path_factory.mktemp(kind) / "store")
    run = revacnn.fit(model, train, validation_data=val, epochs=us.EPOCHS, batch_size=us.BATCH, store=store,
                      probes=4, seed=us.SEED, name=kind, progress=False, embeddings=False)
    return kind, store, run, model, (train, val)


def _same(store_a, run_a, store_b, run_b, epochs, names, grads_from=0):
    a = store_a.sql(f"SELECT {COLS} FROM epochs WHERE run_id='{run_a.run_id}' AND epoch IN {tuple(epochs)} ORDER BY epoch")
    b = store_b.sql(f"SELECT {COLS} FROM epochs WHERE run_id='{run_b.run_id}' AND epoch IN {tuple(epochs)} ORDER BY epoch")
    assert len(a) == len(epochs) and a.equals(b), (a, b)
    for e in epochs:
        ra, rb = run_a.epoch(e), run_b.epoch(e)
        for n in names:
            if n in ra.conv_layers:
                np.testing.assert_array_equal(ra.layer(n).kernel, rb.layer(n).kernel)
            np.testing.assert_array_equal(ra.layer(n).bias, rb.layer(n).bias)
            if e >= grads_from:  # a fork's own epoch-K record holds no gradient sums (nothing trained yet)
                np.testing.assert_array_equal(ra.layer(n).grad_l1, rb.layer(n).grad_l1)
        np.testing.assert_array_equal(ra.probabilities, rb.probabilities)


def test_no_change_fork_replays_the_parent_bit_exactly(parent):
    kind, store, root, model, data = parent
    names = [r.name for r in recorded_layers(model)]
    child = fork(store, root.run_id, 1, data=data, progress=False, name="replay")
    assert child.epochs() == list(range(1, us.EPOCHS + 1))
    _same(store, root, store, child, list(range(1, us.EPOCHS + 1)), names, grads_from=2)
    # the fork trained with the compiled loss and optimizer, saved with its checkpoints
    restored = child.load_model(us.EPOCHS)
    assert type(restored.optimizer).__name__ == type(model.optimizer).__name__
    if kind == "adamw":
        loss = restored._compile_loss._user_loss if hasattr(restored, "_compile_loss") else restored.loss
        assert type(loss).__name__ == "CategoricalCrossentropy" and loss.get_config()["from_logits"]
        assert type(restored.optimizer._learning_rate).__name__ == "CosineDecay"
        assert restored.optimizer.weight_decay == pytest.approx(0.05)
    else:
        assert restored.optimizer.nesterov
    # the cosine schedule moved the rate (the lr column follows it)
    lrs = store.sql(f"SELECT lr FROM epochs WHERE run_id='{root.run_id}' ORDER BY epoch").lr.tolist()
    assert (len(set(lrs)) > 2) == (kind == "adamw")


def test_resume_after_sigkill_matches_the_uninterrupted_run(parent, tmp_path):
    kind, store, root, model, data = parent
    names = [r.name for r in recorded_layers(model)]
    path = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.trainer.user_setups", str(path), kind, "2"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        run_id = None
        while time.time() < deadline:  # wait until epoch 2 is committed (the script then blocks)
            assert proc.poll() is None, "the trainer ended early"
            if path.exists():
                st = revacnn.open_store(path, mode="r")
                ids = st.runs().run_id.tolist() if len(st.runs()) else []
                if ids and 2 in st.run(ids[0]).epochs():
                    run_id = ids[0]
                    break
            time.sleep(0.2)
        assert run_id is not None
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    st = revacnn.open_store(path)
    assert st.run(run_id).status == "interrupted"
    resumed = resume(st, run_id, data=data, progress=False)
    assert resumed.status == "finished" and resumed.epochs() == list(range(us.EPOCHS + 1))
    _same(store, root, st, resumed, list(range(us.EPOCHS + 1)), names)
