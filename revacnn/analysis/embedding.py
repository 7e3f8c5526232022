"""Stable 2-D t-SNE embeddings of filters over epochs: warm-started, Procrustes-aligned on uids.

Pure numpy/scipy/openTSNE (no TensorFlow or Keras): the trainer runs it in a worker thread, the
app in a web server.

How a track stays stable. The first `EmbeddingTracker.embed` call for a key runs a cold t-SNE
(PCA initialisation, early exaggeration). Every later call starts from the previous positions of
the same filter uids, runs a short optimisation without early exaggeration, rotates / reflects /
translates the result onto the previous positions (orthogonal Procrustes on the uids both epochs
share), then rescales it so that those filters keep their RMS radius. A filter that did not exist
before starts at its parent's position (when the caller names one) or at the position of its
nearest neighbour in feature space among the known filters, plus a small seeded jitter. So
between epochs filters move as much as their features changed, and the picture neither flips nor
rotates.

Settings, measured on 2 CPU cores (see ``benchmarks/bench_embedding.py``): tracks of up to
`EXACT_MAX` filters (off by default, see there; 192 would take every conv layer of the built-in models) use the exact gradient in numpy,
with openTSNE's affinities and openTSNE's gradient descent replicated step for step (tested
against openTSNE at ``theta=0``), and `EmbeddingTracker.embed_many` optimises all tracks of one
size together: 100 warm iterations of 7 layers of 64 filters take ~30 ms where openTSNE's
optimiser loop took ~56 ms per layer. Larger tracks (the layer-level one) use openTSNE's
Barnes-Hut gradient (``theta=0.5``) with ``n_jobs=1``; the FFT-interpolation gradient has a fixed
grid cost that makes it 7 to 100 times slower below a few thousand points. Cold: `early_iter` (250)
early-exaggeration iterations then `n_iter` (250): the KL divergence barely moves after ~200
normal iterations for 64 to 512 filters, and every warm epoch adds `warm_iter` (100) more;
a shorter early exaggeration (200) left clusters of 64 filters to reorganise in later epochs.
Nearest neighbours are computed exactly with numpy (one distance matrix; filters number at most
a few thousand), which is deterministic, also for tied distances. Both phases use momentum 0.8
and openTSNE's learning rate ``N / exaggeration`` (momentum 0.5 in early exaggeration, as in
the original t-SNE, collapses small layouts, F < ~40, to a point in most seeds with that
learning rate). A lower warm learning rate moves filters less but lags real changes: with N/8,
16 filters regrouping between epochs ended at 3-10x the KL divergence of a fresh run, with N
at 1-3x (64 filters: equal to a fresh run). Perplexity is ``(F - 1) / 3`` clipped to
[2, 30] (1.5 for 3 filters) with ``min(F - 1, 3 * perplexity)`` neighbours, so layers of 3
filters work.

Non-finite features (NaN, inf) raise `ConfigError` rather than being replaced: a diverged layer
has no meaningful layout, and the caller records the embedding as missing for that epoch; the
track resumes from its last good positions.
"""

from __future__ import annotations

import logging
import os
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from revacnn.errors import ConfigError

__all__ = ["EXACT_MAX", "EmbeddingTracker", "optimize_tracks", "procrustes_align"]

_STATE_VERSION = 1
_MAX_PERPLEXITY = 30.0
_EARLY_EXAGGERATION = 12.0
_MAX_STEP_NORM = 5.0  # openTSNE's default ``max_step_norm``

EXACT_MAX = int(os.environ.get("REVACNN_TSNE_EXACT_MAX", "192") or 0)
"""Tracks of up to this many filters (192 takes every conv layer of the built-in models) are
optimised with the exact gradient (numpy, batched by size); larger ones with openTSNE's Barnes-Hut.
The numpy loop makes thousands of small calls that hold the GIL: beside a training thread it
doubled the wall time of the recording tests (80 s vs 33 s, quiet 2-core machine), so the recorder
runs the optimisations in a child process (`revacnn.analysis.tsne_process`), where the exact path
costs less CPU than openTSNE's per-layer optimiser loops. ``REVACNN_TSNE_EXACT_MAX=0`` gives
openTSNE for every track (the positions differ: a run's forks and resumes should use one value)."""


