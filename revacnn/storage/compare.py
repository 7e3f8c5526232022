"""Compare two runs epoch by epoch: metric differences and cumulative training time."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from .store import Store

METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "cumulative_time_s")


def compare_runs(store: Store, run_a: str, run_b: str) -> pd.DataFrame:
    """Per epoch of the two runs' full histories: each run's metrics and ``b - a``.

    Example:
        >>> compare_runs(store, parent_id, fork_id)[["epoch", "val_accuracy_a", "val_accuracy_b"]]
    """
    a = store.run(run_a).metrics().set_index("epoch")
    b = store.run(run_b).metrics().set_index("epoch")
    out = pd.DataFrame(index=sorted(set(a.index) | set(b.index)))
    out.index.name = "epoch"
    for m in METRICS:
        out[f"{m}_a"] = a[m]
        out[f"{m}_b"] = b[m]
        out[f"{m}_diff"] = b[m] - a[m]
    out["source_a"] = a["source_run_id"]
    out["source_b"] = b["source_run_id"]
    return out.reset_index()
