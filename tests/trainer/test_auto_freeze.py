"""``--auto-freeze``: ready layers anneal to a rate of 0, then freeze, bottom-up, as events; forks replay it exactly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import revacnn
from revacnn.analysis import doctor
from revacnn.analysis.doctor import LayerArrays, converged_layer
from revacnn.config import TrainConfig
from revacnn.trainer import autofreeze, fork, train
from revacnn.trainer.autofreeze import AUTO_FREEZE_MIN_FRACTION, AUTO_FREEZE_PATIENCE

EPOCHS = 8
BATCHES = 8  # 512 images of 64


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    # The mechanism under test, not the calibration (benchmarks/bench_doctor.py measures that): with
    # the change threshold at its loosest (any epoch that moved no more than its peak), a tiny run
    # converges by the activation-similarity test alone within a few epochs. The schedule is off
    # (convergence alone decides) and the annealing lasts 2 of the 8 epochs.
    with pytest.MonkeyPatch.context() as mp:
        _converged_rule(mp)
        yield _auto_run(tmp_path_factory)


def _converged_rule(mp: pytest.MonkeyPatch) -> None:
    """`auto_run`'s rule (its forks must run under it too, whatever ran before)."""
    mp.setattr(doctor, "CONVERGED_CHANGE", 1.0)
    mp.setattr(doctor, "CONVERGED_CKA", 0.98)
    mp.setattr(autofreeze, "AUTO_FREEZE_SCHEDULE", False)
    mp.setattr(autofreeze, "AUTO_FREEZE_ANNEAL_FRACTION", 0.25)


@pytest.fixture(scope="module")
def scheduled_run(tmp_path_factory):
    # No layer can read converged (a CKA above 1), so only FreezeOut's schedule makes layers ready.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(doctor, "CONVERGED_CKA", 1.01)
        mp.setattr(autofreeze, "AUTO_FREEZE_SCHEDULE", True)
        mp.setattr(autofreeze, "AUTO_FREEZE_ANNEAL_FRACTION", 0.1)
        yield _auto_run(tmp_path_factory)


def _auto_run(tmp_path_factory):
    store = revacnn.open_store(tmp_path_factory.mktemp("af") / "store")
    cfg = TrainConfig(epochs=EPOCHS, train_size=64 * BATCHES, val_size=128, probes=8, embeddings=False,
                      auto_freeze=True, live_every_s=0)
    return store, train(cfg, store, progress=False)


def _events(run, kind):
    ev = run.events()
    ev = ev[ev.kind == kind].sort_values(["epoch", "batch"])
    return [(int(e), json.loads(a)) for e, a in zip(ev.epoch, ev.args, strict=True)], ev


def _frozen_from_then_bit_exact(store, run, layer, e):
    b = run.epoch(e).layer(layer)
    assert store.sql(f"SELECT frozen FROM layers WHERE run_id='{run.run_id}' AND epoch={e} "
                     f"AND layer='{layer}'").frozen[0]
    for k in range(e + 1, max(run.epochs()) + 1):
        np.testing.assert_array_equal(run.epoch(k).layer(layer).kernel, b.kernel)


