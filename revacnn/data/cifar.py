"""Reading a local copy of CIFAR-10 (python version): the extracted folder or the .tar.gz archive.

The official archive ``cifar-10-python.tar.gz`` (https://www.cs.toronto.edu/~kriz/cifar.html)
holds ``cifar-10-batches-py/`` with ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and
``batches.meta``: Python pickles of dicts whose ``b"data"`` is a uint8 (N, 3072) array,
channel-planar (1024 red values, then green, then blue, each row-major 32x32), and whose
``b"labels"`` is a list of N ints. The pickles are read with an unpickler that only admits
the numpy types such files contain, so a ``--data-dir`` pointing at a hostile file cannot run
code.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from revacnn.errors import DatasetError

__all__ = ["CIFAR10_CLASSES", "TRAIN_BATCHES", "load_cifar10_local", "find_cifar10"]

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
TRAIN_BATCHES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"
_EXPECTED = (
    f"expected the extracted {FOLDER} folder, the {ARCHIVE} archive, or a folder containing either"
)

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED_GLOBALS[(_mod, "_reconstruct")] = np.empty(0).__reduce__()[0]
    _ALLOWED_GLOBALS[(_mod, "scalar")] = np.int64(0).__reduce__()[0]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals found in CIFAR-10 batch files."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _unpickle(raw: bytes, source: str) -> dict[bytes, Any]:
    """Load one CIFAR pickle (``encoding="bytes"``) and check that it is a dict."""
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # any corrupt or foreign file
        raise DatasetError(
            f"Cannot read CIFAR-10 file {source}: {type(exc).__name__}: {exc}. "
            "(expected a python pickle from cifar-10-python.tar.gz)"
        ) from exc
    if not isinstance(obj, dict):
        raise DatasetError(
            f"Cannot read CIFAR-10 file {source}. Received: a pickled {type(obj).__name__} "
            "(expected a dict with b'data' and b'labels')"
        )
    return obj


def _batch(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode one batch file into uint8 (N, 32, 32, 3) images and int64 (N,) labels."""
    obj = _unpickle(raw, source)
    data, labels = obj.get(b"data"), obj.get(b"labels")
    if data is None or labels is None:
        raise DatasetError(
            f"Cannot read CIFAR-10 file {source}. Received: keys {sorted(obj)} "
            "(expected b'data' and b'labels')"
        )
    data = np.asarray(data)
    y = np.asarray(labels).reshape(-1)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(
            f"Cannot read CIFAR-10 file {source}. Received: data of shape {data.shape} and "
            f"dtype {data.dtype} (expected uint8 (N, 3072))"
        )
    if y.shape[0] != data.shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(
            f"Cannot read CIFAR-10 file {source}. Received: {y.shape[0]} labels of dtype "
            f"{y.dtype} for {data.shape[0]} images (expected one integer label per image)"
        )
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DatasetError(
            f"Cannot read CIFAR-10 file {source}. Received: labels from {y.min()} to "
            f"{y.max()} (expected 0 to 9)"
        )
    x = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return x, y.astype(np.int64)


def find_cifar10(data_dir: str | os.PathLike[str]) -> tuple[str, Path]:
    """Locate CIFAR-10 under ``data_dir``.

    Args:
        data_dir: the ``cifar-10-batches-py`` folder, the ``.tar.gz`` archive, or a folder
            containing either.

    Returns:
        ``("folder", path)`` or ``("archive", path)``.

    Raises:
        DatasetError: nothing usable is there.

    Example:
        >>> find_cifar10("~/data/cifar-10-python.tar.gz")  # doctest: +SKIP
        ('archive', PosixPath('/home/me/data/cifar-10-python.tar.gz'))
    """
    path = Path(data_dir).expanduser()
    if path.is_file():
        if tarfile.is_tarfile(path):
            return "archive", path
        raise DatasetError(
            f"{path} is not a tar archive. Received: data_dir={str(data_dir)!r} ({_EXPECTED})"
        )
    if path.is_dir():
        if (path / "data_batch_1").is_file():
            return "folder", path
        if (path / FOLDER / "data_batch_1").is_file():
            return "folder", path / FOLDER
        if (path / ARCHIVE).is_file():
            return "archive", path / ARCHIVE
        raise DatasetError(
            f"No CIFAR-10 files in {path}. Received: data_dir={str(data_dir)!r} ({_EXPECTED})"
        )
    raise DatasetError(
        f"The CIFAR-10 data directory does not exist. Received: data_dir={str(data_dir)!r} "
        f"({_EXPECTED})"
    )


