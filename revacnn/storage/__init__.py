"""The store: Zarr arrays for tensors, Parquet tables queried with DuckDB, one folder per store."""

from __future__ import annotations

from .sql import EXAMPLE_QUERIES, TABLES, check_select
from .store import EpochRecord, LayerRecord, Run, Store, open_store
from .writer import RunWriter, create_session

__all__ = [
    "EXAMPLE_QUERIES",
    "TABLES",
    "EpochRecord",
    "LayerRecord",
    "Run",
    "RunWriter",
    "Store",
    "check_select",
    "create_session",
    "open_store",
]