def test_anneals_then_freezes_bottom_up_where_the_doctor_says_converged(auto_run):
    store, run = auto_run
    anneals, aev = _events(run, "anneal")
    freezes, fev = _events(run, "freeze")
    assert len(anneals) >= 1, "nothing converged in 8 epochs: the test needs a run where something does"
    assert (aev.status == "applied").all() and (fev.status == "applied").all()
    assert aev.message.str.startswith("auto-freeze").all() and fev.message.str.startswith("auto-freeze").all()
    assert all(a["source"] == "auto-freeze" for _, a in anneals + freezes)
    convs = run.epoch(0).conv_layers
    order = [a["layer"] for _, a in anneals]
    assert order == convs[: len(order)]  # bottom-up
    assert convs[-1] not in order  # the layer the classifier reads keeps training
    assert [a["layer"] for _, a in freezes] == order[: len(freezes)]  # only annealed layers freeze
    steps = run.metrics().set_index("epoch")["step"]
    for e, args in anneals:
        layer = args["layer"]
        # the reference: the doctor's own question on the recorded arrays, asked of epoch e and of
        # the AUTO_FREEZE_PATIENCE - 1 epochs before it (each against the peak change before it)
        def changes(k, layer=layer):
            return (np.linalg.norm(run.epoch(k).layer(layer).kernel - run.epoch(k - 1).layer(layer).kernel)
                    / np.linalg.norm(run.epoch(k - 1).layer(layer).kernel))

        assert e >= AUTO_FREEZE_MIN_FRACTION * EPOCHS  # not before that share of the planned epochs
        for k in range(e - AUTO_FREEZE_PATIENCE + 1, e + 1):
            a, b = run.epoch(k - 1).layer(layer), run.epoch(k).layer(layer)
            peak = max(changes(j) for j in range(1, k))
            finding = converged_layer(LayerArrays(layer, b.kernel, None, b.activations, None,
                                                  b.filter_uids.tolist(), prev_kernel=a.kernel,
                                                  prev_activations=a.activations, peak_change=peak))
            assert finding is not None, f"{layer} annealed from epoch {e} but not converged at epoch {k}"
        # the window starts with the next step and lasts a quarter of the planned epochs (2 of them)
        assert args["start_iteration"] == steps[e]
        assert args["end_iteration"] - args["start_iteration"] == 2 * BATCHES
        # it freezes at the first epoch end the window has reached, and stays bit-identical afterwards
        frozen_at = [f for f, a in freezes if a["layer"] == layer]
        if e + 2 <= max(run.epochs()):
            assert frozen_at == [e + 2]
            assert steps[e + 2] >= args["end_iteration"] > steps[e + 1]
            _frozen_from_then_bit_exact(store, run, layer, e + 2)
            # while annealing it still moved (the scale only reaches 0 at the window's end)
            assert not np.array_equal(run.epoch(e + 1).layer(layer).kernel, run.epoch(e).layer(layer).kernel)


def test_without_convergence_layers_anneal_at_their_scheduled_point(scheduled_run):
    store, run = scheduled_run
    anneals, _ = _events(run, "anneal")
    freezes, _ = _events(run, "freeze")
    convs = run.epoch(0).conv_layers
    t0 = AUTO_FREEZE_MIN_FRACTION
    # FreezeOut's cubic schedule by hand: t_i = t0 + (1 - t0) (i / 3)^3 for the 3 conv layers
    expected = {convs[i]: math.ceil((t0 + (1 - t0) * (i / 3) ** 3) * EPOCHS) for i in range(len(convs) - 1)}
    assert {a["layer"]: e for e, a in anneals} == expected
    window = max(1, round(autofreeze.AUTO_FREEZE_ANNEAL_FRACTION * EPOCHS))
    assert {a["layer"]: e for e, a in freezes} == {k: v + window for k, v in expected.items()}
    for layer, e in expected.items():
        _frozen_from_then_bit_exact(store, run, layer, e + window)


def test_a_no_change_fork_replays_the_anneals_and_freezes(auto_run, monkeypatch):
    store, run = auto_run
    _converged_rule(monkeypatch)
    child = fork(store, run.run_id, 1, progress=False)
    pe = run.events()
    ce = child.events()
    key = ["epoch", "batch", "kind", "status", "args"]
    mine = ce.kind.isin(["anneal", "freeze"])
    assert mine.any()
    assert (ce[mine][key].values.tolist()
            == pe[pe.kind.isin(["anneal", "freeze"]) & (pe.epoch > 1)][key].values.tolist())
    for e in range(2, max(run.epochs()) + 1):
        for layer in run.epoch(e).conv_layers:
            np.testing.assert_array_equal(child.epoch(e).layer(layer).kernel, run.epoch(e).layer(layer).kernel)


def test_a_fork_inside_an_annealing_window_carries_the_window(auto_run, monkeypatch):
    store, run = auto_run
    _converged_rule(monkeypatch)
    anneals, _ = _events(run, "anneal")
    e = anneals[0][0] + 1  # the checkpoint of this epoch holds a window in progress
    if e >= max(run.epochs()):
        pytest.skip("the first annealing started in the last epoch")
    child = fork(store, run.run_id, e, progress=False)
    pf, _ = _events(run, "freeze")
    cf, _ = _events(child, "freeze")
    assert cf == [(k, a) for k, a in pf if k > e]
    for k in range(e + 1, max(run.epochs()) + 1):
        for layer in run.epoch(k).conv_layers:
            np.testing.assert_array_equal(child.epoch(k).layer(layer).kernel, run.epoch(k).layer(layer).kernel)
