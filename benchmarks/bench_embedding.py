"""Benchmark: filter-embedding cost per epoch (warm-started vs cold) and track stability.

Run ``python benchmarks/bench_embedding.py [--epochs N]``. For layers of 16, 64 and 512 filters
(kernel sizes 3x3x3, 3x3x32 and 3x3x256) it simulates training as features that drift a little
each epoch, then prints:

- the cost of one `EmbeddingTracker.embed` call: the first (cold) call and the warm-started
  calls of later epochs, next to re-running a cold t-SNE every epoch;
- the stability ratio: mean displacement of filters between consecutive epochs (after optimal
  rotation/reflection/scale/translation, in units of the layout's RMS radius) for independent
  t-SNE runs (openTSNE, random initialisation, a different seed per run) divided by the same
  for the tracked embedding. Higher is more stable; the tests require > 3;
- the cost of the pattern measures (cluster score, RGB shares) for comparison.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from revacnn.analysis import EmbeddingTracker, cluster_score, procrustes_align, rgb_mono_fraction

LAYERS = ((16, (3, 3, 3)), (64, (3, 3, 32)), (512, (3, 3, 256)))


def rms_radius(points: np.ndarray) -> float:
    """Root-mean-square distance of the points from their centroid."""
    return float(np.sqrt(np.mean(np.sum((points - points.mean(axis=0)) ** 2, axis=1))))


def displacement(before: np.ndarray, after: np.ndarray) -> float:
    """Mean move from `before` to `after` (optimally aligned, with scale), per RMS radius."""
    aligned = procrustes_align(after, before, scale=True)
    return float(np.mean(np.linalg.norm(aligned - before, axis=1)) / rms_radius(before))


def drifting_features(
    n_filters: int, shape: tuple[int, ...], epochs: int, step: float, seed: int
) -> list[np.ndarray]:
    """Filters in 8 loose groups; each epoch adds Gaussian noise of `step` per weight."""
    rng = np.random.default_rng(seed)
    dim = int(np.prod(shape))
    centres = rng.normal(size=(8, dim))
    x = centres[np.arange(n_filters) % 8] + 0.7 * rng.normal(size=(n_filters, dim))
    out = [x]
    for _ in range(epochs - 1):
        out.append(out[-1] + step * rng.normal(size=x.shape))
    return out


def independent_tsne(x: np.ndarray, seed: int) -> np.ndarray:
    """A t-SNE run as one would do without tracking: openTSNE, random init, its own seed."""
    from openTSNE import TSNE

    perplexity = min(30.0, max(2.0, (len(x) - 1) / 3))
    tsne = TSNE(
        perplexity=perplexity,
        initialization="random",
        random_state=seed,
        n_jobs=1,
        negative_gradient_method="bh",
        n_iter=300,
    )
    return np.asarray(tsne.fit(x))


def bench_layer(n_filters: int, shape: tuple[int, ...], epochs: int, step: float) -> dict:
    """Time and measure one layer size; returns the numbers printed in one table row."""
    feats = drifting_features(n_filters, shape, epochs, step, seed=n_filters)
    uids = np.arange(n_filters)
    tracker = EmbeddingTracker(seed=0)
    times, cpu, layouts = [], [], []
    for x in feats:
        t0, c0 = time.perf_counter(), time.process_time()
        layouts.append(tracker.embed("conv", uids, x))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    cold_each = []
    for x in feats[1:3]:
        t0 = time.perf_counter()
        EmbeddingTracker(seed=0).embed("conv", uids, x)
        cold_each.append(time.perf_counter() - t0)
    tracked = statistics.mean(
        displacement(a, b) for a, b in zip(layouts[:-1], layouts[1:], strict=True)
    )
    independent = statistics.mean(
        displacement(independent_tsne(feats[e], e), independent_tsne(feats[e + 1], e + 100))
        for e in range(2)
    )
    kernel = feats[-1].reshape((n_filters, *shape))
    t0 = time.perf_counter()
    cluster_score(feats[-1])
    if shape[-1] == 3:
        rgb_mono_fraction(kernel)
    patterns = time.perf_counter() - t0
    return {
        "filters": n_filters,
        "dim": int(np.prod(shape)),
        "first_cold_s": times[0],
        "warm_s": statistics.median(times[1:]),
        "warm_cpu_s": statistics.median(cpu[1:]),
        "first_cold_cpu_s": cpu[0],
        "cold_each_s": statistics.median(cold_each),
        "tracked": tracked,
        "independent": independent,
        "patterns_s": patterns,
    }


def main() -> None:
    """Parse arguments, run every layer size, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="simulated epochs per layer")
    parser.add_argument(
        "--step",
        type=float,
        default=0.05,
        help="per-epoch feature noise, relative to the weights' spread",
    )
    args = parser.parse_args()
    EmbeddingTracker().embed("warmup", np.arange(5), np.eye(5))  # import openTSNE once
    print(
        f"CPU cores available: {len(os.sched_getaffinity(0))}; epochs: {args.epochs}; "
        f"drift per epoch: {args.step}"
    )
    header = (
        f"{'filters':>7} {'dim':>5} {'cold 1st s (cpu)':>16} {'warm s (cpu)':>13}"
        f" {'cold/epoch s':>12}"
        f" {'disp tracked':>12} {'disp indep':>10} {'stability':>9} {'patterns ms':>11}"
    )
    print(header)
    print("-" * len(header))
    for n_filters, shape in LAYERS:
        r = bench_layer(n_filters, shape, args.epochs, args.step)
        cold = f"{r['first_cold_s']:.3f} ({r['first_cold_cpu_s']:.3f})"
        warm = f"{r['warm_s']:.3f} ({r['warm_cpu_s']:.3f})"
        print(
            f"{r['filters']:>7} {r['dim']:>5} {cold:>16} {warm:>13}"
            f" {r['cold_each_s']:>12.3f} {r['tracked']:>12.3f} {r['independent']:>10.3f}"
            f" {r['independent'] / r['tracked']:>8.1f}x {1000 * r['patterns_s']:>11.2f}"
        )
    print(
        "s: wall seconds per embed call (cpu: process CPU seconds); cold/epoch: a fresh cold "
        "t-SNE every epoch instead of warm starts"
    )
    print(
        "disp: mean filter displacement between consecutive epochs after optimal alignment, "
        "in RMS radii; stability = disp indep / disp tracked"
    )


if __name__ == "__main__":
    main()
