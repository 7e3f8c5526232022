"""Compatibility alias: the live snapshot lives in `revacnn.storage.live` (no TensorFlow import)."""

from __future__ import annotations

from ..storage.live import read_live_snapshot, write_live_snapshot

__all__ = ["read_live_snapshot", "write_live_snapshot"]
