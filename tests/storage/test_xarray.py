"""The epoch arrays carry dimension names, so xarray opens them as labelled arrays."""

from __future__ import annotations

import numpy as np
import pytest

import revacnn

from ..conftest import tiny_cnn

xr = pytest.importorskip("xarray")


def test_xarray_opens_an_epoch_with_named_axes(tmp_path, keras_mod, tiny_data):
    keras_mod.utils.set_random_seed(0)
    (x, y), (xv, yv) = tiny_data
    store = revacnn.open_store(tmp_path / "store")
    run = revacnn.fit(tiny_cnn(keras_mod), (x, y), validation_data=(xv, yv), epochs=1, store=store,
                      probes=4, progress=False, embeddings=False)
    path = store.layout.epoch_arrays(run.run_id, 1)
    ds = xr.open_zarr(path, group="conv2", consolidated=False)
    rec = run.epoch(1).layer("conv2")
    assert ds["activations"].dims == ("probe", "filter", "y", "x")
    assert ds["kernel"].dims == ("filter", "ky", "kx", "channel")
    assert ds["grad_l1"].dims == ("filter",)
    np.testing.assert_array_equal(ds["kernel"].values, rec.kernel)
    np.testing.assert_array_equal(ds["activations"].values, rec.activations)
    # a labelled reduction: the mean activation per filter equals the recorded act_mean
    np.testing.assert_allclose(ds["activations"].astype("float64").mean(("probe", "y", "x")).values,
                               ds["act_mean"].values, rtol=1e-3)
    dense = xr.open_zarr(path, group="dense1", consolidated=False)
    assert dense["grad_l1"].dims == ("unit",)
