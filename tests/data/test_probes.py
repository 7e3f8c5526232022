"""Tests of probe selection and stratified subsampling: spread over classes, deterministic, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from revacnn.data import select_probes, stratified_subset
from revacnn.errors import ConfigError


@pytest.fixture()
def y_val() -> np.ndarray:
    return np.random.default_rng(0).permutation(np.arange(200) % 10)


def test_round_robin_over_classes(y_val):
    idx = select_probes(y_val, 16, seed=0)
    assert idx.dtype == np.int64 and idx.shape == (16,)
    assert len(set(idx.tolist())) == 16
    assert np.bincount(y_val[idx], minlength=10).tolist() == [2] * 6 + [1] * 4
    # sorted by class, then by index
    keys = list(zip(y_val[idx].tolist(), idx.tolist(), strict=True))
    assert keys == sorted(keys)


def test_deterministic_per_seed(y_val):
    np.testing.assert_array_equal(
        select_probes(y_val, 16, seed=3), select_probes(y_val, 16, seed=3)
    )
    assert not np.array_equal(select_probes(y_val, 16, seed=3), select_probes(y_val, 16, seed=4))


def test_small_classes_run_out():
    y = np.array([0] * 10 + [1] + [2] * 2)
    idx = select_probes(y, 7, seed=0)
    assert np.bincount(y[idx]).tolist() == [4, 1, 2]
    assert sorted(select_probes(y, 13, seed=5).tolist()) == list(range(13))  # everything


def test_labels_need_not_start_at_zero():
    y = np.array([3, 7, 7, 3, 9, 9, 9])
    assert set(y[select_probes(y, 3)].tolist()) == {3, 7, 9}


@pytest.mark.parametrize("n", [0, -1, 201, 2.0, True])
def test_bad_counts(y_val, n):
    with pytest.raises(
        ConfigError, match=f"Received: n={n!r} \\(expected an integer from 1 to 200\\)"
    ):
        select_probes(y_val, n)


def test_bad_labels():
    with pytest.raises(ConfigError, match=r"labels of shape \(4, 2\)"):
        select_probes(np.zeros((4, 2), int), 2)


def test_stratified_subset_keeps_proportions():
    y = np.array([0] * 500 + [1] * 300 + [2] * 200)
    idx = stratified_subset(y, 100, seed=0)
    assert np.bincount(y[idx]).tolist() == [50, 30, 20]
    assert np.all(np.diff(idx) > 0)  # sorted, no repeats
    np.testing.assert_array_equal(idx, stratified_subset(y, 100, seed=0))
    assert not np.array_equal(idx, stratified_subset(y, 100, seed=1))
    assert not np.array_equal(idx, stratified_subset(y, 100, seed=(0, 1)))
    odd = stratified_subset(y, 7, seed=0)
    assert len(odd) == 7 and np.bincount(y[odd]).tolist() == [4, 2, 1]
    assert len(stratified_subset(y, 1000)) == 1000


def test_stratified_subset_errors():
    y = np.arange(10) % 2
    for size in (0, 11):
        with pytest.raises(ConfigError, match=f"Received: size={size}"):
            stratified_subset(y, size)
