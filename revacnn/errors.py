"""Errors raised by revacnn: one base class, each also a subclass of the matching builtin."""

from __future__ import annotations

__all__ = [
    "RevacnnError",
    "ConfigError",
    "DatasetError",
    "UnsupportedLayerError",
    "StoreError",
    "StoreNotFoundError",
    "StoreURLError",
    "CorruptStoreError",
    "CorruptStoreWarning",
    "StoreWriteError",
    "RunBusyError",
    "RunNotFoundError",
    "EpochNotFoundError",
    "LayerNotFoundError",
    "SQLError",
    "SteeringError",
]


class RevacnnError(Exception):
    """Base class of every error revacnn raises on purpose.

    The CLI turns any `RevacnnError` into one line on stderr and exit code 2.
    """


class ConfigError(RevacnnError, ValueError):
    """A setting or argument has a value revacnn cannot use."""


class DatasetError(RevacnnError, ValueError):
    """A dataset is unknown, unreadable, or cannot be fetched offline."""


class UnsupportedLayerError(RevacnnError, TypeError):
    """A user's model contains a layer type the recording trainer does not support."""


class StoreError(RevacnnError, OSError):
    """The store on disk is missing, unreadable, or corrupt."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store exists at the given path."""


class StoreURLError(StoreError, ValueError):
    """A store URL names an unknown protocol, or one whose fsspec package is not installed."""


class CorruptStoreError(StoreError):
    """A file of the store exists but cannot be read (truncated, garbled, not what it should be).

    The message names the file and what to do; the rest of the store stays readable.
    """


class CorruptStoreWarning(UserWarning):
    """A store-wide read (SQL, the runs table) skipped a corrupt file; the message names it."""


class StoreWriteError(StoreError):
    """The store cannot be written (a full disk, a read-only folder): training stops as `failed`."""


class RunBusyError(RevacnnError, BlockingIOError):
    """Another live process writes this run (it holds the run's lease)."""


class RunNotFoundError(RevacnnError, KeyError):
    """No run with the given id exists in the store."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text.
        return str(self.args[0]) if self.args else ""


class EpochNotFoundError(RevacnnError, KeyError):
    """The run has no committed record for the requested epoch."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class LayerNotFoundError(RevacnnError, KeyError):
    """The model or record has no layer with the requested name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class SQLError(RevacnnError, ValueError):
    """A user query was refused (not a single SELECT, touches files) or failed."""


class SteeringError(RevacnnError, ValueError):
    """A steering command is malformed or cannot be applied to the run."""
