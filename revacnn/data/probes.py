"""Choosing subsets of a labelled split: the session's probe images and stratified subsamples."""

from __future__ import annotations

import numpy as np

from revacnn.errors import ConfigError

__all__ = ["select_probes", "stratified_subset"]


def _labels(y: np.ndarray, what: str) -> np.ndarray:
    """Return ``y`` as a 1-D integer array, or raise ConfigError."""
    arr = np.asarray(y)
    if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise ConfigError(
            f"Cannot choose {what} from these labels. Received: labels of shape {arr.shape} "
            f"and dtype {arr.dtype} (expected a 1-D array of integer class labels)"
        )
    return arr


def _count(name: str, value: object, available: int, what: str) -> int:
    """Check that ``value`` is an integer from 1 to ``available``; return it as int."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or not 1 <= value <= available:
        raise ConfigError(
            f"Cannot choose {value!r} {what} from {available} images. "
            f"Received: {name}={value!r} (expected an integer from 1 to {available})"
        )
    return int(value)


def select_probes(y: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Pick ``n`` probe images spread over the classes, deterministically per seed.

    Classes are visited round-robin in ascending label order, each turn taking one more
    image of the class (chosen at random, per seed, without repetition); a class that has
    run out of images is skipped. With 10 classes and ``n=16`` classes 0 to 5 get two
    probes and classes 6 to 9 one.

    Args:
        y: labels of the split to pick from (the validation labels), 1-D integers.
        n: number of probes, 1 to ``len(y)``.
        seed: the same ``(y, n, seed)`` always gives the same probes.

    Returns:
        int64 indices into ``y``, sorted by class, then by index.

    Raises:
        ConfigError: ``n`` is not an integer from 1 to ``len(y)``, or ``y`` is not 1-D
            integer labels.

    Example:
        >>> y = np.repeat(np.arange(10), 5)
        >>> idx = select_probes(y, 16, seed=0)
        >>> np.bincount(y[idx]).tolist()
        [2, 2, 2, 2, 2, 2, 1, 1, 1, 1]
    """
    labels = _labels(y, "probes")
    n = _count("n", n, labels.size, "probes")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    picks, ranks, cls_pos = [], [], []
    for pos, c in enumerate(classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        picks.append(members)
        ranks.append(np.arange(members.size))
        cls_pos.append(np.full(members.size, pos))
    pick, rank, pos_ = (np.concatenate(a) for a in (picks, ranks, cls_pos))
    chosen = pick[np.lexsort((pos_, rank))[:n]]  # round k of every class before round k + 1
    return chosen[np.lexsort((chosen, labels[chosen]))].astype(np.int64)


def stratified_subset(
    y: np.ndarray, size: int, seed: int | tuple[int, ...] = 0, *, what: str = "images"
) -> np.ndarray:
    """Pick ``size`` indices whose class proportions match those of ``y``.

    Each class gets ``size * class_count / len(y)`` images, rounded by largest remainder
    (ties to the lower label), chosen at random per seed.

    Args:
        y: 1-D integer labels.
        size: number of indices, 1 to ``len(y)``.
        seed: an integer or a tuple of integers (e.g. ``(seed, stream)``); the same
            ``(y, size, seed)`` always gives the same subset.
        what: how error messages name the items (e.g. ``"training images"``).

    Returns:
        int64 indices into ``y``, sorted ascending (the subset keeps the split's order).

    Raises:
        ConfigError: ``size`` is not an integer from 1 to ``len(y)``.

    Example:
        >>> y = np.array([0] * 80 + [1] * 20)
        >>> idx = stratified_subset(y, 10, seed=0)
        >>> np.bincount(y[idx]).tolist()
        [8, 2]
    """
    labels = _labels(y, what)
    size = _count("size", size, labels.size, what)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = size * counts / labels.size
    quota = np.floor(exact).astype(np.int64)
    short = size - int(quota.sum())
    if short:
        order = np.lexsort((np.arange(classes.size), -(exact - quota)))
        quota[order[:short]] += 1
    chosen = [
        rng.choice(np.flatnonzero(labels == c), size=q, replace=False)
        for c, q in zip(classes, quota, strict=True)
        if q
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)
