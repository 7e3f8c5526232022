"""Tests of the generated `shapes` dataset: layout, determinism, balance, and that colour and shape both matter."""

from __future__ import annotations

import numpy as np
import pytest

from revacnn.data import DATASETS, Dataset, load_dataset
from revacnn.data.shapes import (
    CLASS_NAMES,
    COLOURS,
    SHAPES,
    _make_chunk,
    load_shapes,
    make_shapes,
)
from revacnn.errors import ConfigError, DatasetError

GREY = np.array([0.299, 0.587, 0.114])  # BT.601 luma, as PIL's "L" conversion


@pytest.fixture(scope="module")
def sample() -> tuple[np.ndarray, np.ndarray]:
    return make_shapes(3000, seed=0)


def _pair(classes_a: int, classes_b: int, n: int = 200, seed: int = 5):
    """The same random scenes rendered once as class a and once as class b."""
    xa, _ = _make_chunk(n, np.random.default_rng(seed), np.full(n, classes_a))
    xb, _ = _make_chunk(n, np.random.default_rng(seed), np.full(n, classes_b))
    return xa, xb


def _cv_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Two-fold accuracy of a linear (regularised Fisher) classifier for two classes."""
    a, b = np.unique(labels)
    order = np.random.default_rng(0).permutation(len(labels))
    folds = (order[::2], order[1::2])
    accs = []
    for train, test in (folds, folds[::-1]):
        fa, fb = features[train][labels[train] == a], features[train][labels[train] == b]
        cov = np.cov(np.concatenate([fa - fa.mean(0), fb - fb.mean(0)]).T)
        cov += np.eye(len(cov)) * (1e-3 * np.trace(cov) / len(cov) + 1e-9)
        w = np.linalg.solve(cov, fa.mean(0) - fb.mean(0))
        cut = w @ (fa.mean(0) + fb.mean(0)) / 2
        pred = np.where(features[test] @ w > cut, a, b)
        accs.append(np.mean(pred == labels[test]))
    return float(np.mean(accs))


def _hist(values: np.ndarray, keep: np.ndarray, bins: int, lo: float, hi: float) -> np.ndarray:
    """Per-image histograms (n, bins) of the kept values, as fractions of the pixels."""
    n = values.shape[0]
    b = np.clip(((values - lo) / (hi - lo) * bins).astype(int), 0, bins - 1)
    codes = (np.arange(n)[:, None, None] * bins + b)[keep]
    return np.bincount(codes, minlength=n * bins).reshape(n, bins) / keep[0].size


def _grey_hist(x: np.ndarray) -> np.ndarray:
    grey = x @ GREY
    return _hist(grey, np.ones(grey.shape, bool), 16, 0, 256)


def _hue_hist(x: np.ndarray) -> np.ndarray:
    """Histogram of the hue of the clearly coloured pixels (a bag of pixels: shape-blind)."""
    f = x.astype(float)
    y = f @ GREY
    cb, cr = (f[..., 2] - y) / 1.772, (f[..., 0] - y) / 1.402
    return _hist(np.arctan2(cr, cb), np.hypot(cb, cr) > 20, 18, -np.pi, np.pi)


def test_layout_and_names(sample):
    x, y = sample
    assert x.shape == (3000, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (3000,) and y.dtype == np.int64
    assert len(CLASS_NAMES) == 10 and len(set(CLASS_NAMES)) == 10
    assert CLASS_NAMES[0] == "red circle"
    # every class is "<colour> <shape>"; each shape in two colours, each colour on two shapes
    parts = [name.split(" ") for name in CLASS_NAMES]
    assert all(c in COLOURS and s in SHAPES for c, s in parts)
    for s in SHAPES:
        assert sum(p[1] == s for p in parts) == 2
    for c in COLOURS:
        assert sum(p[0] == c for p in parts) == 2
    # real images: pixels vary within and between images and use most of the range
    assert x.std(axis=(1, 2, 3)).min() > 5
    assert x.min() < 10 and x.max() > 245


def test_classes_balanced():
    for n in (250, 1234):
        _, y = make_shapes(n, seed=1)
        counts = np.bincount(y, minlength=10)
        assert counts.sum() == n and counts.max() - counts.min() <= 1


def test_deterministic_per_seed():
    x1, y1 = make_shapes(120, seed=7)
    x2, y2 = make_shapes(120, seed=7)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    x3, _ = make_shapes(120, seed=8)
    assert np.abs(x1.astype(int) - x3).mean() > 10


def test_chunks_do_not_depend_on_n():
    x500, y500 = make_shapes(500, seed=3)
    x600, y600 = make_shapes(600, seed=3)
    np.testing.assert_array_equal(x500, x600[:500])
    np.testing.assert_array_equal(y500, y600[:500])


def test_train_and_val_never_share_images():
    x, y, xv, yv = load_shapes(train_size=600, val_size=400, seed=0)
    assert x.shape == (600, 32, 32, 3) and xv.shape == (400, 32, 32, 3)
    train = {img.tobytes() for img in x}
    assert len(train) == 600  # no duplicates inside a split either
    assert not train & {img.tobytes() for img in xv}
    assert not np.array_equal(x[:400], xv)


def test_greyscale_cannot_tell_colours_apart():
    """Same scene, other colour family: the greyscale image stays the same, RGB does not."""
    # red/yellow circle, yellow/green square, blue/purple cross
    for a, b in ((0, 1), (2, 3), (6, 7)):
        xa, xb = _pair(a, b)
        grey_diff = np.abs(xa @ GREY - xb @ GREY)
        # equal up to the rounding of each channel, except a few anti-aliased edge pixels
        # over a background whose texture was clipped at 0 or 255
        assert grey_diff.mean() < 0.1 and np.mean(grey_diff > 1) < 1e-3
        rgb_diff = np.abs(xa.astype(int) - xb).reshape(len(xa), -1).max(axis=1)
        assert rgb_diff.min() > 25 and np.median(rgb_diff) > 45


def test_bag_of_pixels_cannot_tell_shapes_apart():
    """Same scene, other shape of the same colour: the same pixels, at other places."""
    xa, xb = _pair(0, 9)  # red circle vs red ring (equal area)
    in_place = np.abs(xa.astype(int) - xb).mean()
    sorted_a = np.sort(xa.reshape(len(xa), -1, 3), axis=1).astype(int)
    sorted_b = np.sort(xb.reshape(len(xb), -1, 3), axis=1)
    assert in_place > 5
    assert np.abs(sorted_a - sorted_b).mean() < in_place / 4


def test_colour_and_shape_both_needed_statistically(sample):
    """Classifiers on colour-blind or shape-blind features: chance on one kind of pair each."""
    x, y = sample

    def acc(features, a: int, b: int) -> float:
        m = (y == a) | (y == b)
        return _cv_accuracy(features(x[m]), y[m])

    same_shape = [(0, 1), (2, 3), (6, 7)]  # differ only in colour
    same_colour = [(0, 9), (1, 2), (3, 4)]  # differ only in shape
    for a, b in same_shape:
        assert acc(_grey_hist, a, b) < 0.65  # greyscale: chance
        assert acc(_hue_hist, a, b) > 0.75  # colour statistics differ
    for a, b in same_colour:
        assert acc(_hue_hist, a, b) < 0.65  # colour statistics: chance


def test_load_dataset_shapes():
    ds = load_dataset("shapes", train_size=200, val_size=50, seed=2)
    assert isinstance(ds, Dataset) and ds.name == "shapes" and "shapes" in DATASETS
    assert ds.input_shape == (32, 32, 3) and ds.num_classes == 10
    assert ds.class_names == CLASS_NAMES
    assert ds.x_train.shape == (200, 32, 32, 3) and ds.y_val.shape == (50,)
    again = load_dataset("Shapes", train_size=200, val_size=50, seed=2)
    np.testing.assert_array_equal(ds.x_train, again.x_train)
    np.testing.assert_array_equal(ds.x_val, again.x_val)
    assert "train=200" in repr(ds)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"train_size": 0}, "train_size=0"),
        ({"val_size": -3}, "val_size=-3"),
        ({"train_size": 2.5}, "train_size=2.5"),
        ({"train_size": True}, "train_size=True"),
        ({"seed": -1}, "seed=-1"),
        ({"data_dir": "/tmp/x"}, "data_dir='/tmp/x'"),
    ],
)
def test_bad_settings(kwargs, needle):
    with pytest.raises(ConfigError, match="Received: " + needle.replace(".", r"\.")):
        load_dataset("shapes", **kwargs)


def test_make_shapes_rejects_bad_n():
    for n in (0, -1, 1.5, "10"):
        with pytest.raises(ConfigError, match="Received: n="):
            make_shapes(n, seed=0)  # type: ignore[arg-type]


def test_unknown_dataset():
    with pytest.raises(DatasetError) as info:
        load_dataset("foo")
    assert str(info.value) == (
        "Unknown dataset 'foo'. Received: dataset='foo' "
        "(expected one of shapes, cifar10, mnist, fashion_mnist)"
    )
    assert isinstance(info.value, ValueError)