def _folder_reader(folder: Path) -> Callable[[str], bytes | None]:
    def read(name: str) -> bytes | None:
        file = folder / name
        return file.read_bytes() if file.is_file() else None

    return read


def _archive_members(tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    """Regular files of the archive by base name, preferring those under cifar-10-batches-py/."""
    members: dict[str, tarfile.TarInfo] = {}
    for info in tar.getmembers():
        if not info.isfile():
            continue
        base = info.name.rsplit("/", 1)[-1]
        if base not in members or f"{FOLDER}/" in info.name:
            members[base] = info
    return members


def load_cifar10_local(
    data_dir: str | os.PathLike[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """Read CIFAR-10 from a local folder or archive; validation is ``test_batch``.

    Args:
        data_dir: the extracted ``cifar-10-batches-py`` folder, ``cifar-10-python.tar.gz``,
            or a folder containing either.

    Returns:
        ``(x_train, y_train, x_val, y_val, class_names)``: uint8 (N, 32, 32, 3) RGB images,
        int64 labels, and the names from ``batches.meta`` (the standard names if absent).

    Raises:
        DatasetError: the path holds no CIFAR-10 data, a batch is missing or malformed.

    Example:
        >>> x, y, xv, yv, names = load_cifar10_local("~/data/cifar-10-batches-py")  # doctest: +SKIP
        >>> x.shape, xv.shape, names[0]  # doctest: +SKIP
        ((50000, 32, 32, 3), (10000, 32, 32, 3), 'airplane')
    """
    kind, path = find_cifar10(data_dir)
    if kind == "folder":
        return _load(_folder_reader(path), str(path))
    try:
        with tarfile.open(path, "r:*") as tar:
            members = _archive_members(tar)

            def read(name: str) -> bytes | None:
                info = members.get(name)
                if info is None:
                    return None
                handle = tar.extractfile(info)
                return None if handle is None else handle.read()

            return _load(read, str(path))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DatasetError(
            f"Cannot read the CIFAR-10 archive {path}: {type(exc).__name__}: {exc} "
            f"(expected {ARCHIVE} as downloaded)"
        ) from exc


def _load(
    read: Callable[[str], bytes | None], where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """Read the five training batches, the test batch and the class names through ``read``."""
    needed = (*TRAIN_BATCHES, "test_batch")
    raws = {name: read(name) for name in needed}
    missing = [name for name, raw in raws.items() if raw is None]
    if missing:
        raise DatasetError(
            f"Incomplete CIFAR-10 data in {where}. Received: no {', '.join(missing)} "
            f"(expected {', '.join(needed)})"
        )
    parts = [_batch(raws[name], f"{where}/{name}") for name in TRAIN_BATCHES]  # type: ignore[arg-type]
    x_val, y_val = _batch(raws["test_batch"], f"{where}/test_batch")  # type: ignore[arg-type]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    names = CIFAR10_CLASSES
    meta = read("batches.meta")
    if meta is not None:
        raw_names = _unpickle(meta, f"{where}/batches.meta").get(b"label_names")
        if isinstance(raw_names, list) and len(raw_names) == 10:
            names = tuple(
                n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in raw_names
            )
    return x_train, y_train, x_val, y_val, names
