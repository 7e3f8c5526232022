"""The filter doctor: dead, redundant and converged filters and layers, and the paper's patterns.

Pure numpy, like the rest of `revacnn.analysis`: the recorder's worker calls `diagnose_layer` once
per layer and epoch (and the live app between epochs), a notebook can call it on any recorded
arrays. Each finding is a `Diagnosis` whose ``suggestion`` is a steering command as plain data
(``{"op": "reinit-filters", "args": {"layer": "conv2", "indices": [3]}}``) that the app applies
with one click, or ``None`` where no command fixes it (a data problem).

Thresholds are module constants; `docs/diagnoses.md` says why each has its value.

Example:
    >>> import numpy as np
    >>> from revacnn.analysis.doctor import LayerArrays, diagnose_layer
    >>> k = np.random.default_rng(0).normal(size=(4, 3, 3, 3))
    >>> acts = np.random.default_rng(1).random((8, 4, 6, 6))
    >>> acts[:, 2] = 0.0                           # filter 2 never fires
    >>> grads = np.array([1.0, 1.0, 0.0, 1.0])
    >>> found = diagnose_layer(LayerArrays("conv1", k, np.zeros(4), acts, grads, [0, 1, 2, 3]))
    >>> [(d.kind, d.filter_uid) for d in found]
    [('dead', 2)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from revacnn.analysis.patterns import cluster_score, rgb_mono_fraction

__all__ = [
    "CLUSTER_THRESHOLD",
    "CONVERGED_CKA",
    "CONVERGED_CHANGE",
    "CONVERGED_STILL",
    "DEAD_ACTIVATION",
    "DEAD_GRADIENT",
    "DIAGNOSIS_KINDS",
    "REDUNDANT_COSINE",
    "RGB_THRESHOLD",
    "Diagnosis",
    "LayerArrays",
    "converged_layer",
    "diagnose_layer",
    "LIVE_KINDS",
    "diagnose_live",
    "linear_cka",
    "relative_change",
]

DIAGNOSIS_KINDS: tuple[str, ...] = ("dead", "redundant", "converged", "cluster_pattern", "rgb_pattern")

DEAD_ACTIVATION: float = 1e-6
"""A filter is silent when no probe, at no position, gives it an output above this (relative to
the layer's largest output, so the unit of the activations does not matter)."""

DEAD_GRADIENT: float = 1e-3
"""...and ~no gradient: its epoch ``grad_l1`` is below this fraction of the layer's median filter.
A silent ReLU filter receives exactly zero gradient; the tolerance admits float noise and the few
training examples that still reach it."""

REDUNDANT_COSINE: float = 0.98
"""Two filters are near-duplicates when the cosine similarity of their weight vectors (kernel and
bias) is at least this. Random 3x3x3 filters (27 weights) exceed 0.98 with probability < 1e-15."""

CONVERGED_CHANGE: float = 0.25
"""A layer stopped changing when its relative weight change in the epoch
(``|W_e - W_{e-1}| / |W_{e-1}|``) fell to at most this fraction of the largest per-epoch change it
had earlier in the run. Relative to the layer's own peak, because the absolute change per epoch
scales with the number of steps per epoch and the learning rate; under Adam it never reaches 0.
(0.35 until measured: it called convnetjs' conv1 converged at epoch 3 of 15 on 10,000 images.)"""

CONVERGED_STILL: float = 1e-6
"""A relative change at or below this is no change at all (a frozen layer), whatever the peak."""

CONVERGED_CKA: float = 0.98
"""...and its probe activations are at least this similar to the previous epoch's (linear CKA,
1 = the same representation up to rotation and scale)."""

CLUSTER_THRESHOLD: float = 0.15
"""`cluster_score` at or above which a layer shows the paper's cluster pattern (filters collapsing
onto few directions). Healthy layers score < 0.02; ``lr = 0.03`` gave 0.25."""

RGB_THRESHOLD: float = 0.5
"""Share of a first layer's filters whose *change since initialisation* is single-colour at or above
which the run shows the paper's RGB pattern (training uses one colour channel only)."""


@dataclass(frozen=True)
class Diagnosis:
    """One finding: a filter (``filter_uid`` set) or a layer (``filter_uid`` None).

    Attributes:
        layer: the layer's name.
        kind: one of `DIAGNOSIS_KINDS`.
        score: how strongly it holds (kind-specific, documented in docs/diagnoses.md).
        message: one sentence for a person.
        filter_uid: the filter's stable uid, None for a layer-level finding.
        filter: the filter's index at this epoch, None for a layer-level finding.
        suggestion: a steering command as plain data, or None.
    """

    layer: str
    kind: str
    score: float
    message: str
    filter_uid: int | None = None
    filter: int | None = None
    suggestion: dict[str, Any] | None = None

    def to_row(self) -> dict[str, Any]:
        """The columns of the ``diagnoses`` table (without run_id and epoch)."""
        return {
            "layer": self.layer,
            "filter_uid": self.filter_uid,
            "filter": self.filter,
            "kind": self.kind,
            "score": float(self.score),
            "suggestion": self.suggestion,
            "message": self.message,
        }


@dataclass
class LayerArrays:
    """What the doctor reads of one conv layer at one epoch (numpy, filter-major).

    Attributes:
        name: the layer's name.
        kernel: ``(F, kh, kw, c_in)``.
        bias: ``(F,)`` or None.
        activations: ``(P, F, H, W)`` post-activation probe outputs, or None.
        grad_l1: ``(F,)`` the epoch's gradient sums, or None (epoch 0 has none).
        uids: the filters' uids, ``(F,)``.
        prev_kernel: the previous epoch's kernel, by the same uids, or None.
        prev_activations: the previous epoch's activations, or None.
        init_kernel: the kernel at initialisation, by the same uids, or None.
        frozen: whether the layer is frozen.
        sees_rgb: whether the layer's input is the RGB image.
        lr: the run's learning rate (for a cluster-pattern suggestion), or None.
        peak_change: the largest relative weight change per epoch the layer had before this
            epoch (see `CONVERGED_CHANGE`), or None when unknown.
        cluster_score: the kernel's `cluster_score` when the caller has it already (the
            recorder computes it for the ``layers`` table), or None to compute it here.
    """

    name: str
    kernel: np.ndarray
    bias: np.ndarray | None
    activations: np.ndarray | None
    grad_l1: np.ndarray | None
    uids: list[int] | np.ndarray
    prev_kernel: np.ndarray | None = None
    prev_activations: np.ndarray | None = None
    init_kernel: np.ndarray | None = None
    frozen: bool = False
    sees_rgb: bool = False
    lr: float | None = None
    peak_change: float | None = None
    cluster_score: float | None = None


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear centred kernel alignment of two representations of the same examples, in [0, 1].

    ``x`` and ``y`` have one row per example (any trailing shape is flattened). Computed from the
    examples' Gram matrices, so it costs ``P x P`` whatever the feature size (Kornblith et al. 2019).

    Example:
        >>> a = np.random.default_rng(0).normal(size=(16, 50))
        >>> round(linear_cka(a, 3 * a), 6)
        1.0
    """
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs the same examples: got {x.shape[0]} and {y.shape[0]} rows")
    x = x - x.mean(0, keepdims=True)
    y = y - y.mean(0, keepdims=True)
    k, g = x @ x.T, y @ y.T
    denom = float(np.linalg.norm(k) * np.linalg.norm(g))
    if denom == 0.0:
        return 1.0 if np.allclose(k, g) else 0.0
    return float(np.clip(np.sum(k * g) / denom, 0.0, 1.0))


def relative_change(new: np.ndarray, old: np.ndarray) -> float:
    """``|new - old| / |old|`` (Frobenius); 0 when nothing changed, inf from all-zero weights."""
    new = np.asarray(new, np.float64)
    old = np.asarray(old, np.float64)
    base = float(np.linalg.norm(old))
    diff = float(np.linalg.norm(new - old))
    if base == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / base


def _weight_rows(kernel: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    rows = np.asarray(kernel, np.float64).reshape(len(kernel), -1)
    if bias is not None:
        rows = np.concatenate([rows, np.asarray(bias, np.float64).reshape(-1, 1)], axis=1)
    return rows


def _dead(a: LayerArrays) -> list[Diagnosis]:
    if a.activations is None:
        return []
    acts = np.abs(np.asarray(a.activations, np.float64))
    peak = acts.reshape(acts.shape[0], acts.shape[1], -1).max(axis=(0, 2))  # (F,)
    scale = float(peak.max()) if peak.size else 0.0
    if scale == 0.0:
        silent = np.ones_like(peak, bool)  # the whole layer is silent: every filter is dead
    else:
        silent = peak <= DEAD_ACTIVATION * scale
    if a.grad_l1 is not None:
        g = np.asarray(a.grad_l1, np.float64)
        med = float(np.median(g)) if g.size else 0.0
        if med > 0.0:
            silent &= g <= DEAD_GRADIENT * med
    out = []
    for i in np.flatnonzero(silent):
        uid = int(a.uids[i])
        out.append(Diagnosis(
            layer=a.name, kind="dead", score=1.0 - (float(peak[i]) / scale if scale else 0.0),
            message=f"{a.name} filter {i} (uid {uid}) gives no output on any probe and gets ~no "
                    "gradient: re-initialise it",
            filter_uid=uid, filter=int(i),
            suggestion={"op": "reinit-filters", "args": {"layer": a.name, "indices": [int(i)]},
                        "filter_uids": [uid]},
        ))
    return out


def _redundant(a: LayerArrays, skip: set[int]) -> list[Diagnosis]:
    rows = _weight_rows(a.kernel, a.bias)
    norms = np.linalg.norm(rows, axis=1)
    ok = norms > 0
    unit = np.zeros_like(rows)
    unit[ok] = rows[ok] / norms[ok, None]
    cos = unit @ unit.T
    np.fill_diagonal(cos, -np.inf)
    out = []
    flagged: set[int] = set()
    for j in range(len(rows)):  # the later filter of a pair is the duplicate; the earlier one stays
        if j in skip or not ok[j]:
            continue
        earlier = cos[j, :j]
        if earlier.size == 0:
            continue
        i = int(np.argmax(earlier))
        if earlier[i] >= REDUNDANT_COSINE and i not in flagged:
            uid, other = int(a.uids[j]), int(a.uids[i])
            flagged.add(j)
            out.append(Diagnosis(
                layer=a.name, kind="redundant", score=float(earlier[i]),
                message=f"{a.name} filter {j} (uid {uid}) duplicates filter {i} (uid {other}), "
                        f"cosine {earlier[i]:.3f}: delete it",
                filter_uid=uid, filter=j,
                suggestion={"op": "delete-filters", "args": {"layer": a.name, "indices": [j]},
                            "filter_uids": [uid], "duplicate_of": other},
            ))
    return out


def converged_layer(a: LayerArrays) -> Diagnosis | None:
    """The `converged` finding for one layer alone, or None (what ``--auto-freeze`` asks).

    Example:
        >>> k = np.ones((2, 3, 3, 3))
        >>> converged_layer(LayerArrays("conv1", k, None, None, None, [0, 1], prev_kernel=k)).kind
        'converged'
    """
    found = _converged(a)
    return found[0] if found else None


def _converged(a: LayerArrays) -> list[Diagnosis]:
    if a.prev_kernel is None or np.shape(a.prev_kernel) != np.shape(a.kernel):
        return []
    change = relative_change(a.kernel, a.prev_kernel)
    cka = None
    if a.activations is not None and a.prev_activations is not None and \
            np.shape(a.activations) == np.shape(a.prev_activations):
        cka = linear_cka(a.activations, a.prev_activations)
    still = change <= CONVERGED_STILL
    peak = a.peak_change
    if not still and not peak:
        return []  # no earlier change to compare with: too early to tell
    ratio = 0.0 if still else change / peak
    if not still and (ratio > CONVERGED_CHANGE or cka is None or cka < CONVERGED_CKA):
        return []
    cka_txt = f", activation CKA {cka:.4f}" if cka is not None else ""
    what = f"weight change {change:.2e}, {ratio:.0%} of its peak{cka_txt}"
    if a.frozen:
        msg, suggestion = f"{a.name} is frozen ({what})", None
    else:
        msg = f"{a.name} stopped changing ({what}): freeze it to save time"
        suggestion = {"op": "freeze", "args": {"layer": a.name}}
    return [Diagnosis(layer=a.name, kind="converged", score=1.0 - ratio, message=msg,
                      suggestion=suggestion)]


def _cluster(a: LayerArrays) -> list[Diagnosis]:
    rows = _weight_rows(a.kernel, None)
    if len(rows) < 3 or not np.all(np.isfinite(rows)):
        return []
    score = cluster_score(rows) if a.cluster_score is None else float(a.cluster_score)
    if score < CLUSTER_THRESHOLD:
        return []
    suggestion = None
    if a.lr:
        suggestion = {"op": "set-lr", "args": {"lr": float(a.lr) / 10.0}}
    return [Diagnosis(layer=a.name, kind="cluster_pattern", score=score,
                      message=f"{a.name}'s filters collapse onto few directions (cluster score "
                              f"{score:.2f}): the learning rate may be too high",
                      suggestion=suggestion)]


def _rgb(a: LayerArrays) -> list[Diagnosis]:
    if not a.sees_rgb or a.init_kernel is None or np.shape(a.init_kernel) != np.shape(a.kernel):
        return []
    delta = np.asarray(a.kernel, np.float64) - np.asarray(a.init_kernel, np.float64)
    moved = np.abs(delta).reshape(len(delta), -1).sum(1) > 0
    if not moved.any():
        return []
    frac = rgb_mono_fraction(delta[moved])
    if frac < RGB_THRESHOLD:
        return []
    return [Diagnosis(layer=a.name, kind="rgb_pattern", score=frac,
                      message=f"{frac:.0%} of {a.name}'s filters learned from one colour channel only: "
                              "check the input pipeline (a channel dropped or constant?)")]


def diagnose_layer(a: LayerArrays) -> list[Diagnosis]:
    """Every finding for one conv layer at one epoch: filters first, then the layer.

    Non-finite weights (a diverged run) give no findings rather than wrong ones.
    """
    if not np.all(np.isfinite(np.asarray(a.kernel, np.float64))):
        return []
    dead = _dead(a)
    found = dead + _redundant(a, {d.filter for d in dead if d.filter is not None})
    found += _converged(a) + _cluster(a) + _rgb(a)
    return found


#: the kinds `diagnose_live` can judge from a live snapshot (kernels and probe activations only)
LIVE_KINDS: tuple[str, ...] = ("dead", "redundant")


def diagnose_live(a: LayerArrays) -> list[Diagnosis]:
    """Provisional `dead` and `redundant` findings between epochs, from a live snapshot.

    The trainer's live snapshot holds each conv layer's kernel and probe activations, not its bias
    nor the epoch's gradient sums. So `dead` is judged on the probes alone (silent on every probe
    and position: the record at the epoch's end adds the gradient test) and `redundant` on the
    kernels alone. The findings are the same kind of row as the record's, their message ends in
    "(live, provisional)"; the next epoch record confirms or drops them.

    Example:
        >>> k = np.random.default_rng(0).normal(size=(3, 3, 3, 3))
        >>> k[2] = 2 * k[0]                               # filter 2 copies filter 0
        >>> acts = np.random.default_rng(1).random((4, 3, 5, 5))
        >>> [(d.kind, d.filter) for d in diagnose_live(LayerArrays("conv1", k, None, acts, None, [0, 1, 2]))]
        [('redundant', 2)]
    """
    if not np.all(np.isfinite(np.asarray(a.kernel, np.float64))):
        return []
    live = LayerArrays(name=a.name, kernel=a.kernel, bias=None, activations=a.activations, grad_l1=None,
                       uids=a.uids)
    dead = _dead(live)
    found = dead + _redundant(live, {d.filter for d in dead if d.filter is not None})
    return [Diagnosis(layer=d.layer, kind=d.kind, score=d.score, message=f"{d.message} (live, provisional)",
                      filter_uid=d.filter_uid, filter=d.filter, suggestion=d.suggestion) for d in found]
