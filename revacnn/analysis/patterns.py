"""Pattern measures on filter arrays: cluster score, RGB channel shares, and filter features.

Pure numpy: no TensorFlow or Keras, so the trainer's worker thread, the web app and a notebook can
all call these on any kernel. Every function rejects non-finite input (NaN or inf) with a
`ConfigError`: a diverged layer has no meaningful pattern, and the caller records it as missing.
"""

from __future__ import annotations

import numpy as np

from revacnn.errors import ConfigError

__all__ = [
    "FEATURE_KINDS",
    "MONO_THRESHOLD",
    "activation_signature",
    "cluster_score",
    "dominant_channel",
    "filter_features",
    "rgb_mono_fraction",
    "rgb_shares",
]

MONO_THRESHOLD: float = 2.0 / 3.0
"""Share of a filter's weight energy one colour channel must hold for the filter to count as
dominated by it.

Why 2/3: it is half-way between an even split (1/3 each) and a pure single-channel filter (1),
and it means "this channel holds at least twice the energy of the other two together", which is
what a filter that *looks* single-coloured has. It also keeps chance low: at initialisation
(i.i.d. weights) a 3x3 filter passes it with probability 0.03 % (Glorot uniform) to 1.8 %
(Gaussian), a 5x5 filter with < 0.01 %, whereas 0.6 would flag 6.8 % of Gaussian 3x3 filters.
Any threshold above 1/2 makes the dominant channel unique.
"""

FEATURE_KINDS: tuple[str, ...] = ("weights", "activations", "gradients")
"""The filter features `filter_features` can build (and the embeddings can be computed from)."""


