"""Column schemas of the SQL tables (Arrow types for the Parquet segments, DDL for empty tables)."""

from __future__ import annotations

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")

#: Tables stored as per-epoch Parquet segments under ``runs/<run>/tables/<table>/``.
SEGMENT_TABLES: dict[str, pa.Schema] = {
    "epochs": pa.schema(
        [
            ("run_id", pa.string()),
            ("epoch", pa.int32()),
            ("loss", pa.float64()),
            ("accuracy", pa.float64()),
            ("val_loss", pa.float64()),
            ("val_accuracy", pa.float64()),
            ("lr", pa.float64()),
            ("duration_s", pa.float64()),
            ("committed_at", TS),
            # extras
            ("cumulative_time_s", pa.float64()),  # training seconds since the root run's epoch 0
            ("n_batches", pa.int32()),
            ("step", pa.int64()),  # optimizer iterations so far
        ]
    ),
    "layers": pa.schema(
        [
            ("run_id", pa.string()),
            ("epoch", pa.int32()),
            ("layer", pa.string()),
            ("kind", pa.string()),
            ("n_filters", pa.int32()),
            ("frozen", pa.bool_()),
            ("n_frozen_filters", pa.int32()),
            ("grad_l1", pa.float64()),
            ("weight_l2", pa.float64()),
            ("cluster_score", pa.float64()),
            ("rgb_mono_fraction", pa.float64()),
            # extras
            ("layer_index", pa.int32()),
            ("weight_change_l1", pa.float64()),
            ("act_mean", pa.float64()),
            ("n_params", pa.int64()),
        ]
    ),
    "filters": pa.schema(
        [
            ("run_id", pa.string()),
            ("epoch", pa.int32()),
            ("layer", pa.string()),
            ("filter", pa.int32()),
            ("filter_uid", pa.int64()),
            ("frozen", pa.bool_()),
            ("grad_l1", pa.float64()),
            ("weight_l2", pa.float64()),
            ("weight_change_l1", pa.float64()),
            ("act_mean", pa.float64()),
            ("tsne_x", pa.float64()),
            ("tsne_y", pa.float64()),
            ("dominant_channel", pa.int8()),
            ("share_r", pa.float64()),
            ("share_g", pa.float64()),
            ("share_b", pa.float64()),
            # extras
            ("layer_tsne_x", pa.float64()),  # layer-level embedding (all layers in one picture)
            ("layer_tsne_y", pa.float64()),
            ("act_max", pa.float64()),
        ]
    ),
    "predictions": pa.schema(
        [
            ("run_id", pa.string()),
            ("epoch", pa.int32()),
            ("probe", pa.int32()),
            ("predicted", pa.int32()),
            ("confidence", pa.float64()),
            # extras
            ("label", pa.int32()),
            ("correct", pa.bool_()),
        ]
    ),
    # The filter doctor's findings (revacnn/analysis/doctor.py, docs/diagnoses.md).
    "diagnoses": pa.schema(
        [
            ("run_id", pa.string()),
            ("epoch", pa.int32()),
            ("layer", pa.string()),
            ("filter_uid", pa.int64()),  # NULL for a layer-level finding
            ("kind", pa.string()),  # dead | redundant | converged | cluster_pattern | rgb_pattern
            ("score", pa.float64()),
            ("suggestion", pa.string()),  # JSON steering command, or NULL
            ("message", pa.string()),
            # extras
            ("filter", pa.int32()),  # the filter's index at that epoch
        ]
    ),
}

EVENTS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("event_id", pa.string()),
        ("epoch", pa.int32()),
        ("batch", pa.int32()),
        ("at", TS),
        ("kind", pa.string()),
        ("args", pa.string()),  # JSON
        ("status", pa.string()),  # applied | rejected
        ("message", pa.string()),
        # extras
        ("sent_at", TS),
        ("latency_ms", pa.float64()),
    ]
)

PROBES_COLUMNS = ["session_id", "probe", "label", "class_name", "val_index"]
SESSIONS_COLUMNS = ["session_id", "created_at", "dataset", "model", "n_probes", "config"]
RUNS_COLUMNS = [
    "run_id",
    "session_id",
    "parent_run_id",
    "fork_epoch",
    "name",
    "status",
    "created_at",
    "finished_at",
    "config",
]

_DUCK = {
    pa.string(): "VARCHAR",
    pa.int8(): "TINYINT",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float64(): "DOUBLE",
    pa.bool_(): "BOOLEAN",
    TS: "TIMESTAMPTZ",
}


def ddl(name: str, schema: pa.Schema) -> str:
    """``CREATE TABLE`` statement for an empty table with ``schema``."""
    cols = ", ".join(f'"{f.name}" {_DUCK[f.type]}' for f in schema)
    return f'CREATE TABLE "{name}" ({cols})'
