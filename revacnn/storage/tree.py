"""The sessions of a store and their fork trees, as data and as text."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from ..errors import RevacnnError

if TYPE_CHECKING:
    from .store import Store

SUMMARY_COLUMNS = ["run_id", "session_id", "parent_run_id", "fork_epoch", "name", "status", "created_at",
                   "last_epoch", "best_val_accuracy", "train_time_s"]


def run_summary(store: Store) -> pd.DataFrame:
    """One row per run: lineage, status, last epoch, best validation accuracy, training time.

    Read from each run's history (`Run.metrics`, the ``epochs`` rows of `Run.history`), without
    building the SQL engine: the run picker of a store with a million filter rows opens at once.

    Example:
        >>> run_summary(store)[["run_id", "last_epoch", "best_val_accuracy"]]
    """
    runs = store.runs().sort_values("created_at", kind="stable")
    rows = []
    for r in runs.to_dict("records"):
        try:
            m = store.run(r["run_id"]).metrics()
        except RevacnnError:
            m = pd.DataFrame()
        has = len(m) > 0

        def top(col: str, m: pd.DataFrame = m, has: bool = has) -> float:
            v = pd.to_numeric(m[col], errors="coerce").max() if has and col in m else float("nan")
            return float(v) if pd.notna(v) else float("nan")

        rows.append({**{k: r.get(k) for k in SUMMARY_COLUMNS[:7]}, "last_epoch": top("epoch"),
                     "best_val_accuracy": top("val_accuracy"), "train_time_s": top("cumulative_time_s")})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def tree_rows(store: Store) -> list[dict[str, Any]]:
    """Runs in depth-first fork-tree order, each with a ``depth`` and its session's row."""
    runs = run_summary(store)
    sessions = store.sessions().set_index("session_id")
    children: dict[Any, list[dict[str, Any]]] = {}
    for row in runs.to_dict("records"):
        parent = row["parent_run_id"] if isinstance(row["parent_run_id"], str) else None
        children.setdefault((row["session_id"], parent), []).append(row)
    out: list[dict[str, Any]] = []

    def walk(session_id: str, parent: str | None, depth: int) -> None:
        for row in children.get((session_id, parent), []):
            out.append({**row, "depth": depth})
            walk(session_id, row["run_id"], depth + 1)

    for sid in sessions.index:
        walk(sid, None, 0)
    return out


def format_tree(store: Store) -> str:
    """The text `revacnn runs` prints."""
    sessions = store.sessions()
    if sessions.empty:
        return f"No sessions in {store.root} yet: record one with `revacnn train`."
    rows = tree_rows(store)
    lines = []
    for s in sessions.to_dict("records"):
        lines.append(f"session {s['session_id']}  dataset={s['dataset']} model={s['model']} probes={s['n_probes']}")
        for r in (r for r in rows if r["session_id"] == s["session_id"]):
            pad = "  " + "   " * r["depth"] + ("└─ " if r["depth"] else "")
            fork = f" fork@{int(r['fork_epoch'])}" if pd.notna(r["fork_epoch"]) else ""
            acc = f"{r['best_val_accuracy']:.3f}" if pd.notna(r["best_val_accuracy"]) else "-"
            last = int(r["last_epoch"]) if pd.notna(r["last_epoch"]) else "-"
            lines.append(
                f"{pad}{r['run_id']}  {r['name']!s:<14} {r['status']:<11}{fork}  epochs={last} best_val_acc={acc}"
            )
    return "\n".join(lines)
