"""Training and validation data as the user gives it: arrays, a tf.data.Dataset or a keras.utils.PyDataset.

* Arrays ``(x, y)`` of any numeric dtype are fed exactly as given (float64 becomes Keras' float
  type, as ``model.fit`` does; nothing is rescaled, clipped or cast to uint8). Labels may be
  integers or one-hot. The training arrays live on the device once; each step gathers its batch
  by indices, in an order fixed by ``(seed, epoch)``: forks and resumes replay it exactly.
* A ``tf.data.Dataset`` of ``(x, y)`` batches is iterated once per epoch as it is (the user's own
  shuffling, augmentation and prefetching). Iteration ``e`` of a dataset is its ``e``-th
  iterator: a fork or resume at epoch ``k`` creates and drops ``k`` iterators first, so a
  ``shuffle(seed=…)`` and seeded random ops replay exactly.
* A ``keras.utils.PyDataset`` is read batch by batch (``ds[i]``), with ``on_epoch_end()`` after
  each epoch; a fork or resume at epoch ``k`` calls ``on_epoch_end()`` ``k`` times first.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ..errors import ConfigError


def _as_array(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise ConfigError(f"Received: {what} of dtype {a.dtype} (expected a numeric array)")
    if a.dtype == np.float64:
        a = a.astype(keras.config.floatx())
    return a


def _labels(y: Any, n: int, what: str) -> np.ndarray:
    a = _as_array(y, what)
    if len(a) != n:
        raise ConfigError(f"Received: {n} examples and {len(a)} labels in {what} (expected the same number)")
    return a


def class_indices(y: np.ndarray) -> np.ndarray:
    """Integer class of each label (one-hot labels -> argmax), for probe choice and the tables."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        y = y.argmax(axis=1)
    return y.reshape(-1).astype(np.int64)


def _first_examples(batches: Iterator[tuple[Any, Any]], limit: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The leading batches of ``batches`` holding at least ``limit`` examples, as numpy lists."""
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    n = 0
    for x, y in batches:
        xs.append(np.asarray(x))
        ys.append(np.asarray(y))
        n += len(xs[-1])
        if n >= limit:
            break
    return xs, ys


class ArraySource:
    """In-memory ``(x, y)`` arrays, as given."""

    kind = "arrays"

    def __init__(self, x: Any, y: Any, what: str = "x") -> None:
        self.x = _as_array(x, what)
        if self.x.ndim < 2:
            raise ConfigError(f"Received: {what} with shape {self.x.shape} (expected (N, ...) examples)")
        self.y = _labels(y, len(self.x), f"{what}'s labels")
        self._dev: tuple[tf.Tensor, tf.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.x)

    def device(self) -> tuple[tf.Tensor, tf.Tensor]:
        """The arrays as device-resident tensors (made once), in their own dtypes."""
        if self._dev is None:
            self._dev = (tf.constant(self.x), tf.constant(self.y))
        return self._dev

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """The data order of ``epoch``: a permutation fixed by (seed, epoch), so forks replay it."""
        return np.random.default_rng([int(seed), int(epoch)]).permutation(len(self.x)).astype(np.int32)

    def n_batches(self, batch_size: int) -> int:
        return (len(self.x) + batch_size - 1) // batch_size

    def eval_batches(self, batch_size: int) -> Iterator[tuple[Any, Any]]:
        for i in range(0, len(self.x), batch_size):
            yield self.x[i : i + batch_size], self.y[i : i + batch_size]

    def sample(self, limit: int) -> tuple[np.ndarray, np.ndarray]:
        return self.x[:limit], self.y[:limit]


class DatasetSource:
    """A ``tf.data.Dataset`` of ``(x, y)`` batches, iterated as it is."""

    kind = "tf.data"

    def __init__(self, ds: tf.data.Dataset, what: str = "data") -> None:
        spec = ds.element_spec
        if not isinstance(spec, tuple) or len(spec) < 2:
            raise ConfigError(
                f"Received: a tf.data.Dataset in {what} whose elements are {spec} "
                "(expected (x, y) batches, e.g. ds.batch(64))"
            )
        self.ds = ds
        self.iterations = 0  # iterators created so far (= epochs begun)

    def n_batches(self, batch_size: int) -> int | None:
        n = int(self.ds.cardinality())
        return n if n >= 0 else None

    def skip_to(self, epoch: int) -> None:
        """Make the next iteration the dataset's ``epoch``-th (1-based), creating and dropping iterators."""
        while self.iterations < epoch - 1:
            iter(self.ds)
            self.iterations += 1

    def epoch_batches(self, epoch: int) -> Iterator[tuple[Any, Any]]:
        self.skip_to(epoch)
        self.iterations += 1
        for batch in self.ds:
            yield batch[0], batch[1]

    def eval_batches(self, batch_size: int) -> Iterator[tuple[Any, Any]]:
        for batch in self.ds:
            yield batch[0], batch[1]

    def sample(self, limit: int) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = _first_examples(self.eval_batches(0), limit)
        if not xs:
            raise ConfigError("Received: an empty tf.data.Dataset (expected (x, y) batches)")
        return np.concatenate(xs)[:limit], np.concatenate(ys)[:limit]


class PyDatasetSource:
    """A ``keras.utils.PyDataset`` (or any ``Sequence`` of ``(x, y)`` batches)."""

    kind = "PyDataset"

    def __init__(self, ds: Any, what: str = "data") -> None:
        self.ds = ds
        self.epochs_ended = 0

    def n_batches(self, batch_size: int) -> int | None:
        return len(self.ds)

    def skip_to(self, epoch: int) -> None:
        while self.epochs_ended < epoch - 1:
            self.ds.on_epoch_end()
            self.epochs_ended += 1

    def epoch_batches(self, epoch: int) -> Iterator[tuple[Any, Any]]:
        self.skip_to(epoch)
        if hasattr(self.ds, "on_epoch_begin"):
            self.ds.on_epoch_begin()
        for i in range(len(self.ds)):
            b = self.ds[i]
            yield b[0], b[1]
        self.ds.on_epoch_end()
        self.epochs_ended += 1

    def eval_batches(self, batch_size: int) -> Iterator[tuple[Any, Any]]:
        for i in range(len(self.ds)):
            b = self.ds[i]
            yield b[0], b[1]

    def sample(self, limit: int) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = _first_examples(self.eval_batches(0), limit)
        return np.concatenate(xs)[:limit], np.concatenate(ys)[:limit]


Source = ArraySource | DatasetSource | PyDatasetSource


def as_source(data: Any, what: str) -> Source:
    """Wrap ``(x, y)`` arrays, a tf.data.Dataset or a PyDataset; raise `ConfigError` on anything else."""
    if isinstance(data, (ArraySource, DatasetSource, PyDatasetSource)):
        return data
    if isinstance(data, tf.data.Dataset):
        return DatasetSource(data, what)
    if isinstance(data, keras.utils.PyDataset) or (
        hasattr(data, "__getitem__") and hasattr(data, "__len__") and hasattr(data, "on_epoch_end")
    ):
        return PyDatasetSource(data, what)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return ArraySource(data[0], data[1], what)
    raise ConfigError(
        f"Received: {what} of type {type(data).__name__} (expected (x, y) arrays, a tf.data.Dataset "
        "or a keras.utils.PyDataset of (x, y) batches)"
    )