def _fit_procrustes(
    moving: np.ndarray, reference: np.ndarray, *, scale: bool
) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Best rotation/reflection R, scale s, centres so that s * (moving - mu_m) @ R + mu_r ~ ref."""
    mu_m = moving.mean(axis=0)
    mu_r = reference.mean(axis=0)
    a = moving - mu_m
    b = reference - mu_r
    dim = moving.shape[1]
    norm_a = float(np.sum(a**2))
    if len(moving) < 2 or norm_a <= 1e-300:
        return np.eye(dim), 1.0, mu_m, mu_r  # translation only
    u, sig, vt = np.linalg.svd(a.T @ b)
    rot = u @ vt
    s = float(sig.sum() / norm_a) if scale else 1.0
    return rot, s, mu_m, mu_r


def procrustes_align(
    moving: np.ndarray,
    reference: np.ndarray,
    *,
    scale: bool = False,
    moving_all: np.ndarray | None = None,
) -> np.ndarray:
    """Rotate/reflect and translate `moving` onto `reference` (orthogonal Procrustes).

    Finds the rotation or reflection ``R`` (and, with `scale`, a uniform factor ``s``) and the
    translation minimising ``sum |s * m_i @ R + t - r_i|**2`` over corresponding rows.

    Args:
        moving: (N, d) points to move.
        reference: (N, d) target points; row i corresponds to row i of `moving`.
        scale: also fit a uniform scale factor.
        moving_all: optional (M, d) points to which the transform fitted on `moving` is applied
            instead (e.g. a whole embedding aligned on the subset of shared uids).

    Returns:
        The aligned points, the shape of `moving_all` if given, else of `moving`. With no
        corresponding rows (N = 0) the points come back unchanged; with one, or when all moving
        points coincide, only translated.

    Raises:
        ConfigError: shapes differ or values are not finite.

    Example:
        >>> import numpy as np
        >>> ref = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
        >>> rot = np.array([[0.0, -1.0], [1.0, 0.0]])
        >>> np.allclose(procrustes_align(ref @ rot + 5.0, ref), ref)
        True
    """
    m = np.asarray(moving, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if m.ndim != 2 or m.shape != r.shape:
        raise ConfigError(
            f"procrustes_align needs two (N, d) arrays of one shape, got {m.shape} and {r.shape}"
        )
    target = m if moving_all is None else np.asarray(moving_all, dtype=np.float64)
    if target.ndim != 2 or target.shape[1] != m.shape[1]:
        raise ConfigError(f"moving_all must be (M, {m.shape[1]}), got {target.shape}")
    if not (np.all(np.isfinite(m)) and np.all(np.isfinite(r)) and np.all(np.isfinite(target))):
        raise ConfigError("procrustes_align got NaN or inf")
    if len(m) == 0:
        return target.copy()
    rot, s, mu_m, mu_r = _fit_procrustes(m, r, scale=scale)
    return s * (target - mu_m) @ rot + mu_r


@dataclass
class _Track:
    uids: np.ndarray  # (N,) int64
    positions: np.ndarray  # (N, 2) float64
    step: int  # number of embed calls so far for this key, minus one


def _rms_radius(points: np.ndarray) -> float:
    if len(points) == 0:
        return 0.0
    return float(np.sqrt(np.mean(np.sum((points - points.mean(axis=0)) ** 2, axis=1))))


def _pairwise_distances(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """Euclidean distances between rows, computed in float64 and clipped at zero."""
    y = x if y is None else y
    sq = np.sum(x**2, axis=1)[:, None] + np.sum(y**2, axis=1)[None, :] - 2.0 * (x @ y.T)
    return np.sqrt(np.maximum(sq, 0.0))


def _perplexity(n: int) -> float:
    """``(n - 1) / 3`` between 2 (1.5 for 3 points) and 30.

    Below 2, tiny layers split into tight pairs whose gap shrinks epoch after epoch relative to
    the distance between pairs (measured for 4 filters: gap/extent 0.11 -> 0.009 in 30 epochs).
    """
    return float(min(_MAX_PERPLEXITY, max(min(2.0, 0.75 * (n - 1)), (n - 1) / 3.0)))


def _pca_init(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Top-2 principal components, sign-fixed, scaled to std 1e-4 (openTSNE's convention).

    Computed from the top two eigenvectors of the smaller of the two Gram matrices (F x F or
    D x D): for 512 filters of 2304 weights that takes 0.15 s where a thin SVD takes 0.8 s.
    """
    from scipy.linalg import eigh

    n, dim = x.shape
    centred = x - x.mean(axis=0)
    gram = centred @ centred.T if n <= dim else centred.T @ centred
    m = len(gram)
    vals, vecs = eigh(gram, subset_by_index=[max(0, m - 2), m - 1])  # ascending
    vals, vecs = vals[::-1], vecs[:, ::-1]
    comps = np.zeros((n, 2))
    if n <= dim:
        comps[:, : len(vals)] = vecs * np.sqrt(np.maximum(vals, 0.0))
    else:
        comps[:, : len(vals)] = centred @ vecs
    for j in range(2):  # deterministic sign: the largest-magnitude coordinate is positive
        if comps[int(np.argmax(np.abs(comps[:, j]))), j] < 0:
            comps[:, j] = -comps[:, j]
    std = float(np.std(comps[:, 0]))
    if std <= 1e-12 * max(1.0, float(np.abs(x).max())):
        comps = rng.normal(0.0, 1e-4, size=(n, 2))  # all features identical: no direction
    else:
        comps *= 1e-4 / std
    comps += rng.normal(0.0, 1e-6, size=(n, 2))  # separate exact duplicates
    return comps


