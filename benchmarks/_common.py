"""Shared helpers of the benchmarks: quiet TensorFlow, timing, and a results table printer."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@contextmanager
def timer(out: list[float]):
    t = time.perf_counter()
    yield
    out.append(time.perf_counter() - t)


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def table(rows: list[dict[str, Any]], cols: list[str] | None = None) -> str:
    """A GitHub-markdown table of ``rows``."""
    if not rows:
        return "(no rows)"
    cols = cols or list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def dir_bytes(path: str | os.PathLike[str], predicate: Callable[[str], bool] = lambda p: True) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if predicate(p):
                total += os.path.getsize(p)
    return total
