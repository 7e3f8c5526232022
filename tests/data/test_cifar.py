"""Tests of the real datasets: CIFAR-10 from local files, keras.datasets (faked: no network), local MNIST files."""

from __future__ import annotations

import gzip
import os
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from revacnn.data import load_dataset
from revacnn.data.cifar import CIFAR10_CLASSES, find_cifar10, load_cifar10_local
from revacnn.errors import ConfigError, DatasetError

PER_BATCH = 6
N_TEST = 8


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _write_batch(path: Path, x: np.ndarray, y: np.ndarray, label: bytes) -> None:
    """One batch in the format of cifar-10-python.tar.gz (a python pickle, protocol 2)."""
    data = x.transpose(0, 3, 1, 2).reshape(len(x), 3072)  # R plane, G plane, B plane
    batch = {
        b"batch_label": label,
        b"labels": [int(v) for v in y],
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(x))],
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> dict:
    """A miniature cifar-10-batches-py folder, its .tar.gz, and the arrays written into them."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "extracted" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for i in range(1, 6):
        x, y = _images(rng, PER_BATCH), rng.integers(0, 10, PER_BATCH)
        _write_batch(folder / f"data_batch_{i}", x, y, f"training batch {i} of 5".encode())
        xs.append(x)
        ys.append(y)
    x_test, y_test = _images(rng, N_TEST), np.arange(N_TEST) % 10
    _write_batch(folder / "test_batch", x_test, y_test, b"testing batch 1 of 1")
    names = [f"class{k}".encode() for k in range(10)]
    meta = {b"label_names": names, b"num_cases_per_batch": PER_BATCH, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    archive_dir = root / "download"
    archive_dir.mkdir()
    archive = archive_dir / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return {
        "folder": folder,
        "archive": archive,
        "x": np.concatenate(xs),
        "y": np.concatenate(ys),
        "x_test": x_test,
        "y_test": y_test,
    }


def _check_roundtrip(loaded, cifar) -> None:
    x, y, xv, yv, names = loaded
    assert x.shape == (5 * PER_BATCH, 32, 32, 3) and x.dtype == np.uint8
    assert y.dtype == np.int64 and yv.dtype == np.int64
    np.testing.assert_array_equal(x, cifar["x"])
    np.testing.assert_array_equal(y, cifar["y"])
    np.testing.assert_array_equal(xv, cifar["x_test"])
    np.testing.assert_array_equal(yv, cifar["y_test"])
    assert names == tuple(f"class{k}" for k in range(10))


def test_channel_planar_layout(cifar):
    """Byte k of a row is red of pixel k, byte 1024 + k its green, byte 2048 + k its blue."""
    raw = pickle.loads((cifar["folder"] / "data_batch_1").read_bytes(), encoding="bytes")
    x, *_ = load_cifar10_local(cifar["folder"])
    row = raw[b"data"][0]
    assert x[0, 0, 0, 0] == row[0] and x[0, 0, 1, 0] == row[1] and x[0, 1, 0, 0] == row[32]
    assert x[0, 0, 0, 1] == row[1024] and x[0, 0, 0, 2] == row[2048]
    assert x[0, 31, 31, 2] == row[3071]


@pytest.mark.parametrize("where", ["folder", "parent of folder", "archive", "folder with archive"])
def test_local_copy_roundtrip(cifar, where):
    path = {
        "folder": cifar["folder"],
        "parent of folder": cifar["folder"].parent,
        "archive": cifar["archive"],
        "folder with archive": cifar["archive"].parent,
    }[where]
    _check_roundtrip(load_cifar10_local(path), cifar)
    assert find_cifar10(path)[0] == ("archive" if "archive" in where else "folder")


def test_load_dataset_reads_local_copy_and_subsamples(cifar):
    ds = load_dataset("cifar10", data_dir=str(cifar["archive"]))
    assert ds.input_shape == (32, 32, 3) and ds.num_classes == 10
    np.testing.assert_array_equal(ds.x_train, cifar["x"])
    small = load_dataset("cifar10", data_dir=cifar["folder"], train_size=10, val_size=5, seed=1)
    again = load_dataset("cifar10", data_dir=cifar["folder"], train_size=10, val_size=5, seed=1)
    assert small.x_train.shape == (10, 32, 32, 3) and small.x_val.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(small.x_train, again.x_train)
    # the subset is made of the original images with their own labels
    rows = {img.tobytes(): label for img, label in zip(cifar["x"], cifar["y"], strict=True)}
    assert all(
        rows[img.tobytes()] == label
        for img, label in zip(small.x_train, small.y_train, strict=True)
    )
    with pytest.raises(
        ConfigError, match=r"Received: train_size=31 \(expected an integer from 1 to 30\)"
    ):
        load_dataset("cifar10", data_dir=cifar["folder"], train_size=31)


def test_standard_names_without_meta(cifar, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for f in cifar["folder"].iterdir():
        if f.name != "batches.meta":
            (folder / f.name).write_bytes(f.read_bytes())
    *_, names = load_cifar10_local(tmp_path)
    assert names == CIFAR10_CLASSES


def test_missing_path_and_files(cifar, tmp_path):
    with pytest.raises(DatasetError, match="does not exist. Received: data_dir="):
        load_cifar10_local(tmp_path / "nope")
    with pytest.raises(DatasetError, match="No CIFAR-10 files in"):
        load_cifar10_local(tmp_path)
    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes((cifar["folder"] / "data_batch_1").read_bytes())
    with pytest.raises(DatasetError, match="Received: no data_batch_2, .*test_batch"):
        load_cifar10_local(folder)
    not_tar = tmp_path / "x.tar.gz"
    not_tar.write_bytes(b"hello")
    with pytest.raises(DatasetError, match="not a tar archive"):
        load_cifar10_local(not_tar)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_refuses_foreign_pickles(cifar, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for f in cifar["folder"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _Evil()}, protocol=2))
    with pytest.raises(DatasetError, match="refusing to load .*system"):
        load_cifar10_local(folder)
    (folder / "data_batch_3").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]})
    )
    with pytest.raises(DatasetError, match=r"data of shape \(2, 10\)"):
        load_cifar10_local(folder)


# --- keras.datasets: never a real download in tests -------------------------------------


@pytest.fixture()
def keras_datasets(monkeypatch):
    keras = pytest.importorskip("keras")
    return keras.datasets, monkeypatch


@pytest.mark.parametrize(
    ("name", "needles"),
    [
        ("cifar10", ["cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar.html"]),
        ("mnist", ["mnist.npz"]),
        ("fashion_mnist", ["fashion-mnist"]),
    ],
)
@pytest.mark.parametrize(
    "error",
    [
        urllib.error.URLError("[Errno -3] Temporary failure in name resolution"),
        OSError("Network is unreachable"),
        Exception("URL fetch failure on https://example: None -- unknown url"),
    ],
)
def test_offline_download_gives_one_clear_error(keras_datasets, name, needles, error):
    datasets, monkeypatch = keras_datasets

    def fail():
        raise error

    monkeypatch.setattr(getattr(datasets, name), "load_data", fail)
    with pytest.raises(DatasetError) as info:
        load_dataset(name)
    message = str(info.value)
    assert message.startswith(f"Could not download {name} (no network?")
    assert "\n" not in message
    for needle in [*needles, "--data-dir", "--dataset shapes (offline)"]:
        assert needle in message
    assert info.value.__cause__ is error


def test_keras_arrays_are_standardised(keras_datasets):
    datasets, monkeypatch = keras_datasets
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    xv = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    y, yv = (
        (np.arange(12) % 10).reshape(-1, 1).astype(np.uint8),
        np.array([[1], [2], [3], [4]], np.uint8),
    )
    monkeypatch.setattr(datasets.cifar10, "load_data", lambda: ((x, y), (xv, yv)))
    ds = load_dataset("cifar10")
    assert ds.x_train.shape == (12, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert ds.y_train.shape == (12,) and ds.y_train.dtype == np.int64
    np.testing.assert_array_equal(ds.y_val, [1, 2, 3, 4])
    assert ds.class_names[0] == "airplane"

    for name in ("mnist", "fashion_mnist"):
        g = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)
        labels = np.arange(10, dtype=np.uint8)
        monkeypatch.setattr(
            getattr(datasets, name),
            "load_data",
            lambda g=g, lab=labels: ((g, lab), (g[:3], lab[:3])),
        )
        ds = load_dataset(name.replace("_", "-"), val_size=2)
        assert ds.name == name
        assert ds.x_train.shape == (10, 28, 28, 1) and ds.input_shape == (28, 28, 1)
        np.testing.assert_array_equal(ds.x_train[..., 0], g)
        assert ds.y_train.dtype == np.int64 and ds.x_val.shape == (2, 28, 28, 1)
        assert ds.num_classes == 10
    assert ds.class_names[-1] == "Ankle boot"


# --- local MNIST-format files --------------------------------------------------------------


def _idx(array: np.ndarray) -> bytes:
    header = (0x0800 + array.ndim).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_local_mnist_files(tmp_path):
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), np.arange(7) % 10
    xv, yv = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), np.array([4, 5, 6])
    np.savez(tmp_path / "mnist.npz", x_train=x, y_train=y, x_test=xv, y_test=yv)
    ds = load_dataset("mnist", data_dir=tmp_path)
    np.testing.assert_array_equal(ds.x_train[..., 0], x)
    np.testing.assert_array_equal(ds.y_val, yv)

    fashion = tmp_path / "fashion"
    fashion.mkdir()
    files = {
        "train-images-idx3-ubyte.gz": x,
        "train-labels-idx1-ubyte.gz": y,
        "t10k-images-idx3-ubyte": xv,  # not compressed: both work
        "t10k-labels-idx1-ubyte.gz": yv,
    }
    for fname, arr in files.items():
        raw = _idx(arr)
        (fashion / fname).write_bytes(gzip.compress(raw) if fname.endswith(".gz") else raw)
    ds = load_dataset("fashion_mnist", data_dir=fashion)
    assert ds.x_train.shape == (7, 28, 28, 1) and ds.y_train.dtype == np.int64
    np.testing.assert_array_equal(ds.x_val[..., 0], xv)
    np.testing.assert_array_equal(ds.y_train, y)

    (fashion / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(yv)[:-1]))
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset("fashion_mnist", data_dir=fashion)
    with pytest.raises(DatasetError, match="No mnist files at"):
        load_dataset("mnist", data_dir=tmp_path / "empty")
