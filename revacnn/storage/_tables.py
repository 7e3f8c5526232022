"""Parquet table segments: write one epoch's rows atomically, list and read committed segments."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ._layout import EPOCH_RE, Layout, tmp_path_for
from ._schema import EVENTS_SCHEMA, SEGMENT_TABLES

COMPACT_PREFIX = "compact-"


def to_table(rows: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Build an Arrow table with exactly ``schema`` from columns or row dicts; missing columns are null."""
    if isinstance(rows, Mapping):
        n = len(next(iter(rows.values()))) if rows else 0
        cols = {f.name: rows.get(f.name, [None] * n) for f in schema}
    else:
        cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    arrays = []
    for f in schema:
        values = cols[f.name]
        if hasattr(values, "tolist"):
            values = values.tolist()
        arrays.append(pa.array(values, type=f.type, from_pandas=True))
    return pa.Table.from_arrays(arrays, schema=schema)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` through a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def segment_epoch(path: Path) -> int | None:
    """The epoch number of a segment file name, or None for other files."""
    m = EPOCH_RE.match(path.name)
    return int(m.group(1)) if m else None


def compact_upto(path: Path) -> int | None:
    """The last epoch a ``compact-eNNNNN.parquet`` file holds, or None."""
    name = path.name
    if name.startswith(COMPACT_PREFIX) and name.endswith(".parquet"):
        m = EPOCH_RE.match(name[len(COMPACT_PREFIX) :])
        return int(m.group(1)) if m else None
    return None


def committed_epochs(layout: Layout, run_id: str) -> list[int]:
    """Epochs of ``run_id`` whose commit marker (the ``epochs`` row) exists, ascending."""
    files = table_files(layout, run_id, "epochs", committed=None)
    epochs: set[int] = set()
    for f in files:
        e = segment_epoch(f)
        if e is not None:
            epochs.add(e)
        else:
            epochs.update(pq.read_table(f, columns=["epoch"]).column("epoch").to_pylist())
    return sorted(epochs)


def table_files(
    layout: Layout, run_id: str, table: str, committed: set[int] | None
) -> list[Path]:
    """The Parquet files holding ``table`` rows of ``run_id``.

    A compacted file ``compact-eNNNNN.parquet`` replaces the segments up to epoch NNNNN; segments
    left beside it (a crash during compaction) are skipped. With ``committed`` given, only segments
    of those epochs are returned, so a half-written epoch stays invisible.
    """
    d = layout.table_dir(run_id, table)
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return []
    paths = [d / n for n in names if not n.startswith(".")]
    upto = -1
    compacts = []
    for p in paths:
        c = compact_upto(p)
        if c is not None and c > upto:
            upto = c
            compacts = [p]
    out = list(compacts)
    for p in paths:
        e = segment_epoch(p)
        if e is None or e <= upto:
            continue
        if committed is not None and e not in committed:
            continue
        out.append(p)
    return out


def event_files(layout: Layout, run_id: str) -> list[Path]:
    """Event files of a run (one Parquet file per event), in the order they were written."""
    d = layout.events_dir(run_id)
    try:
        return [d / n for n in sorted(os.listdir(d)) if n.endswith(".parquet") and not n.startswith(".")]
    except FileNotFoundError:
        return []


def read_tables(paths: Sequence[Path], schema: pa.Schema) -> pa.Table:
    """Read and concatenate Parquet files, cast to ``schema``; vanished files are skipped."""
    parts = []
    for p in paths:
        try:
            t = pq.read_table(p)
        except FileNotFoundError:
            continue
        parts.append(_conform(t, schema))
    if not parts:
        return schema.empty_table()
    return pa.concat_tables(parts)


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    cols = []
    for f in schema:
        if f.name in t.column_names:
            cols.append(t.column(f.name).cast(f.type))
        else:
            cols.append(pa.nulls(t.num_rows, type=f.type))
    return pa.Table.from_arrays(cols, schema=schema)


__all__ = [
    "EVENTS_SCHEMA",
    "SEGMENT_TABLES",
    "committed_epochs",
    "event_files",
    "read_tables",
    "table_files",
    "to_table",
    "write_parquet_atomic",
]
