"""Freezing a conv freezes its own BatchNorm's scale and offset too, so backprop below it can stop."""

from __future__ import annotations

import numpy as np

import revacnn
from revacnn.steering import parse

from ..conftest import tiny_cnn


def test_frozen_conv_keeps_its_batchnorm_affine_params(tmp_path, keras_mod, tiny_data):
    keras_mod.utils.set_random_seed(0)
    (x, y), (xv, yv) = tiny_data
    store = revacnn.open_store(tmp_path / "store")
    run = revacnn.fit(tiny_cnn(keras_mod, bn=True), (x, y), validation_data=(xv, yv), epochs=1,
                      store=store, probes=4, progress=False, embeddings=False)
    child = run.fork(1, changes=[parse("freeze", ["conv2"])], epochs=3, data=((x, y), (xv, yv)))
    m1, m3 = child.load_model(1), child.load_model(3)
    for name in ("gamma", "beta"):
        np.testing.assert_array_equal(getattr(m3.get_layer("bn2"), name).numpy(),
                                      getattr(m1.get_layer("bn2"), name).numpy())
    np.testing.assert_array_equal(m3.get_layer("conv2").kernel.numpy(), m1.get_layer("conv2").kernel.numpy())
    # the layers that are not frozen still train
    assert not np.array_equal(m3.get_layer("dense1").kernel.numpy(), m1.get_layer("dense1").kernel.numpy())
    assert not np.array_equal(m3.get_layer("conv1").kernel.numpy(), m1.get_layer("conv1").kernel.numpy())
