"""``--auto-freeze``: converged layers are frozen bottom-up as events, and resumes replay it exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

import revacnn
from revacnn.analysis import doctor
from revacnn.analysis.doctor import LayerArrays, converged_layer
from revacnn.config import TrainConfig
from revacnn.trainer import fork, train
from revacnn.trainer.autofreeze import AUTO_FREEZE_MIN_FRACTION, AUTO_FREEZE_PATIENCE


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    # The mechanism under test, not the calibration (benchmarks/bench_doctor.py measures that): with
    # the change threshold at its loosest (any epoch that moved no more than its peak), a tiny run
    # converges by the activation-similarity test alone within a few epochs.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(doctor, "CONVERGED_CHANGE", 1.0)
        yield _auto_run(tmp_path_factory)


def _auto_run(tmp_path_factory):
    store = revacnn.open_store(tmp_path_factory.mktemp("af") / "store")
    cfg = TrainConfig(epochs=8, train_size=512, val_size=128, probes=8, embeddings=False,
                      auto_freeze=True, live_every_s=0)
    return store, train(cfg, store, progress=False)


def test_freezes_bottom_up_as_events_where_the_doctor_says_converged(auto_run):
    store, run = auto_run
    ev = run.events()
    ev = ev[ev.kind == "freeze"].sort_values("epoch")
    assert len(ev) >= 1, "nothing converged in 8 epochs: the test needs a run where something does"
    assert (ev.status == "applied").all()
    assert ev.message.str.startswith("auto-freeze").all()
    convs = run.epoch(0).conv_layers
    frozen_order = [json.loads(a)["layer"] for a in ev.args]
    assert frozen_order == convs[: len(frozen_order)]  # bottom-up
    assert convs[-1] not in frozen_order  # the layer the classifier reads keeps training
    assert list(ev.epoch) == sorted(ev.epoch)
    for (_, row), layer in zip(ev.iterrows(), frozen_order, strict=True):
        e = int(row.epoch)
        # the reference: the doctor's own question on the recorded arrays, asked of epoch e and of
        # the AUTO_FREEZE_PATIENCE - 1 epochs before it (each against the peak change before it)
        def changes(k, layer=layer):
            return (np.linalg.norm(run.epoch(k).layer(layer).kernel - run.epoch(k - 1).layer(layer).kernel)
                    / np.linalg.norm(run.epoch(k - 1).layer(layer).kernel))

        assert e - AUTO_FREEZE_PATIENCE >= 1
        assert e >= AUTO_FREEZE_MIN_FRACTION * 8  # not before that share of the planned epochs
        for k in range(e - AUTO_FREEZE_PATIENCE + 1, e + 1):
            a, b = run.epoch(k - 1).layer(layer), run.epoch(k).layer(layer)
            peak = max(changes(j) for j in range(1, k))
            finding = converged_layer(LayerArrays(layer, b.kernel, None, b.activations, None,
                                                  b.filter_uids.tolist(), prev_kernel=a.kernel,
                                                  prev_activations=a.activations, peak_change=peak))
            assert finding is not None, f"{layer} frozen at epoch {e} but not converged at epoch {k}"
        b = run.epoch(e).layer(layer)
        # the record of that epoch already shows it frozen, and it stays bit-identical afterwards
        assert store.sql(f"SELECT frozen FROM layers WHERE run_id='{run.run_id}' AND epoch={e} "
                         f"AND layer='{layer}'").frozen[0]
        for k in range(e + 1, max(run.epochs()) + 1):
            np.testing.assert_array_equal(run.epoch(k).layer(layer).kernel, b.kernel)


def test_a_no_change_fork_replays_the_auto_freezes(auto_run):
    store, run = auto_run
    child = fork(store, run.run_id, 1, progress=False)
    pe = run.events()
    ce = child.events()
    key = ["epoch", "batch", "kind", "status"]
    assert ce[ce.kind == "freeze"][key].values.tolist() == pe[(pe.kind == "freeze") & (pe.epoch > 1)][key].values.tolist()
    for e in range(2, max(run.epochs()) + 1):
        for layer in run.epoch(e).conv_layers:
            np.testing.assert_array_equal(child.epoch(e).layer(layer).kernel, run.epoch(e).layer(layer).kernel)