def _finite_float(array: np.ndarray, name: str) -> np.ndarray:
    """Return `array` as float64, raising `ConfigError` when it holds NaN or inf."""
    out = np.asarray(array, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        bad = int(np.size(out) - np.count_nonzero(np.isfinite(out)))
        raise ConfigError(
            f"{name} holds {bad} non-finite value(s) (NaN or inf); did the run diverge?"
        )
    return out


def _as_filter_rows(features: np.ndarray, name: str) -> np.ndarray:
    """Return `features` as a finite float64 (F, D) matrix, one row per filter."""
    arr = np.asarray(features)
    if arr.ndim == 0:
        raise ConfigError(f"{name} must have one row per filter, got a scalar")
    arr = arr.reshape(arr.shape[0], int(np.prod(arr.shape[1:], dtype=np.int64)))
    return _finite_float(arr, name)


def cluster_score(features: np.ndarray) -> float:
    """How strongly a layer's filters crowd into one or a few tight clusters, in [0, 1].

    Definition: let ``u_i = f_i / |f_i|`` be the filter directions (rows of `features`, not
    centred) and ``c_ij = <u_i, u_j>`` their cosine similarities. With ``m`` the mean of
    ``c_ij ** 2`` over all pairs ``i != j`` and ``D`` the feature dimension,

        cluster_score = clip((m - 1/D) / (1 - 1/D), 0, 1).

    Why this:

    - It is computed in feature space, so it does not depend on a t-SNE layout or on any seed.
    - It is invariant to each filter's scale (weights grow during training) and to the sign of
      a filter (``w`` and ``-w`` detect the same pattern with opposite polarity).
    - It is chance-corrected: for random directions ``E[c_ij ** 2] = 1/D`` exactly, so random
      (or orthogonal) filters score ~0 whatever ``D`` is, identical filters score 1.
    - It reads as "1 / number of distinct directions": ``m`` equals ``(F/R - 1)/(F - 1)`` where
      ``R = F**2 / sum(c_ij**2)`` is the participation ratio (effective rank) of the Gram matrix.
      ``k`` equal, mutually orthogonal tight clusters score about ``1/k`` (two: ~0.5, four:
      ~0.25), so "one or a few clusters" is high and a diverse layer is low.

    Caveat: filters spread over a low-dimensional subspace without forming clumps also score
    ``~1/dim`` of that subspace; for a layer that is equally a loss of diversity. Compute it on
    signed features such as the flattened weights (or gradients): non-negative features such as
    post-ReLU activation signatures all point into one orthant and score high for any layer.

    All-zero filters have no direction: they count as identical to each other (``c = 1``) and
    unrelated to the others (``c = 0``), so a layer of dead, zeroed filters scores 1. A filter
    counts as zero when its norm is below ``1e-7`` times the largest norm in the layer.

    Args:
        features: (F, D) one row per filter, e.g. the flattened kernel; trailing dimensions
            beyond the first are flattened.

    Returns:
        The score in [0, 1]; 0.0 when there are fewer than 2 filters.

    Raises:
        ConfigError: `features` holds NaN or inf.

    Example:
        >>> import numpy as np
        >>> base = np.random.default_rng(0).normal(size=27)
        >>> round(cluster_score(np.stack([base, 2 * base, -base])), 3)
        1.0
        >>> round(cluster_score(np.eye(16)), 3)
        0.0
    """
    x = _as_filter_rows(features, "features")
    n_filters, dim = x.shape
    if n_filters < 2:
        return 0.0
    if dim <= 1:
        return 1.0  # every filter lies on the same line: one direction (up to sign)
    norms = np.linalg.norm(x, axis=1)
    max_norm = float(norms.max())
    zero = norms <= 1e-7 * max_norm if max_norm > 0 else np.ones(n_filters, dtype=bool)
    units = np.zeros_like(x)
    units[~zero] = x[~zero] / norms[~zero, None]
    gram = units @ units.T
    sq = gram**2
    n_zero = int(zero.sum())
    # Pairs of zero filters: identical (1); zero with non-zero: unrelated (0, already so).
    total = float(sq.sum()) - float(np.trace(sq)) + n_zero * (n_zero - 1)
    mean_sq = total / (n_filters * (n_filters - 1))
    chance = 1.0 / dim
    score = (mean_sq - chance) / (1.0 - chance)
    return float(np.clip(score, 0.0, 1.0))


def rgb_shares(kernel: np.ndarray) -> np.ndarray:
    """Share of each filter's weight energy (sum of squares) in the R, G and B input channels.

    Args:
        kernel: (F, kh, kw, 3) filter-major kernel of a layer that sees RGB input (any shape
            ``(F, ..., 3)`` works: all axes but the first and last are summed).

    Returns:
        (F, 3) float64; each row sums to 1. A filter whose weights are all zero gets 1/3 each.

    Raises:
        ConfigError: the last axis is not 3 channels, or the kernel holds NaN or inf.

    Example:
        >>> import numpy as np
        >>> k = np.zeros((2, 3, 3, 3)); k[0, ..., 0] = 1.0; k[1] = 1.0
        >>> rgb_shares(k).round(3).tolist()
        [[1.0, 0.0, 0.0], [0.333, 0.333, 0.333]]
    """
    arr = np.asarray(kernel)
    if arr.ndim < 2 or arr.shape[-1] != 3:
        raise ConfigError(
            f"rgb_shares needs a filter-major kernel (F, kh, kw, 3) with 3 input channels, "
            f"got shape {arr.shape}"
        )
    per_channel = int(np.prod(arr.shape[1:-1], dtype=np.int64))
    k = _finite_float(arr, "kernel").reshape(arr.shape[0], per_channel, 3)
    energy = np.sum(k**2, axis=1)
    total = energy.sum(axis=1, keepdims=True)
    shares = np.full_like(energy, 1.0 / 3.0)
    nonzero = total[:, 0] > 0
    shares[nonzero] = energy[nonzero] / total[nonzero]
    return shares


def _check_threshold(threshold: float) -> float:
    value = float(threshold)
    if not (0.5 < value <= 1.0):
        raise ConfigError(
            f"the dominance threshold must be in (0.5, 1] so that at most one channel "
            f"dominates, got {threshold!r}"
        )
    return value


def dominant_channel(shares: np.ndarray, threshold: float = MONO_THRESHOLD) -> np.ndarray:
    """The channel (0 = R, 1 = G, 2 = B) that dominates each filter, or -1 for none.

    Args:
        shares: (F, 3) energy shares as returned by `rgb_shares`.
        threshold: minimum share of the dominant channel, in (0.5, 1]; default `MONO_THRESHOLD`.

    Returns:
        (F,) int64: the index of the channel whose share is >= `threshold`, else -1.

    Raises:
        ConfigError: `shares` is not (F, 3), holds NaN, or the threshold is out of range.

    Example:
        >>> import numpy as np
        >>> dominant_channel(np.array([[0.9, 0.05, 0.05], [0.4, 0.3, 0.3]])).tolist()
        [0, -1]
    """
    t = _check_threshold(threshold)
    arr = np.asarray(shares)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ConfigError(f"shares must have shape (F, 3), got {arr.shape}")
    s = _finite_float(arr, "shares")
    best = np.argmax(s, axis=1) if len(s) else np.zeros(0, dtype=np.int64)
    top = s[np.arange(len(s)), best] if len(s) else np.zeros(0)
    return np.where(top >= t, best, -1).astype(np.int64)


def rgb_mono_fraction(kernel: np.ndarray, threshold: float = MONO_THRESHOLD) -> float:
    """Fraction of a layer's filters dominated by a single colour channel.

    ReVACNN's second usage scenario: in the first conv layer, a model whose filters each show a
    single colour channel tends to have low accuracy; a well-trained one uses all three.

    Args:
        kernel: (F, kh, kw, 3) filter-major kernel of a layer that sees RGB input.
        threshold: see `dominant_channel`; default `MONO_THRESHOLD` (2/3).

    Returns:
        A fraction in [0, 1]; 0.0 for a layer without filters.

    Raises:
        ConfigError: the kernel is not RGB, holds NaN or inf, or the threshold is out of range.

    Example:
        >>> import numpy as np
        >>> k = np.zeros((4, 3, 3, 3)); k[:2, ..., 2] = 1.0; k[2:] = 1.0
        >>> rgb_mono_fraction(k)
        0.5
    """
    t = _check_threshold(threshold)
    dom = dominant_channel(rgb_shares(kernel), t)
    return float(np.mean(dom >= 0)) if len(dom) else 0.0


def activation_signature(activations: np.ndarray) -> np.ndarray:
    """Each filter's mean activation on each probe image.

    The signature has one entry per probe whatever the layer's spatial size or depth, so the
    filters of all layers can share one (layer-level) embedding.

    Args:
        activations: (P, F, H, W) outputs of a layer for P probes (filter-major, as stored).

    Returns:
        (F, P) float64: mean over the spatial axes, transposed to one row per filter.

    Raises:
        ConfigError: `activations` is not 4-D or holds NaN or inf.

    Example:
        >>> import numpy as np
        >>> activation_signature(np.ones((16, 8, 5, 5))).shape
        (8, 16)
    """
    arr = np.asarray(activations)
    if arr.ndim != 4:
        raise ConfigError(f"activations must have shape (P, F, H, W), got {arr.shape}")
    return _finite_float(arr, "activations").mean(axis=(2, 3)).T.copy()


def filter_features(
    kind: str,
    *,
    kernel: np.ndarray | None = None,
    activations: np.ndarray | None = None,
    grad: np.ndarray | None = None,
) -> np.ndarray:
    """One feature row per filter, to embed or to score.

    Args:
        kind: ``"weights"`` (the flattened kernel), ``"activations"`` (`activation_signature`
            over the probes) or ``"gradients"`` (the flattened per-filter gradient).
        kernel: (F, kh, kw, c_in) filter-major kernel, needed for ``"weights"``.
        activations: (P, F, H, W) probe activations, needed for ``"activations"``.
        grad: (F, ...) per-filter gradient (e.g. accumulated over the epoch), needed for
            ``"gradients"``.

    Returns:
        (F, D) float64 features.

    Raises:
        ConfigError: unknown kind (the message names the choices), the array that kind needs is
            missing, or it holds NaN or inf.

    Example:
        >>> import numpy as np
        >>> filter_features("weights", kernel=np.zeros((8, 3, 3, 3))).shape
        (8, 27)
    """
    if kind not in FEATURE_KINDS:
        raise ConfigError(
            f"unknown filter feature kind {kind!r}; choose one of {', '.join(FEATURE_KINDS)}"
        )
    needed = {
        "weights": ("kernel", kernel),
        "activations": ("activations", activations),
        "gradients": ("grad", grad),
    }[kind]
    name, array = needed
    if array is None:
        raise ConfigError(f"filter features of kind {kind!r} need the {name} array")
    if kind == "activations":
        return activation_signature(array)
    return _as_filter_rows(array, name)
