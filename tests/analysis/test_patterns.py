"""Tests of revacnn.analysis.patterns: cluster score and RGB measures on constructed kernels."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from revacnn.analysis import (
    FEATURE_KINDS,
    MONO_THRESHOLD,
    activation_signature,
    cluster_score,
    dominant_channel,
    filter_features,
    rgb_mono_fraction,
    rgb_shares,
)
from revacnn.errors import ConfigError

RNG_SEED = 1234


def _orthonormal_rows(n: int, dim: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, n)))
    return q.T  # (n, dim), rows orthonormal


# ---------------------------------------------------------------- cluster_score


def test_identical_filters_score_one() -> None:
    base = np.random.default_rng(RNG_SEED).normal(size=(3, 3, 3))
    kernel = np.stack([base] * 16)
    assert cluster_score(kernel.reshape(16, -1)) == pytest.approx(1.0, abs=1e-9)


def test_near_identical_filters_score_high() -> None:
    rng = np.random.default_rng(RNG_SEED)
    base = rng.normal(size=27)
    filters = base + 0.1 * rng.normal(size=(32, 27))  # 10 % noise around one filter
    assert cluster_score(filters) > 0.8


def test_orthogonal_filters_score_low() -> None:
    filters = _orthonormal_rows(16, 27, RNG_SEED) * np.linspace(0.5, 3.0, 16)[:, None]
    assert cluster_score(filters) < 0.2
    assert cluster_score(filters) == pytest.approx(0.0, abs=1e-9)  # every cosine is 0


@pytest.mark.parametrize(("n", "dim"), [(16, 27), (64, 27), (128, 288)])
def test_random_filters_score_low(n: int, dim: int) -> None:
    # i.i.d. random directions, also more filters than dimensions (64 > 27): chance level ~ 0.
    filters = np.random.default_rng(RNG_SEED + n).normal(size=(n, dim))
    assert cluster_score(filters) < 0.2


def test_k_orthogonal_clusters_match_the_closed_form() -> None:
    # k tight clusters of equal size along orthogonal directions: mean squared cosine over
    # distinct pairs is (F/k - 1) / (F - 1); chance-corrected with 1/D.
    n, dim = 24, 27
    for k in (1, 2, 3, 4):
        dirs = _orthonormal_rows(k, dim, RNG_SEED)
        filters = np.repeat(dirs, n // k, axis=0)
        mean_sq = (n / k - 1) / (n - 1)
        expected = (mean_sq - 1 / dim) / (1 - 1 / dim)
        assert cluster_score(filters) == pytest.approx(expected, abs=1e-9)
    # "one or a few clusters" is high, many is low
    assert cluster_score(np.repeat(_orthonormal_rows(2, dim, 0), 12, axis=0)) > 0.4


def test_cluster_score_ignores_scale_and_sign_of_filters() -> None:
    rng = np.random.default_rng(RNG_SEED)
    base = rng.normal(size=27)
    filters = base + 0.3 * rng.normal(size=(20, 27))
    scaled = filters * (rng.uniform(0.1, 10.0, size=20) * rng.choice([-1.0, 1.0], 20))[:, None]
    assert cluster_score(scaled) == pytest.approx(cluster_score(filters), abs=1e-12)


def test_cluster_score_edge_cases() -> None:
    assert cluster_score(np.ones((1, 27))) == 0.0
    assert cluster_score(np.zeros((0, 27))) == 0.0
    assert cluster_score(np.zeros((8, 27))) == 1.0  # dead, all-zero filters are identical
    # two of four filters dead: the (dead, dead) pair is identical, every other pair unrelated
    dim = 27
    filters = np.zeros((4, dim))
    filters[0, 0] = filters[1, 1] = 1.0
    mean_sq = 2 / 12  # 2 of the 4 * 3 ordered pairs have squared cosine 1
    assert cluster_score(filters) == pytest.approx((mean_sq - 1 / dim) / (1 - 1 / dim))
    # the flattened kernel and the 4-D kernel give the same score
    kernel = np.random.default_rng(0).normal(size=(8, 3, 3, 2))
    assert cluster_score(kernel) == cluster_score(kernel.reshape(8, -1))


def test_cluster_score_rejects_nan() -> None:
    filters = np.ones((4, 9))
    filters[2, 3] = np.nan
    with pytest.raises(ConfigError, match="non-finite"):
        cluster_score(filters)


# ---------------------------------------------------------------- RGB


def test_single_channel_filters_are_mono() -> None:
    rng = np.random.default_rng(RNG_SEED)
    kernel = np.zeros((12, 3, 3, 3))
    for f in range(12):
        kernel[f, :, :, f % 3] = rng.normal(size=(3, 3))
    assert rgb_mono_fraction(kernel) == 1.0
    assert dominant_channel(rgb_shares(kernel)).tolist() == [f % 3 for f in range(12)]


def test_equal_energy_filters_are_not_mono() -> None:
    rng = np.random.default_rng(RNG_SEED)
    kernel = np.zeros((12, 3, 3, 3))
    for f in range(12):
        pattern = rng.normal(size=(3, 3))
        # different spatial patterns per channel, but the same energy in each
        kernel[f, :, :, 0] = pattern
        kernel[f, :, :, 1] = -pattern
        kernel[f, :, :, 2] = pattern.T
    assert rgb_mono_fraction(kernel) == 0.0
    np.testing.assert_allclose(rgb_shares(kernel), 1 / 3)
    assert (dominant_channel(rgb_shares(kernel)) == -1).all()


def test_rgb_shares_of_a_constructed_kernel() -> None:
    kernel = np.zeros((3, 3, 3, 3))
    kernel[0, ..., 0], kernel[0, ..., 1], kernel[0, ..., 2] = 1.0, 2.0, 3.0  # energies 9, 36, 81
    kernel[1, 0, 0, 1] = -5.0  # all energy in G
    # filter 2 is all zero
    shares = rgb_shares(kernel)
    np.testing.assert_allclose(shares[0], np.array([9, 36, 81]) / 126)
    np.testing.assert_allclose(shares[1], [0, 1, 0])
    np.testing.assert_allclose(shares[2], [1 / 3] * 3)
    random_kernel = np.random.default_rng(0).normal(size=(32, 5, 5, 3))
    np.testing.assert_allclose(rgb_shares(random_kernel).sum(axis=1), 1.0)
    assert (rgb_shares(random_kernel) >= 0).all()


def test_dominant_channel_threshold() -> None:
    shares = np.array(
        [
            [MONO_THRESHOLD, (1 - MONO_THRESHOLD) / 2, (1 - MONO_THRESHOLD) / 2],
            [0.1, 0.6, 0.3],
            [0.05, 0.05, 0.9],
        ]
    )
    assert dominant_channel(shares).tolist() == [0, -1, 2]
    assert dominant_channel(shares, threshold=0.55).tolist() == [0, 1, 2]
    for bad in (0.5, 0.3, 1.2):
        with pytest.raises(ConfigError, match="threshold"):
            dominant_channel(shares, threshold=bad)
    with pytest.raises(ConfigError):
        dominant_channel(np.ones((4, 2)) / 2)


def test_threshold_rarely_fires_at_initialisation() -> None:
    # Glorot-uniform-like i.i.d. initial weights: single-channel filters must be rare by chance.
    kernel = np.random.default_rng(RNG_SEED).uniform(-1, 1, size=(512, 3, 3, 3))
    assert rgb_mono_fraction(kernel) < 0.02
    assert 0.5 < MONO_THRESHOLD < 1.0


def test_mixed_layer_fraction() -> None:
    kernel = np.ones((10, 3, 3, 3))
    kernel[:3, :, :, 1:] = 0.0  # three red-only filters
    kernel[3, :, :, 2] = 0.0  # red + green: not mono
    assert rgb_mono_fraction(kernel) == pytest.approx(0.3)


def test_rgb_rejects_non_rgb_and_nan() -> None:
    with pytest.raises(ConfigError, match="3 input channels"):
        rgb_shares(np.ones((4, 3, 3, 16)))
    kernel = np.ones((4, 3, 3, 3))
    kernel[0, 0, 0, 0] = np.inf
    with pytest.raises(ConfigError, match="non-finite"):
        rgb_mono_fraction(kernel)
    assert rgb_mono_fraction(np.zeros((0, 3, 3, 3))) == 0.0


# ---------------------------------------------------------------- features


def test_activation_signature_is_mean_per_probe() -> None:
    n_probes, n_filters = 5, 7
    acts = np.zeros((n_probes, n_filters, 4, 6))
    for p in range(n_probes):
        for f in range(n_filters):
            acts[p, f] = 10 * p + f
    acts[:, :, 0, 0] += 24.0  # one pixel of 24 raises the mean of 24 pixels by 1
    sig = activation_signature(acts)
    assert sig.shape == (n_filters, n_probes)
    expected = np.array([[10 * p + f + 1 for p in range(n_probes)] for f in range(n_filters)])
    np.testing.assert_allclose(sig, expected)
    with pytest.raises(ConfigError):
        activation_signature(np.ones((5, 7, 4)))


def test_filter_features_kinds() -> None:
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(6, 3, 3, 4))
    feats = filter_features("weights", kernel=kernel)
    assert feats.shape == (6, 36)
    np.testing.assert_array_equal(feats[2], kernel[2].ravel())
    grad = rng.normal(size=(6, 3, 3, 4))
    np.testing.assert_array_equal(filter_features("gradients", grad=grad)[5], grad[5].ravel())
    acts = rng.normal(size=(16, 6, 8, 8))
    assert filter_features("activations", activations=acts).shape == (6, 16)
    assert set(FEATURE_KINDS) == {"weights", "activations", "gradients"}


def test_filter_features_errors_name_the_choices() -> None:
    with pytest.raises(ConfigError) as err:
        filter_features("pixels", kernel=np.ones((2, 3, 3, 3)))
    for kind in ("weights", "activations", "gradients"):
        assert kind in str(err.value)
    with pytest.raises(ConfigError, match="kernel"):
        filter_features("weights", activations=np.ones((2, 2, 2, 2)))


def test_analysis_does_not_import_tensorflow() -> None:
    # Statically: no module of the package imports TensorFlow or Keras (openTSNE is imported
    # lazily, inside the embedding call) ...
    import revacnn.analysis as analysis

    for path in Path(analysis.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not [n for n in names if n.split(".")[0] in ("tensorflow", "keras")], path
    # ... and at run time, in a fresh interpreter.
    code = (
        "import sys, numpy as np, revacnn.analysis as a\n"
        "a.cluster_score(np.eye(4)); a.rgb_mono_fraction(np.ones((2, 3, 3, 3)))\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
