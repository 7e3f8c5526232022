"""The keras.datasets sets (cifar10, mnist, fashion_mnist): download, offline errors, local MNIST files.

``keras.datasets.<name>.load_data()`` downloads into ``~/.keras/datasets`` on first use. When
that fails (no network, a proxy, a broken cache) the user gets one `DatasetError` saying
where to get the files and how to pass them with ``--data-dir``, or to use the offline
``shapes`` set. MNIST and Fashion-MNIST can also be read from local files: ``mnist.npz``
(the file keras downloads) or the four IDX files (``train-images-idx3-ubyte[.gz]``, ...).
Keras is imported inside the functions: importing TensorFlow takes seconds.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from revacnn.data.cifar import CIFAR10_CLASSES
from revacnn.errors import DatasetError

__all__ = [
    "KERAS_DATASETS",
    "CLASS_NAMES",
    "DOWNLOAD_HELP",
    "load_keras_dataset",
    "load_mnist_local",
    "standardise",
]

KERAS_DATASETS: tuple[str, ...] = ("cifar10", "mnist", "fashion_mnist")

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "cifar10": CIFAR10_CLASSES,
    "mnist": tuple(str(d) for d in range(10)),
    "fashion_mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
}

DOWNLOAD_HELP: dict[str, str] = {
    "cifar10": (
        "Download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
        "and pass --data-dir PATH"
    ),
    "mnist": (
        "Download mnist.npz from https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
        "mnist.npz and pass --data-dir PATH"
    ),
    "fashion_mnist": (
        "Download the four *-ubyte.gz files from https://github.com/zalandoresearch/"
        "fashion-mnist into one folder and pass --data-dir FOLDER"
    ),
}

_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_val": "t10k-images-idx3-ubyte",
    "y_val": "t10k-labels-idx1-ubyte",
}


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: message`` of an exception on one line, shortened to ``limit`` characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def standardise(
    name: str, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bring arrays as keras returns them to the `Dataset` layout.

    Images become uint8 (N, H, W, C) channels-last (a channel axis is added to greyscale
    (N, H, W) images, channel-first (N, 3, H, W) images are transposed), labels int64 (N,).

    Args:
        name: dataset name, for error messages.
        x: training images.
        y: training labels, (N,) or (N, 1).
        x_val: validation images.
        y_val: validation labels.

    Returns:
        ``(x_train, y_train, x_val, y_val)``.

    Raises:
        DatasetError: the arrays do not look like an image classification set.

    Example:
        >>> x = np.zeros((2, 28, 28), np.uint8)
        >>> out = standardise("mnist", x, np.array([1, 2]), x, np.array([3, 4]))
        >>> out[0].shape, out[1].dtype
        ((2, 28, 28, 1), dtype('int64'))
    """

    def images(a: np.ndarray, split: str) -> np.ndarray:
        a = np.asarray(a)
        if a.ndim == 3:
            a = a[..., None]
        elif a.ndim == 4 and a.shape[1] in (1, 3) and a.shape[-1] not in (1, 3):
            a = a.transpose(0, 2, 3, 1)
        if a.ndim != 4 or a.shape[-1] not in (1, 3):
            raise DatasetError(
                f"Unexpected {name} {split} images. Received: shape {a.shape} "
                "(expected (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3)"
            )
        if a.dtype != np.uint8:
            if a.size and (a.min() < 0 or a.max() > 255 or not np.all(a == np.round(a))):
                raise DatasetError(
                    f"Unexpected {name} {split} images. Received: dtype {a.dtype} with values "
                    f"from {a.min()} to {a.max()} (expected integers 0..255)"
                )
            a = a.astype(np.uint8)
        return np.ascontiguousarray(a)

    def labels(a: np.ndarray, n: int, split: str) -> np.ndarray:
        a = np.asarray(a).reshape(-1)
        if a.shape[0] != n or not (a.size == 0 or np.issubdtype(a.dtype, np.integer)):
            raise DatasetError(
                f"Unexpected {name} {split} labels. Received: {a.shape[0]} labels of dtype "
                f"{a.dtype} for {n} images (expected one integer label per image)"
            )
        return a.astype(np.int64)

    x_tr, x_va = images(x, "training"), images(x_val, "validation")
    return x_tr, labels(y, len(x_tr), "training"), x_va, labels(y_val, len(x_va), "validation")


