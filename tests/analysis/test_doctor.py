"""The filter doctor on constructed cases: each diagnosis fires where it should and nowhere else."""

from __future__ import annotations

import numpy as np
import pytest

from revacnn.analysis.doctor import (
    REDUNDANT_COSINE,
    LayerArrays,
    diagnose_layer,
    linear_cka,
    relative_change,
)


def _relu_acts(kernel, bias, images):
    """Post-ReLU outputs of a 'valid' conv of ``images`` (P, H, W, C) -> (P, F, H', W')."""
    f, kh, kw, _ = kernel.shape
    p, h, w, _ = images.shape
    out = np.zeros((p, f, h - kh + 1, w - kw + 1))
    for y in range(h - kh + 1):
        for x in range(w - kw + 1):
            patch = images[:, y:y + kh, x:x + kw, :]
            out[:, :, y, x] = np.einsum("phwc,fhwc->pf", patch, kernel) + bias
    return np.maximum(out, 0.0)


@pytest.fixture
def healthy():
    rng = np.random.default_rng(0)
    k = rng.normal(0, 0.3, (8, 3, 3, 3))
    b = rng.normal(0, 0.05, 8)
    images = rng.normal(0, 1, (16, 8, 8, 3))  # standardized floats, as users feed them
    return k, b, images, rng


def _kinds(found):
    return sorted((d.kind, d.filter_uid) for d in found)


def test_healthy_layer_has_no_findings(healthy):
    k, b, images, rng = healthy
    acts = _relu_acts(k, b, images)
    grads = rng.uniform(1, 2, 8)
    found = diagnose_layer(LayerArrays("conv1", k, b, acts, grads, list(range(8)),
                                       init_kernel=k + rng.normal(0, 0.1, k.shape), sees_rgb=True))
    assert found == []


def test_large_negative_bias_reads_dead(healthy):
    k, b, images, rng = healthy
    b = b.copy()
    b[5] = -1e3  # killed: ReLU output 0 everywhere, so its gradient is 0 too
    acts = _relu_acts(k, b, images)
    grads = rng.uniform(1, 2, 8)
    grads[5] = 0.0
    uids = [10, 11, 12, 13, 14, 15, 16, 17]
    found = diagnose_layer(LayerArrays("conv1", k, b, acts, grads, uids))
    assert _kinds(found) == [("dead", 15)]
    d = found[0]
    assert d.filter == 5 and d.score == pytest.approx(1.0)
    assert d.suggestion == {"op": "reinit-filters", "args": {"layer": "conv1", "indices": [5]},
                            "filter_uids": [15]}


def test_silent_filter_that_still_gets_gradient_is_not_dead(healthy):
    k, b, images, rng = healthy
    b = b.copy()
    b[5] = -1e3
    acts = _relu_acts(k, b, images)
    grads = rng.uniform(1, 2, 8)  # training examples other than the probes still reach it
    assert diagnose_layer(LayerArrays("conv1", k, b, acts, grads, list(range(8)))) == []


def test_equal_filters_read_redundant_and_name_the_other(healthy):
    k, b, images, rng = healthy
    k = k.copy()
    b = b.copy()
    k[6], b[6] = k[2], b[2]
    acts = _relu_acts(k, b, images)
    found = diagnose_layer(LayerArrays("conv2", k, b, acts, rng.uniform(1, 2, 8), list(range(8))))
    assert _kinds(found) == [("redundant", 6)]
    assert found[0].suggestion["duplicate_of"] == 2
    assert found[0].suggestion["op"] == "delete-filters"
    assert found[0].score >= REDUNDANT_COSINE