def _line_layout(n: int) -> np.ndarray:
    """Deterministic layout for fewer than 3 filters: points on the x axis, centred."""
    return np.column_stack([np.arange(n, dtype=np.float64) - (n - 1) / 2.0, np.zeros(n)])


class EmbeddingTracker:
    """Stable 2-D t-SNE embeddings of filters over epochs, one track per key (a layer, "__all__").

    Each key's track remembers the last positions of its filter uids. Call `embed` once per epoch
    and key; keep one tracker per run (restore it with `load_state_dict` when resuming or forking).
    A tracker is safe to call from several threads (calls are serialised).

    For the layer-level embedding of all layers together, give every filter a uid unique across
    layers (e.g. ``layer_index * 2**32 + filter_uid``) and use the activation signatures, which
    have one entry per probe in every layer.

    Args:
        seed: seeds the initialisation and the jitter; the same inputs and seed give the same
            positions.
        n_iter: iterations of the cold (first) embedding after `early_iter` iterations of early
            exaggeration.
        warm_iter: iterations of each warm-started embedding (no early exaggeration).
        early_iter: early-exaggeration iterations of the cold embedding.
        jitter: standard deviation of the jitter given to new filters, relative to the track's
            RMS radius.
        scale: after the rotation/reflection and translation, rescale each epoch's layout so
            that the filters it shares with the previous epoch (3 or more) keep their RMS
            radius. t-SNE
            layouts otherwise keep growing slowly under continued optimisation (measured: +35 %
            in 6 warm epochs of 20 filters), which reads as motion. (A least-squares Procrustes
            scale is not used: with noisy correspondences it is biased below 1 and the picture
            shrinks epoch after epoch.)

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(20, 27))
        >>> tracker = EmbeddingTracker(seed=0)
        >>> tracker.embed("conv1", np.arange(20), x).shape
        (20, 2)
        >>> tracker.embed("conv1", np.arange(20), x + 0.01 * rng.normal(size=x.shape)).dtype
        dtype('float32')
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        n_iter: int = 250,
        warm_iter: int = 100,
        early_iter: int = 250,
        jitter: float = 0.02,
        scale: bool = True,
    ) -> None:
        for name, value in (("n_iter", n_iter), ("warm_iter", warm_iter)):
            if int(value) < 1:
                raise ConfigError(f"{name} must be at least 1, got {value!r}")
        if int(early_iter) < 0:
            raise ConfigError(f"early_iter must be >= 0, got {early_iter!r}")
        if not float(jitter) >= 0:
            raise ConfigError(f"jitter must be >= 0, got {jitter!r}")
        self.seed = int(seed)
        self.n_iter = int(n_iter)
        self.warm_iter = int(warm_iter)
        self.early_iter = int(early_iter)
        self.jitter = float(jitter)
        self.scale = bool(scale)
        self._tracks: dict[str, _Track] = {}
        self._lock = threading.Lock()
        #: runs the optimisations (`optimize_tracks`' signature), e.g. a `TsneProcess`; None: this thread
        self.runner: Callable[[list[Payload], dict[str, Any]], list[np.ndarray]] | None = None

    # ------------------------------------------------------------------ public API

    def embed(
        self,
        key: str,
        uids: np.ndarray,
        features: np.ndarray,
        *,
        parents: dict[int, int] | None = None,
    ) -> np.ndarray:
        """Embed this epoch's filters of one track, continuing the track's previous layout.

        Args:
            key: the track, e.g. a layer name or ``"__all__"``.
            uids: (F,) unique integer filter uids, in the order of `features`' rows.
            features: (F, D) one row per filter (trailing axes are flattened), e.g. from
                `filter_features`.
            parents: optional ``{new_uid: parent_uid}`` for filters added since the last call,
                so that they start where their parent was.

        Returns:
            (F, 2) float32 positions, row i for ``uids[i]``.

        Raises:
            ConfigError: `uids` and `features` differ in length, uids are not unique integers,
                or the features hold NaN or inf.

        Example:
            >>> import numpy as np
            >>> tracker = EmbeddingTracker()
            >>> x = np.random.default_rng(1).normal(size=(8, 9))
            >>> pos = tracker.embed("conv1", [10, 11, 12, 13, 14, 15, 16, 17], x)
            >>> new = tracker.embed("conv1", [10, 11, 12, 13, 14, 15, 16, 18], x,
            ...                     parents={18: 17})
            >>> bool(np.isfinite(new).all())
            True
        """
        return self.embed_many([(key, uids, features, parents)])[0]

    def embed_many(
        self, items: list[tuple[str, Any, Any, dict[int, int] | None]]
    ) -> list[np.ndarray]:
        """`embed` for several tracks at once: the same positions as one `embed` call per item.

        The tracks of a recorded epoch (one per conv layer, many of them of equal size) are
        optimised together: tracks with the same number of filters, up to `EXACT_MAX` of them,
        share one vectorised exact-gradient optimisation, so a network of 21 small layers costs
        a few array passes per iteration rather than 21 optimiser loops.

        Args:
            items: ``(key, uids, features, parents)`` per track, as for `embed` (``parents``
                may be None); each key at most once.

        Returns:
            One (F, 2) float32 array per item, in order.

        Raises:
            ConfigError: an item is invalid (see `embed`) or a key repeats; no track changes then.

        Example:
            >>> import numpy as np
            >>> rng = np.random.default_rng(0)
            >>> items = [("conv1", np.arange(8), rng.normal(size=(8, 27)), None),
            ...          ("conv2", np.arange(8), rng.normal(size=(8, 72)), None)]
            >>> [p.shape for p in EmbeddingTracker().embed_many(items)]
            [(8, 2), (8, 2)]
        """
        checked = []
        for item in items:
            if len(item) != 4:
                raise ConfigError(f"embed_many takes (key, uids, features, parents) items, got {len(item)} values")
            key, uids, features, parents = item
            uid_arr, x = self._check_inputs(key, uids, features)
            checked.append((key, uid_arr, x, dict(parents or {})))
        keys = [c[0] for c in checked]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"embed_many got a key more than once: {sorted(k for k in set(keys) if keys.count(k) > 1)}")
        with self._lock:
            jobs = []
            for key, uid_arr, x, parents in checked:
                prev = self._tracks.get(key)
                step = prev.step + 1 if prev is not None else 0
                rng = np.random.default_rng([self.seed & 0xFFFFFFFF, zlib.crc32(key.encode()), step])
                jobs.append((key, uid_arr, step, self._prepare(uid_arr, x, prev, parents, rng)))
            self._run_jobs([job for *_, job in jobs])
            out = []
            for key, uid_arr, step, job in jobs:
                positions = job.finish()
                self._tracks[key] = _Track(uid_arr.copy(), positions, step)
                out.append(positions.astype(np.float32))
        return out

    def state_dict(self) -> dict:
        """The tracks as plain Python data (JSON-serialisable; also fits in an npz via json).

        Returns:
            ``{"version": 1, "seed": int, "tracks": {key: {"uids": [...], "positions":
            [[x, y], ...], "step": int}}}``.

        Example:
            >>> import json
            >>> tracker = EmbeddingTracker()
            >>> _ = tracker.embed("conv1", [0, 1, 2], [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
            >>> restored = EmbeddingTracker()
            >>> restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
            >>> restored.state_dict() == tracker.state_dict()
            True
        """
        with self._lock:
            tracks = {
                key: {
                    "uids": [int(u) for u in t.uids],
                    "positions": [[float(a), float(b)] for a, b in t.positions],
                    "step": int(t.step),
                }
                for key, t in self._tracks.items()
            }
        return {"version": _STATE_VERSION, "seed": self.seed, "tracks": tracks}

    def load_state_dict(self, state: dict) -> None:
        """Replace all tracks (and the seed) with those of `state` from `state_dict`.

        Args:
            state: a dict as returned by `state_dict` (possibly after a JSON round trip).

        Raises:
            ConfigError: `state` is not a valid tracker state.

        Example:
            >>> tracker = EmbeddingTracker()
            >>> tracker.load_state_dict({"version": 1, "seed": 3, "tracks": {}})
            >>> tracker.seed
            3
        """
        try:
            if int(state["version"]) != _STATE_VERSION:
                raise ConfigError(f"unsupported embedding state version {state['version']!r}")
            seed = int(state["seed"])
            tracks: dict[str, _Track] = {}
            for key, t in dict(state["tracks"]).items():
                uid_arr = np.asarray(t["uids"], dtype=np.int64).reshape(-1)
                pos = np.asarray(t["positions"], dtype=np.float64).reshape(len(uid_arr), 2)
                if len(np.unique(uid_arr)) != len(uid_arr) or not np.all(np.isfinite(pos)):
                    raise ConfigError(f"embedding state for {key!r} is corrupt")
                tracks[str(key)] = _Track(uid_arr, pos, int(t["step"]))
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"not an embedding tracker state: {exc}") from exc
        with self._lock:
            self.seed = seed
            self._tracks = tracks

    def reset(self, key: str | None = None) -> None:
        """Forget one track (its next `embed` is cold again), or all tracks when `key` is None.

        Args:
            key: the track to forget; None forgets every track. An unknown key is ignored.

        Example:
            >>> tracker = EmbeddingTracker()
            >>> tracker.reset()
        """
        with self._lock:
            if key is None:
                self._tracks.clear()
            else:
                self._tracks.pop(key, None)

    def keys(self) -> list[str]:
        """The keys that have a track.

        Example:
            >>> EmbeddingTracker().keys()
            []
        """
        with self._lock:
            return list(self._tracks)

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _check_inputs(key: Any, uids: Any, features: Any) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(key, str):
            raise ConfigError(f"embedding key must be a string, got {type(key).__name__}")
        uid_arr = np.asarray(uids)
        if uid_arr.ndim != 1:
            raise ConfigError(f"uids must be 1-D, got shape {uid_arr.shape}")
        if uid_arr.size and uid_arr.dtype.kind not in "iu":
            if (
                uid_arr.dtype.kind == "f"
                and np.all(np.isfinite(uid_arr))
                and np.all(uid_arr == np.round(uid_arr))
            ):
                uid_arr = uid_arr.astype(np.int64)
            else:
                raise ConfigError(f"uids must be integers, got dtype {uid_arr.dtype}")
        uid_arr = uid_arr.astype(np.int64)
        if len(np.unique(uid_arr)) != len(uid_arr):
            raise ConfigError(f"uids of {key!r} are not unique")
        x = np.asarray(features)
        if x.ndim == 0:
            raise ConfigError("features must have one row per filter, got a scalar")
        if x.shape[0] != len(uid_arr):
            raise ConfigError(
                f"{key!r}: {len(uid_arr)} uids but {x.shape[0]} feature rows; they must match"
            )
        x = x.reshape(x.shape[0], int(np.prod(x.shape[1:], dtype=np.int64)))
        if x.dtype.kind not in "iufb":
            raise ConfigError(f"features must be numeric, got dtype {x.dtype}")
        x = x.astype(np.float64)
        if not np.all(np.isfinite(x)):
            bad = int(x.size - np.count_nonzero(np.isfinite(x)))
            raise ConfigError(
                f"{key!r}: features hold {bad} non-finite value(s) (NaN or inf); "
                "cannot embed a diverged layer"
            )
        if x.shape[1] == 0:
            x = np.zeros((len(x), 1))
        return uid_arr, x

    def _prepare(
        self,
        uids: np.ndarray,
        x: np.ndarray,
        prev: _Track | None,
        parents: dict[int, int],
        rng: np.random.Generator,
    ) -> _Job:
        """One track's start positions and what is left to do: an optimisation, or nothing."""
        n = len(uids)
        known_pos: dict[int, np.ndarray] = {}
        if prev is not None:
            known_pos = {int(u): p for u, p in zip(prev.uids, prev.positions, strict=True)}
        is_known = np.array([int(u) in known_pos for u in uids], dtype=bool)
        init = self._warm_init(uids, x, prev, known_pos, is_known, parents, rng)

        if n == 0:
            return _Job(done=np.zeros((0, 2)))
        if n < 3:
            layout = _line_layout(n)
            if prev is not None and len(prev.positions) > 1:
                layout *= max(_rms_radius(prev.positions), 1e-3)
            if init is None:
                return _Job(done=layout)
            # Move the line onto the start positions, then keep known filters where they were.
            out = procrustes_align(layout, init)
            out[is_known] = init[is_known]
            return _Job(done=out)
        if init is None:
            return _Job(x=x, start=_pca_init(x, rng), cold=True)
        return _Job(x=x, start=init, cold=False, is_known=is_known, scale=self.scale)

    def _run_jobs(self, jobs: list[_Job]) -> None:
        """Optimise every pending job, with `runner` when one is set (e.g. in a child process)."""
        pending = [job for job in jobs if job.done is None]
        if not pending:
            return
        payloads = [(job.x, job.start, job.cold) for job in pending]
        settings = self.optimize_settings()
        runner = self.runner
        embs = runner(payloads, settings) if runner is not None else optimize_tracks(payloads, settings)
        for job, emb in zip(pending, embs, strict=True):
            job.emb = np.asarray(emb, dtype=np.float64)

    def optimize_settings(self) -> dict[str, Any]:
        """What `optimize_tracks` needs besides the tracks: the seed, the iteration counts, `EXACT_MAX`.

        Example:
            >>> sorted(EmbeddingTracker().optimize_settings())
            ['early_iter', 'exact_max', 'n_iter', 'seed', 'warm_iter']
        """
        return {"seed": self.seed, "n_iter": self.n_iter, "warm_iter": self.warm_iter,
                "early_iter": self.early_iter, "exact_max": int(EXACT_MAX)}

    def _warm_init(
        self,
        uids: np.ndarray,
        x: np.ndarray,
        prev: _Track | None,
        known_pos: dict[int, np.ndarray],
        is_known: np.ndarray,
        parents: dict[int, int],
        rng: np.random.Generator,
    ) -> np.ndarray | None:
        """Start positions from the previous track, or None when nothing can be reused."""
        if prev is None:
            return None
        anchored = {
            i: known_pos[int(parents[int(u)])]
            for i, u in enumerate(uids)
            if not is_known[i] and int(u) in parents and int(parents[int(u)]) in known_pos
        }
        if not is_known.any() and not anchored:
            return None
        init = np.zeros((len(uids), 2))
        init[is_known] = [known_pos[int(u)] for u in uids[is_known]]
        new_idx = np.flatnonzero(~is_known)
        if len(new_idx) == 0:
            return init
        for i, p in anchored.items():
            init[i] = p
        orphan = np.array([i for i in new_idx if i not in anchored], dtype=np.int64)
        if len(orphan):
            known_idx = np.flatnonzero(is_known)
            if len(known_idx):
                dist = _pairwise_distances(x[orphan], x[known_idx])
                nearest = known_idx[np.argmin(dist, axis=1)]
                init[orphan] = init[nearest]
            else:  # only parented new filters are placed: the others start at their centre
                placed = np.array(sorted(anchored))
                init[orphan] = init[placed].mean(axis=0)
        radius = _rms_radius(prev.positions)
        if radius <= 0:
            radius = 1.0
        init[new_idx] += rng.normal(0.0, self.jitter * radius, size=(len(new_idx), 2))
        return init


@dataclass
class _Job:
    """One track's embedding in `EmbeddingTracker.embed_many`: its start and, once run, its result."""

    done: np.ndarray | None = None  # final positions that need no optimisation (fewer than 3 filters)
    x: np.ndarray | None = None
    start: np.ndarray | None = None
    cold: bool = True
    is_known: np.ndarray | None = None  # warm: the filters of the previous epoch (alignment anchors)
    scale: bool = True
    emb: np.ndarray | None = None  # the optimised positions

    def finish(self) -> np.ndarray:
        """The final positions: a cold layout centred; a warm one aligned on the previous epoch."""
        if self.done is not None:
            return self.done
        emb = self.emb
        assert emb is not None and self.start is not None
        if self.cold:
            return emb - emb.mean(axis=0)
        # Align on the filters that were there before; when none were (only parented new ones),
        # on their start positions.
        known = self.is_known
        anchor = known if known is not None and known.any() else np.ones(len(emb), dtype=bool)
        ref = self.start[anchor]
        out = procrustes_align(emb[anchor], ref, moving_all=emb)
        if self.scale and anchor.sum() >= 3:  # two points give too noisy a scale
            r_now, r_ref = _rms_radius(out[anchor]), _rms_radius(ref)
            if r_now > 0 and r_ref > 0:
                centre = ref.mean(axis=0)
                out = centre + (out - centre) * (r_ref / r_now)
        return out


Payload = tuple[np.ndarray, np.ndarray, bool]
"""One track's optimisation for `optimize_tracks`: features (N, D), start positions (N, 2), cold."""


def optimize_tracks(payloads: list[Payload], settings: dict[str, Any]) -> list[np.ndarray]:
    """The t-SNE optimisations of `EmbeddingTracker.embed_many`: a pure function of its arguments.

    Tracks of up to ``settings["exact_max"]`` filters are optimised with the exact gradient,
    batched by (size, cold); larger ones with openTSNE's Barnes-Hut. The tracker keeps all state
    (previous positions, steps) and calls this between preparing the start positions and aligning
    the result, so the same call in a child process (`revacnn.analysis.tsne_process`) gives the
    same positions as in the caller's thread.

    Args:
        payloads: ``(features, start, cold)`` per track.
        settings: `EmbeddingTracker.optimize_settings`.

    Returns:
        One (N, 2) float64 array per payload, in order.

    Raises:
        ConfigError: the optimisation produced non-finite positions.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> s = EmbeddingTracker(n_iter=5, early_iter=0).optimize_settings()
        >>> [e.shape for e in optimize_tracks([(rng.normal(size=(6, 4)), rng.normal(size=(6, 2)), True)], s)]
        [(6, 2)]
    """
    out: list[np.ndarray | None] = [None] * len(payloads)
    groups: dict[tuple[int, bool], list[int]] = {}
    exact_max = int(settings["exact_max"])
    for i, (x, start, cold) in enumerate(payloads):
        n = len(start)
        if n <= exact_max:
            groups.setdefault((n, bool(cold)), []).append(i)
        else:
            out[i] = _optimize_bh(x, start, cold=bool(cold), settings=settings)
    for (_, cold), idx in groups.items():
        embs = _optimize_exact([payloads[i][0] for i in idx], np.stack([payloads[i][1] for i in idx]),
                               cold=cold, settings=settings)
        for i, emb in zip(idx, embs, strict=True):
            out[i] = emb
    return [e for e in out if e is not None]


def _optimize_bh(x: np.ndarray, init: np.ndarray, *, cold: bool, settings: dict[str, Any]) -> np.ndarray:
    """Run openTSNE (Barnes-Hut, one thread) from `init` on features `x`."""
    from openTSNE import TSNEEmbedding
    from openTSNE.affinity import PerplexityBasedNN
    from openTSNE.nearest_neighbors import PrecomputedNeighbors

    order, dist, perplexity = _neighbours(x)
    knn = PrecomputedNeighbors(order, dist)
    logger = logging.getLogger("openTSNE")
    level = logger.level
    logger.setLevel(logging.ERROR)  # silence "perplexity too high" style warnings
    try:
        affinities = PerplexityBasedNN(
            perplexity=perplexity, knn_index=knn, n_jobs=1, verbose=False
        )
        emb = TSNEEmbedding(
            np.ascontiguousarray(init, dtype=np.float64),
            affinities,
            negative_gradient_method="bh",
            theta=0.5,
            n_jobs=1,
            random_state=int(settings["seed"]),
            verbose=False,
        )
        if cold and settings["early_iter"]:
            emb = emb.optimize(
                int(settings["early_iter"]),
                exaggeration=_EARLY_EXAGGERATION,
                momentum=0.8,
                inplace=True,
            )
        emb = emb.optimize(int(settings["n_iter"] if cold else settings["warm_iter"]), momentum=0.8, inplace=True)
    finally:
        logger.setLevel(level)
    out = np.asarray(emb, dtype=np.float64).copy()
    if not np.all(np.isfinite(out)):  # pragma: no cover - openTSNE safety net
        raise ConfigError("t-SNE produced non-finite positions")
    return out

def _optimize_exact(xs: list[np.ndarray], init: np.ndarray, *, cold: bool, settings: dict[str, Any]) -> np.ndarray:
    """`_optimize` with the exact gradient, for B tracks of N filters at once (numpy).

    The same affinities (openTSNE's perplexity calibration on the same exact neighbours) and
    the same gradient descent as openTSNE's (momentum, gains, learning rate ``N /
    exaggeration``, steps clipped to norm 5, re-centred every iteration); only the gradient is
    exact instead of Barnes-Hut's approximation (``theta=0`` in openTSNE's terms).

    Args:
        xs: B feature matrices of N rows each.
        init: (B, N, 2) start positions.
        cold: run `early_iter` early-exaggeration iterations then `n_iter`, else `warm_iter`.

    Returns:
        (B, N, 2) positions.
    """
    p = np.stack([_joint_probabilities(x) for x in xs])
    y = np.array(init, dtype=np.float64)
    phases = [(_EARLY_EXAGGERATION, int(settings["early_iter"])), (1.0, int(settings["n_iter"]))] if cold else [(1.0, int(settings["warm_iter"]))]
    y = _exact_descent(p, y, [(e, i) for e, i in phases if i > 0])
    if not np.all(np.isfinite(y)):  # pragma: no cover - safety net, as for openTSNE
        raise ConfigError("t-SNE produced non-finite positions")
    return y




def _neighbours(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Each row's exact nearest neighbours (stable order for ties), their distances, the perplexity."""
    n = len(x)
    perplexity = _perplexity(n)
    k = int(min(n - 1, max(1, int(3 * perplexity))))
    dist = _pairwise_distances(x)
    np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(dist, order, axis=1), perplexity


def _joint_probabilities(x: np.ndarray) -> np.ndarray:
    """The dense (N, N) joint affinities P of openTSNE's `PerplexityBasedNN` (symmetric, sum 1)."""
    from openTSNE.affinity import joint_probabilities_nn

    order, dist, perplexity = _neighbours(x)
    if perplexity > order.shape[1]:  # as openTSNE's `check_perplexity` (never with `_perplexity`'s values)
        perplexity = order.shape[1] / 3
    logger = logging.getLogger("openTSNE")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        p = joint_probabilities_nn(order, dist, [perplexity], symmetrize=True, n_jobs=1)
    finally:
        logger.setLevel(level)
    return np.asarray(p.toarray(), dtype=np.float64)


def _exact_gradient(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The t-SNE gradient for (B, N, 2) positions and (B, N, N) affinities, in openTSNE's units.

    ``g_i = sum_j (p_ij - q_ij / Z) q_ij (y_i - y_j)`` with ``q_ij = 1 / (1 + |y_i - y_j|**2)``
    and ``Z = sum_{i != j} q_ij`` (openTSNE leaves out the constant factor 4).
    """
    n = y.shape[1]
    sq = np.einsum("bij,bij->bi", y, y)
    q = y @ y.transpose(0, 2, 1)
    q *= -2.0
    q += sq[:, :, None]
    q += sq[:, None, :]
    np.maximum(q, 0.0, out=q)
    q += 1.0
    np.reciprocal(q, out=q)
    diag = np.arange(n)
    q[:, diag, diag] = 0.0
    z = q.sum(axis=(1, 2))
    m = q * (1.0 / z)[:, None, None]
    np.subtract(p, m, out=m)
    m *= q
    return m.sum(axis=2)[:, :, None] * y - m @ y


def _exact_descent(p: np.ndarray, y: np.ndarray, phases: list[tuple[float, int]]) -> np.ndarray:
    """openTSNE's gradient descent (momentum 0.8, gains, min gain 0.01, step norm <= 5) on B layouts.

    ``phases``: (exaggeration, iterations) in order; the gains and the momentum carry over from
    one phase to the next, as in openTSNE's `TSNEEmbedding.optimize(inplace=True)`.
    """
    n = y.shape[1]
    update = np.zeros_like(y)
    gains = np.ones_like(y)
    for exaggeration, n_iter in phases:
        pe = p * exaggeration if exaggeration != 1.0 else p
        lr = n / exaggeration
        for _ in range(n_iter):
            grad = _exact_gradient(y, pe)
            flipped = np.sign(update) != np.sign(grad)
            gains = np.where(flipped, gains + 0.2, gains * 0.8 + 0.01)
            update *= 0.8
            update -= lr * gains * grad
            norms = np.sqrt(np.einsum("bij,bij->bi", update, update))
            big = norms > _MAX_STEP_NORM
            if big.any():
                update[big] *= (_MAX_STEP_NORM / norms[big])[:, None]
            y += update
            y -= y.mean(axis=1, keepdims=True)
    return y