def load_keras_dataset(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load ``cifar10``, ``mnist`` or ``fashion_mnist`` with ``keras.datasets`` (may download).

    Validation is the set's official test split.

    Args:
        name: one of `KERAS_DATASETS`.

    Returns:
        ``(x_train, y_train, x_val, y_val)``: uint8 (N, H, W, C) images, int64 labels.

    Raises:
        DatasetError: the download or the cached file failed; the message says how to
            continue offline.

    Example:
        >>> x, y, xv, yv = load_keras_dataset("mnist")  # doctest: +SKIP
        >>> x.shape, xv.shape  # doctest: +SKIP
        ((60000, 28, 28, 1), (10000, 28, 28, 1))
    """
    if name not in KERAS_DATASETS:
        raise DatasetError(
            f"Unknown keras dataset {name!r}. Received: name={name!r} "
            f"(expected one of {', '.join(KERAS_DATASETS)})"
        )
    import keras  # slow: imports TensorFlow

    loader = getattr(keras.datasets, name)
    try:
        (x, y), (x_val, y_val) = loader.load_data()
    except Exception as exc:  # URLError, OSError, keras' "URL fetch failure", bad cache ...
        raise DatasetError(
            f"Could not download {name} (no network? {_one_line(exc)}). "
            f"{DOWNLOAD_HELP[name]}, or use --dataset shapes (offline)"
        ) from exc
    return standardise(name, x, y, x_val, y_val)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an IDX file (optionally gzipped) holding unsigned bytes with ``ndim`` dimensions."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"Cannot read {path}: {_one_line(exc)}") from exc
    header = 4 + 4 * ndim
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else -1
    if magic != 0x0800 + ndim or len(raw) < header:
        raise DatasetError(
            f"{path} is not an IDX file of unsigned bytes with {ndim} dimensions. "
            f"Received: magic number {magic:#x} (expected {0x0800 + ndim:#x})"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if body.size != int(np.prod(dims)):
        raise DatasetError(
            f"{path} is truncated or padded. Received: {body.size} bytes of data "
            f"(expected {int(np.prod(dims))} for shape {dims})"
        )
    return body.reshape(dims)


def load_mnist_local(
    name: str, data_dir: str | os.PathLike[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read MNIST or Fashion-MNIST from local files.

    Args:
        name: ``"mnist"`` or ``"fashion_mnist"``.
        data_dir: an ``.npz`` file with ``x_train, y_train, x_test, y_test`` (keras'
            ``mnist.npz``), a folder holding ``mnist.npz``, or a folder holding the four IDX
            files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``).

    Returns:
        ``(x_train, y_train, x_val, y_val)``: uint8 (N, 28, 28, 1) images, int64 labels.

    Raises:
        DatasetError: no such files, or they are malformed.

    Example:
        >>> x, y, xv, yv = load_mnist_local("fashion_mnist", "~/data/fashion")  # doctest: +SKIP
        >>> x.shape  # doctest: +SKIP
        (60000, 28, 28, 1)
    """
    path = Path(data_dir).expanduser()
    npz = path if path.is_file() else path / "mnist.npz"
    if npz.is_file():
        try:
            with np.load(npz, allow_pickle=False) as f:
                arrays = [f[k] for k in ("x_train", "y_train", "x_test", "y_test")]
        except Exception as exc:
            raise DatasetError(
                f"Cannot read {npz}: {_one_line(exc)} (expected an .npz with x_train, "
                "y_train, x_test, y_test)"
            ) from exc
        return standardise(name, *arrays)
    if path.is_dir():
        found: dict[str, Path] = {}
        for key, base in _IDX_FILES.items():
            for candidate in (path / base, path / f"{base}.gz"):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(_IDX_FILES):
            return standardise(
                name,
                _read_idx(found["x_train"], 3),
                _read_idx(found["y_train"], 1),
                _read_idx(found["x_val"], 3),
                _read_idx(found["y_val"], 1),
            )
    raise DatasetError(
        f"No {name} files at {path}. Received: data_dir={str(data_dir)!r} (expected mnist.npz, "
        f"or a folder with {', '.join(_IDX_FILES.values())}, each optionally .gz)"
    )
