"""The store: Zarr arrays for tensors, Parquet tables queried with DuckDB, one folder per store.

This package imports nothing above it (no trainer, no steering, no TensorFlow); the conveniences
that cross layers (`Run.fork`, `Run.steer`, `Run.load_model`) are wired by `revacnn._facade`.
The names below are its public interface; modules outside `revacnn.storage` import only these.
"""

from __future__ import annotations

from ._backend import is_url, store_key
from ._durable import fsync_dir
from ._layout import atomic_write_json
from ._schema import EVENTS_SCHEMA
from ._tables import event_files, read_tables
from .sql import EXAMPLE_QUERIES, TABLES, check_select
from .store import EpochRecord, LayerRecord, Run, Store, open_store
from .writer import RunWriter, create_session

__all__ = [
    "EVENTS_SCHEMA",
    "EXAMPLE_QUERIES",
    "TABLES",
    "EpochRecord",
    "LayerRecord",
    "Run",
    "RunWriter",
    "Store",
    "atomic_write_json",
    "check_select",
    "create_session",
    "event_files",
    "fsync_dir",
    "is_url",
    "open_store",
    "read_tables",
    "store_key",
]
