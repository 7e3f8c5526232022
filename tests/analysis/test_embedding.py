"""Tests of revacnn.analysis.embedding: stable, uid-keyed t-SNE tracks and Procrustes alignment."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes

from revacnn.analysis import EmbeddingTracker, procrustes_align
from revacnn.errors import ConfigError


def _rms_radius(points: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.sum((points - points.mean(axis=0)) ** 2, axis=1))))


def _displacement(before: np.ndarray, after: np.ndarray) -> float:
    """Mean distance a point moves from `before` to `after` once `after` is optimally rotated,
    reflected, scaled and translated onto `before` (SciPy's Procrustes, not ours), in units of
    `before`'s RMS radius."""
    a = np.asarray(before, dtype=np.float64)
    b = np.asarray(after, dtype=np.float64)
    a0, b0 = a - a.mean(axis=0), b - b.mean(axis=0)
    rot, sv_sum = orthogonal_procrustes(b0, a0)
    b_aligned = b0 @ rot * (sv_sum / np.sum(b0**2)) + a.mean(axis=0)
    return float(np.mean(np.linalg.norm(b_aligned - a, axis=1)) / _rms_radius(a))


def _drifting_features(n: int, dim: int, epochs: int, step: float, seed: int) -> list[np.ndarray]:
    """A stand-in for training: 5 groups of filters, each epoch adds a little noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, dim))
    x = centres[np.arange(n) % 5] + 0.7 * rng.normal(size=(n, dim))
    out = [x]
    for _ in range(epochs - 1):
        out.append(out[-1] + step * rng.normal(size=(n, dim)))
    return out


# ---------------------------------------------------------------- Procrustes


def test_procrustes_recovers_rotation_reflection_translation() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(30, 2))
    angle = 1.1
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    reflect = np.array([[1.0, 0.0], [0.0, -1.0]])
    moving = ref @ rot @ reflect + np.array([3.0, -7.0])
    np.testing.assert_allclose(procrustes_align(moving, ref), ref, atol=1e-10)
    np.testing.assert_allclose(procrustes_align(2.5 * moving, ref, scale=True), ref, atol=1e-10)
    # the transform fitted on a subset moves the whole set
    extra = rng.normal(size=(5, 2))
    whole = np.vstack([moving, extra @ rot @ reflect + np.array([3.0, -7.0])])
    aligned = procrustes_align(moving, ref, moving_all=whole)
    np.testing.assert_allclose(aligned[30:], extra, atol=1e-10)


def test_procrustes_degenerate_cases() -> None:
    ref = np.array([[1.0, 2.0]])
    np.testing.assert_allclose(procrustes_align(np.array([[5.0, 5.0]]), ref), ref)
    empty = np.zeros((0, 2))
    pts = np.ones((3, 2))
    np.testing.assert_array_equal(procrustes_align(empty, empty, moving_all=pts), pts)
    with pytest.raises(ConfigError):
        procrustes_align(np.ones((3, 2)), np.ones((4, 2)))


# ---------------------------------------------------------------- stability


@pytest.mark.parametrize(("n", "dim"), [(20, 27), (64, 144)])
def test_tracks_are_far_more_stable_than_independent_runs(n: int, dim: int) -> None:
    from openTSNE import TSNE

    feats = _drifting_features(n, dim, epochs=6, step=0.05, seed=n)
    tracker = EmbeddingTracker(seed=0)
    uids = np.arange(100, 100 + n)
    layouts = [tracker.embed("conv", uids, x) for x in feats]
    tracked = np.mean([_displacement(a, b) for a, b in zip(layouts[:-1], layouts[1:], strict=True)])

    # Reference: independent t-SNE runs (openTSNE's own, random initialisation) with different
    # seeds on consecutive epochs' features, as one gets without tracking.
    def fresh(x: np.ndarray, seed: int) -> np.ndarray:
        tsne = TSNE(
            perplexity=min(30.0, (n - 1) / 3),
            initialization="random",
            random_state=seed,
            n_jobs=1,
            negative_gradient_method="bh",
            n_iter=300,
        )
        return np.asarray(tsne.fit(x))

    independent = np.mean(
        [_displacement(fresh(feats[e], e), fresh(feats[e + 1], e + 50)) for e in range(2)]
    )
    assert np.isfinite(tracked) and np.isfinite(independent)
    print(
        f"F={n}: tracked {tracked:.3f}, independent {independent:.3f}, "
        f"ratio {independent / tracked:.1f}"
    )
    assert independent / tracked > 3.0, (tracked, independent)


def test_track_keeps_its_scale_and_does_not_flip() -> None:
    feats = _drifting_features(30, 27, epochs=8, step=0.02, seed=3)
    tracker = EmbeddingTracker(seed=1)
    layouts = [tracker.embed("conv1", np.arange(30), x) for x in feats]
    radii = [_rms_radius(p) for p in layouts]
    assert max(radii) / min(radii) < 1.05
    # raw positions (no further alignment) stay put: the track is already aligned
    first, last = layouts[0], layouts[-1]
    raw = np.mean(np.linalg.norm(last - first, axis=1)) / radii[0]
    assert raw < 0.25


# ---------------------------------------------------------------- uids


def test_added_and_removed_filters_keep_their_identity() -> None:
    rng = np.random.default_rng(5)
    x0 = _drifting_features(16, 27, epochs=1, step=0.0, seed=5)[0]
    uids0 = np.arange(16)
    tracker = EmbeddingTracker(seed=0)
    pos0 = tracker.embed("conv1", uids0, x0)

    # delete uids 3 and 9, add 16 (a copy of 5), 17 (a copy of 12, no parent given), 18 (fresh)
    keep = np.array([u for u in uids0 if u not in (3, 9)])
    x1 = np.vstack(
        [
            x0[keep],
            x0[5] + 0.01 * rng.normal(size=27),
            x0[12] + 0.01 * rng.normal(size=27),
            rng.normal(size=27),
        ]
    )
    uids1 = np.concatenate([keep, [16, 17, 18]])
    pos1 = tracker.embed("conv1", uids1, x1, parents={16: 5})
    assert pos1.shape == (17, 2) and pos1.dtype == np.float32
    assert np.isfinite(pos1).all()
    radius = _rms_radius(pos0)
    row = {int(u): i for i, u in enumerate(uids1)}
    # copies end next to their origin, whether or not the parent was named
    assert np.linalg.norm(pos1[row[16]] - pos1[row[5]]) < 0.3 * radius
    assert np.linalg.norm(pos1[row[17]] - pos1[row[12]]) < 0.3 * radius
    # Survivors stay near where they were (the track is aligned on them). Deleting 2 and adding
    # 3 of 16 filters changes their neighbourhoods, so some motion is right: measured 0.13-0.32
    # radii over seeds and keys, where an independent t-SNE run of the new features, optimally
    # aligned, moves them 0.25-0.65 radii and a flipped or rotated picture about 1.4.
    moved = float(np.mean(np.linalg.norm(pos1[: len(keep)] - pos0[keep], axis=1))) / radius
    assert moved < 0.4
    state = tracker.state_dict()["tracks"]["conv1"]
    assert state["uids"] == [int(u) for u in uids1]


def test_state_dict_round_trip_gives_identical_results() -> None:
    feats = _drifting_features(12, 18, epochs=4, step=0.05, seed=7)
    uids = np.arange(12)
    original = EmbeddingTracker(seed=4)
    original.embed("conv1", uids, feats[0])
    original.embed("conv1", uids, feats[1])
    original.embed("__all__", uids + 1000, feats[1][:, :6])

    restored = EmbeddingTracker(seed=999)  # the state carries the seed
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert restored.state_dict() == original.state_dict()
    uids2 = np.concatenate([uids[1:], [12]])
    x2 = np.vstack([feats[2][1:], feats[2][0]])
    a = original.embed("conv1", uids2, x2, parents={12: 0})
    b = restored.embed("conv1", uids2, x2, parents={12: 0})
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        original.embed("conv1", uids2, feats[3][:12]), restored.embed("conv1", uids2, feats[3][:12])
    )


def test_deterministic_and_reset() -> None:
    feats = _drifting_features(10, 9, epochs=3, step=0.05, seed=2)
    runs = []
    for _ in range(2):
        tracker = EmbeddingTracker(seed=3)
        runs.append([tracker.embed("k", np.arange(10), x) for x in feats])
    for a, b in zip(*runs, strict=True):
        np.testing.assert_array_equal(a, b)
    tracker = EmbeddingTracker(seed=3)
    tracker.embed("k", np.arange(10), feats[0])
    tracker.embed("other", np.arange(10), feats[0])
    tracker.reset("k")
    assert tracker.keys() == ["other"]
    np.testing.assert_array_equal(
        tracker.embed("k", np.arange(10), feats[1]),
        EmbeddingTracker(seed=3).embed("k", np.arange(10), feats[1]),
    )
    tracker.reset()
    assert tracker.keys() == []


# ---------------------------------------------------------------- small and odd inputs


@pytest.mark.parametrize("n", [3, 4, 5])
def test_small_layers(n: int) -> None:
    rng = np.random.default_rng(n)
    tracker = EmbeddingTracker()
    x = rng.normal(size=(n, 27))
    for _ in range(3):
        pos = tracker.embed("conv1", np.arange(n), x)
        x = x + 0.05 * rng.normal(size=x.shape)
        assert pos.shape == (n, 2) and np.isfinite(pos).all()
        gaps = np.linalg.norm(pos[:, None] - pos[None], axis=-1)[np.triu_indices(n, 1)]
        assert gaps.min() > 1e-3 * gaps.max()  # distinct points, not collapsed


def test_fewer_than_three_filters_get_a_line() -> None:
    tracker = EmbeddingTracker()
    assert tracker.embed("a", np.array([], dtype=int), np.zeros((0, 4))).shape == (0, 2)
    one = tracker.embed("b", [7], np.ones((1, 4)))
    np.testing.assert_array_equal(one, [[0.0, 0.0]])
    two = tracker.embed("c", [1, 2], np.eye(2, 4))
    assert two.shape == (2, 2) and two[0, 1] == two[1, 1] and two[0, 0] != two[1, 0]
    # a track shrinking below 3 filters and growing again keeps working
    x = np.random.default_rng(0).normal(size=(6, 8))
    tracker.embed("d", np.arange(6), x)
    shrunk = tracker.embed("d", [2, 4], x[[2, 4]])
    grown = tracker.embed("d", np.arange(6), x)
    assert np.isfinite(shrunk).all() and np.isfinite(grown).all()


def test_identical_features_do_not_break() -> None:
    tracker = EmbeddingTracker()
    for _ in range(2):
        pos = tracker.embed("dead", np.arange(8), np.zeros((8, 27)))
        assert np.isfinite(pos).all()


def test_bad_inputs_raise_config_error() -> None:
    tracker = EmbeddingTracker()
    x = np.random.default_rng(0).normal(size=(6, 9))
    with pytest.raises(ConfigError, match="6 feature rows"):
        tracker.embed("k", np.arange(5), x)
    with pytest.raises(ConfigError, match="unique"):
        tracker.embed("k", [0, 1, 2, 3, 4, 4], x)
    with pytest.raises(ConfigError, match="integers"):
        tracker.embed("k", np.linspace(0, 1, 6), x)
    bad = x.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ConfigError, match="non-finite"):
        tracker.embed("k", np.arange(6), bad)
    assert tracker.keys() == []  # a refused call leaves no track behind
    with pytest.raises(ConfigError):
        tracker.load_state_dict({"version": 1, "seed": 0, "tracks": {"k": {"uids": [1, 1]}}})
    with pytest.raises(ConfigError):
        tracker.load_state_dict({"nothing": True})
    with pytest.raises(ConfigError):
        EmbeddingTracker(warm_iter=0)


# ---------------------------------------------------------------- the exact, batched optimiser


def _openTSNE_affinities(x: np.ndarray):
    """openTSNE's own affinities on exact neighbours (its `PerplexityBasedNN`), as the tracker asks."""
    from openTSNE.affinity import PerplexityBasedNN
    from openTSNE.nearest_neighbors import PrecomputedNeighbors
    from scipy.spatial.distance import cdist

    n = len(x)
    perplexity = float(min(30.0, max(min(2.0, 0.75 * (n - 1)), (n - 1) / 3.0)))
    k = int(min(n - 1, int(3 * perplexity)))
    dist = cdist(x, x)
    np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    knn = PrecomputedNeighbors(order, np.take_along_axis(dist, order, axis=1))
    return PerplexityBasedNN(perplexity=perplexity, knn_index=knn, n_jobs=1, verbose=False)


@pytest.mark.parametrize("n", [5, 16, 64])
def test_exact_affinities_and_gradient_equal_openTSNE(n: int) -> None:
    """The numpy path's P is openTSNE's, its gradient openTSNE's exact (theta = 0) Barnes-Hut one."""
    from openTSNE.tsne import kl_divergence_bh

    from revacnn.analysis.embedding import _exact_gradient, _joint_probabilities

    rng = np.random.default_rng(n)
    xs = [rng.normal(size=(n, 12)) for _ in range(3)]
    ys = rng.normal(size=(3, n, 2))
    ours = np.stack([_joint_probabilities(x) for x in xs])
    grads = _exact_gradient(ys, ours)
    for x, y, p, g in zip(xs, ys, ours, grads, strict=True):
        ref = _openTSNE_affinities(x).P
        np.testing.assert_allclose(p, ref.toarray(), rtol=1e-12, atol=1e-15)
        _, ref_grad = kl_divergence_bh(np.ascontiguousarray(y), ref, 1, {"theta": 0.0})
        np.testing.assert_allclose(g, ref_grad, rtol=1e-9, atol=1e-12 * np.abs(ref_grad).max())


def test_exact_descent_follows_openTSNE() -> None:
    """Early exaggeration then normal iterations track openTSNE's own optimiser run at theta = 0."""
    from openTSNE import TSNEEmbedding

    from revacnn.analysis.embedding import _EARLY_EXAGGERATION, _exact_descent

    n = 24
    x = _drifting_features(n, 27, epochs=1, step=0.0, seed=11)[0]
    aff = _openTSNE_affinities(x)
    # (from a unit-scale start: at openTSNE's 1e-4 its quadtree and ours part at ~1e-12 after
    # ~10 iterations, and the gains' sign test then amplifies that)
    init = np.random.default_rng(0).normal(0.0, 1.0, size=(n, 2))
    emb = TSNEEmbedding(init.copy(), aff, negative_gradient_method="bh", theta=0.0, n_jobs=1, verbose=False)
    emb = emb.optimize(80, exaggeration=_EARLY_EXAGGERATION, momentum=0.8, inplace=True)
    emb = emb.optimize(80, momentum=0.8, inplace=True)
    ours = _exact_descent(aff.P.toarray()[None], init[None].copy(), [(_EARLY_EXAGGERATION, 80), (1.0, 80)])[0]
    scale = _rms_radius(np.asarray(emb))
    assert scale > 1.0  # the layout did unfold: the comparison is not between two specks
    np.testing.assert_allclose(ours, np.asarray(emb), atol=1e-9 * scale)


def test_embed_many_equals_one_embed_per_track() -> None:
    """A batched epoch (tracks of equal and unequal sizes, cold and warm) gives each track's `embed`."""
    rng = np.random.default_rng(21)
    sizes = {"a": 16, "b": 16, "c": 32, "d": 2, "e": 300}
    feats = {k: _drifting_features(n, 18, epochs=3, step=0.05, seed=i) for i, (k, n) in enumerate(sizes.items())}
    one, many = EmbeddingTracker(seed=5), EmbeddingTracker(seed=5)
    for epoch in range(3):
        items = [(k, np.arange(n), feats[k][epoch], None) for k, n in sizes.items()]
        if epoch == 2:  # a new filter with a parent in track "a"
            x = np.vstack([feats["a"][2], feats["a"][2][3] + 0.01 * rng.normal(size=18)])
            items[0] = ("a", np.arange(17), x, {16: 3})
        batched = many.embed_many(items)
        for (k, uids, x, parents), got in zip(items, batched, strict=True):
            np.testing.assert_array_equal(got, one.embed(k, uids, x, parents=parents))
    assert many.state_dict()["tracks"].keys() == one.state_dict()["tracks"].keys()
    with pytest.raises(ConfigError, match="more than once"):
        many.embed_many([("a", np.arange(3), np.eye(3), None), ("a", np.arange(3), np.eye(3), None)])
