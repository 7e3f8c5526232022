"""Probe images of any dtype (standardized floats included) get a per-image display range in the app."""

from __future__ import annotations

import numpy as np

from revacnn.ui.render import display_images


def test_uint8_as_is_and_floats_per_image_range():
    u = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3)).astype(np.uint8)
    np.testing.assert_array_equal(display_images(u), u)
    f = np.stack([np.linspace(-3, 3, 48).reshape(4, 4, 3), np.linspace(10, 11, 48).reshape(4, 4, 3)])
    d = display_images(f)
    assert d.dtype == np.uint8 and d.shape == (2, 4, 4, 3)
    for i in range(2):  # each image spans the full range on its own
        assert d[i].min() == 0 and d[i].max() == 255
    np.testing.assert_array_equal(d[0], d[1])  # same pattern, different scales
    g = display_images(np.zeros((1, 2, 2, 1), np.float32))
    assert g.shape == (1, 2, 2, 3) and (g == 0).all()
