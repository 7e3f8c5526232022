"""The live snapshot: a light, frequently replaced picture of a running training for the live app."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from .store import Store


def write_live_snapshot(
    store: Store,
    run_id: str,
    meta: dict[str, Any],
    kernels: dict[str, np.ndarray],
    activations: dict[str, np.ndarray],
    probabilities: np.ndarray,
    batch_history: list[tuple[int, int, float, float, float]],
) -> None:
    """Atomically replace ``runs/<run>/live/snapshot.npz`` (kernels, probe activations, batch curves)."""
    d = store.layout.live_dir(run_id)
    d.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"__meta__": np.array(json.dumps(meta, default=str))}
    for name, k in kernels.items():
        arrays[f"kernel/{name}"] = k.astype(np.float32)
    for name, a in activations.items():
        arrays[f"activations/{name}"] = a
    arrays["probabilities"] = np.asarray(probabilities, np.float32)
    hist = np.asarray(batch_history, np.float64).reshape(-1, 5)
    arrays["batches"] = hist
    tmp = d / ".snapshot.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, d / "snapshot.npz")


def read_live_snapshot(store: Store, run_id: str) -> dict[str, Any] | None:
    """The latest live snapshot of a run, or None when there is none (yet)."""
    path = store.layout.live_dir(run_id) / "snapshot.npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            out: dict[str, Any] = {"meta": json.loads(str(z["__meta__"])), "kernels": {}, "activations": {}}
            for key in z.files:
                if key.startswith("kernel/"):
                    out["kernels"][key.split("/", 1)[1]] = z[key]
                elif key.startswith("activations/"):
                    out["activations"][key.split("/", 1)[1]] = z[key]
            out["probabilities"] = z["probabilities"]
            out["batches"] = z["batches"]
            return out
    except (FileNotFoundError, OSError, ValueError, KeyError):
        return None
