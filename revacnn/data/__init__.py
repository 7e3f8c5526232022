"""Datasets: the generated offline ``shapes`` set, CIFAR-10 from a local copy, keras.datasets; probes.

`load_dataset` returns a `Dataset`: uint8 channels-last images and int64 labels for a
training and a validation split (the official test split for the real sets). Subsampling
with ``train_size``/``val_size`` is stratified (class proportions kept, see
`stratified_subset`) and deterministic per seed; for ``shapes`` the sizes are generated
directly. `select_probes` picks the session's fixed probe images from the validation labels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from revacnn.errors import ConfigError, DatasetError

from .probes import select_probes, stratified_subset

__all__ = ["DATASETS", "Dataset", "load_dataset", "select_probes", "stratified_subset"]

DATASETS: tuple[str, ...] = ("shapes", "cifar10", "mnist", "fashion_mnist")


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A training and a validation split of one image classification dataset.

    Attributes:
        name: one of `DATASETS` (or a user's own name).
        x_train: uint8 (N, H, W, C) channels-last images.
        y_train: int64 (N,) labels, indices into ``class_names``.
        x_val: uint8 (M, H, W, C) validation images.
        y_val: int64 (M,) validation labels.
        class_names: human-readable class names.

    Instances compare by identity (they hold arrays). Construction checks the layout and
    raises `DatasetError` on a mismatch.

    Example:
        >>> x = np.zeros((4, 8, 8, 3), np.uint8)
        >>> ds = Dataset("tiny", x, np.array([0, 1, 0, 1]), x[:2], np.array([0, 1]), ("a", "b"))
        >>> ds.input_shape, ds.num_classes
        ((8, 8, 3), 2)
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        names = tuple(str(c) for c in self.class_names)
        object.__setattr__(self, "class_names", names)
        shapes = []
        for split, xs, ys in (
            ("train", self.x_train, self.y_train),
            ("val", self.x_val, self.y_val),
        ):
            xs, ys = np.asarray(xs), np.asarray(ys)
            if xs.dtype != np.uint8 or xs.ndim != 4:
                raise DatasetError(
                    f"Dataset {self.name!r}: bad x_{split}. Received: shape {xs.shape}, dtype "
                    f"{xs.dtype} (expected uint8 (N, H, W, C))"
                )
            if ys.ndim != 1 or len(ys) != len(xs) or not np.issubdtype(ys.dtype, np.integer):
                raise DatasetError(
                    f"Dataset {self.name!r}: bad y_{split}. Received: shape {ys.shape}, dtype "
                    f"{ys.dtype} for {len(xs)} images (expected one integer label per image)"
                )
            if ys.size and (ys.min() < 0 or ys.max() >= len(names)):
                raise DatasetError(
                    f"Dataset {self.name!r}: y_{split} out of range. Received: labels from "
                    f"{ys.min()} to {ys.max()} with {len(names)} class names "
                    f"(expected 0 to {len(names) - 1})"
                )
            object.__setattr__(self, f"x_{split}", xs)
            object.__setattr__(self, f"y_{split}", ys.astype(np.int64, copy=False))
            shapes.append(xs.shape[1:])
        if shapes[0] != shapes[1]:
            raise DatasetError(
                f"Dataset {self.name!r}: train and val images differ. Received: {shapes[0]} "
                f"and {shapes[1]} (expected the same (H, W, C))"
            )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        h, w, c = (int(v) for v in self.x_train.shape[1:])
        return h, w, c

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(class_names)``)."""
        return len(self.class_names)

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={len(self.y_train)}, val={len(self.y_val)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


def _normalise_name(name: object) -> str:
    """``"Fashion-MNIST"`` -> ``"fashion_mnist"``; unknown names raise DatasetError."""
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else None
    if key not in DATASETS:
        raise DatasetError(
            f"Unknown dataset {name!r}. Received: dataset={name!r} "
            f"(expected one of {', '.join(DATASETS)})"
        )
    return key


def _subsample(
    x: np.ndarray, y: np.ndarray, size: int | None, seed: int, stream: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified ``size``-image subset of a split (all of it when ``size`` is None)."""
    if size is None:
        return x, y
    ok = isinstance(size, (int, np.integer)) and not isinstance(size, bool)
    if not ok or not 1 <= size <= len(y):
        raise ConfigError(
            f"Cannot take {size!r} {what} images: the split has {len(y)}. "
            f"Received: {what}_size={size!r} (expected an integer from 1 to {len(y)})"
        )
    if size == len(y):
        return x, y
    idx = stratified_subset(y, int(size), seed=(seed, stream))
    return x[idx], y[idx]


def load_dataset(
    name: str = "shapes",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    train_size: int | None = None,
    val_size: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Load a dataset by name.

    * ``shapes``: generated offline (`revacnn.data.shapes`), 50,000 + 10,000 images by
      default; ``train_size``/``val_size`` set how many are generated.
    * ``cifar10``: from ``data_dir`` when given (folder or ``cifar-10-python.tar.gz``, see
      `revacnn.data.cifar`), else downloaded by ``keras.datasets``.
    * ``mnist``, ``fashion_mnist``: from ``data_dir`` when given (``mnist.npz`` or the four
      IDX files), else downloaded by ``keras.datasets``; images get a channel axis.

    For the real sets validation is the official test split, and ``train_size``/``val_size``
    take a stratified subset, deterministic per seed (training and validation from different
    streams of the seed).

    Args:
        name: one of `DATASETS`; case and ``-`` versus ``_`` do not matter.
        data_dir: local copy of the data (not used by ``shapes``).
        train_size: number of training images (default: all, or 50,000 for ``shapes``).
        val_size: number of validation images (default: all, or 10,000 for ``shapes``).
        seed: non-negative seed for generation and subsampling.

    Returns:
        The `Dataset`.

    Raises:
        DatasetError: unknown name, missing or malformed local files, or a failed download
            (the message says how to continue offline).
        ConfigError: a size out of range, a negative seed, or ``data_dir`` with ``shapes``.

    Example:
        >>> ds = load_dataset("shapes", train_size=1000, val_size=200, seed=0)
        >>> ds.x_train.shape, ds.x_val.shape, ds.num_classes
        ((1000, 32, 32, 3), (200, 32, 32, 3), 10)
        >>> ds.class_names[0]
        'red circle'
    """
    key = _normalise_name(name)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"Invalid seed. Received: seed={seed!r} (expected an integer >= 0)")
    seed = int(seed)
    if key == "shapes":
        if data_dir is not None:
            raise ConfigError(
                "The shapes dataset is generated and reads no files. "
                f"Received: data_dir={str(data_dir)!r} (expected no data directory with shapes)"
            )
        from .shapes import CLASS_NAMES, load_shapes

        for what, size in (("train", train_size), ("val", val_size)):
            ok = isinstance(size, (int, np.integer)) and not isinstance(size, bool)
            if size is not None and (not ok or size < 1):
                raise ConfigError(
                    f"Cannot generate {size!r} {what} images. "
                    f"Received: {what}_size={size!r} (expected an integer >= 1)"
                )
        x, y, xv, yv = load_shapes(train_size, val_size, seed)
        return Dataset(key, x, y, xv, yv, CLASS_NAMES)

    from . import _keras

    if key == "cifar10" and data_dir is not None:
        from .cifar import load_cifar10_local

        x, y, xv, yv, names = load_cifar10_local(data_dir)
    elif data_dir is not None:
        x, y, xv, yv = _keras.load_mnist_local(key, data_dir)
        names = _keras.CLASS_NAMES[key]
    else:
        x, y, xv, yv = _keras.load_keras_dataset(key)
        names = _keras.CLASS_NAMES[key]
    x, y = _subsample(x, y, train_size, seed, 0, "train")
    xv, yv = _subsample(xv, yv, val_size, seed, 1, "val")
    return Dataset(key, x, y, xv, yv, names)