def test_a_layer_frozen_by_hand_reads_converged_and_a_training_one_does_not(healthy):
    k, b, images, rng = healthy
    acts = _relu_acts(k, b, images)
    frozen = LayerArrays("conv1", k, b, acts, rng.uniform(1, 2, 8), list(range(8)),
                         prev_kernel=k.copy(), prev_activations=acts.copy(), frozen=True)
    found = diagnose_layer(frozen)
    assert _kinds(found) == [("converged", None)]
    assert found[0].suggestion is None  # already frozen
    unfrozen = LayerArrays("conv1", k, b, acts, rng.uniform(1, 2, 8), list(range(8)),
                           prev_kernel=k.copy(), prev_activations=acts.copy())
    assert diagnose_layer(unfrozen)[0].suggestion == {"op": "freeze", "args": {"layer": "conv1"}}
    k2 = k + rng.normal(0, 0.1, k.shape)  # a third of the norm in one epoch: still learning
    moving = LayerArrays("conv1", k2, b, _relu_acts(k2, b, images), rng.uniform(1, 2, 8),
                         list(range(8)), prev_kernel=k, prev_activations=acts)
    assert diagnose_layer(moving) == []


def test_converged_is_judged_against_the_layers_own_peak_change(healthy):
    k, b, images, rng = healthy
    acts = _relu_acts(k, b, images)
    step = rng.normal(0, 1, k.shape)
    step *= 0.01 * np.linalg.norm(k) / np.linalg.norm(step)  # a 1 % move of the weights
    k2 = k + step
    acts2 = _relu_acts(k2, b, images)
    assert linear_cka(acts2, acts) > 0.99

    def judge(peak):
        return diagnose_layer(LayerArrays("conv1", k2, b, acts2, rng.uniform(1, 2, 8), list(range(8)),
                                          prev_kernel=k, prev_activations=acts, peak_change=peak))

    assert _kinds(judge(0.10)) == [("converged", None)]  # 10 % of the peak: it stopped moving
    assert judge(0.02) == []  # half of the peak: still learning
    assert judge(None) == []  # no history: nothing to compare with


def test_colour_dropped_input_shows_the_rgb_pattern_on_what_training_changed(healthy):
    k0, b, images, rng = healthy
    # G and B zeroed in the input: their gradients are exactly 0, so only R weights move,
    # while the kernel itself keeps its (isotropic) initial energy in G and B.
    delta = np.zeros_like(k0)
    delta[..., 0] = rng.normal(0, 0.5, delta[..., 0].shape)
    k = k0 + delta
    found = diagnose_layer(LayerArrays("conv1", k, b, None, None, list(range(8)),
                                       init_kernel=k0, sees_rgb=True))
    assert _kinds(found) == [("rgb_pattern", None)]
    assert found[0].score == 1.0
    # a layer that does not see RGB is not judged
    assert diagnose_layer(LayerArrays("conv2", k, b, None, None, list(range(8)),
                                      init_kernel=k0, sees_rgb=False)) == []


def test_collapsed_filters_show_the_cluster_pattern_with_a_lower_lr(healthy):
    k, b, images, rng = healthy
    direction = rng.normal(0, 1, (3, 3, 3))
    collapsed = direction[None] * rng.uniform(0.5, 2, (8, 1, 1, 1)) + rng.normal(0, 0.05, k.shape)
    found = diagnose_layer(LayerArrays("conv2", collapsed, None, None, None, list(range(8)), lr=0.03))
    kinds = {d.kind for d in found}
    assert "cluster_pattern" in kinds
    d = next(d for d in found if d.kind == "cluster_pattern")
    assert d.suggestion == {"op": "set-lr", "args": {"lr": pytest.approx(0.003)}}


def test_diverged_weights_give_no_findings(healthy):
    k, b, images, rng = healthy
    k = k.copy()
    k[0, 0, 0, 0] = np.nan
    assert diagnose_layer(LayerArrays("conv1", k, b, None, None, list(range(8)))) == []


def test_linear_cka_and_relative_change_against_their_definitions():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, 30))
    y = rng.normal(size=(12, 20))
    # reference: the feature-space formula ||Y^T X||^2 / (||X^T X|| ||Y^T Y||) on centred data
    xc, yc = x - x.mean(0), y - y.mean(0)
    ref = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert linear_cka(x, y) == pytest.approx(ref, rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(30, 30)))
    assert linear_cka(x, 5 * x @ q) == pytest.approx(1.0)  # invariant to rotation and scale
    assert relative_change(np.ones(4) * 1.1, np.ones(4)) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="same examples"):
        linear_cka(x, y[:5])
