"""Shared test fixtures: quiet TensorFlow, tiny generated data and tiny models, one recorded store per session."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _split_cpu(n: int = 2) -> None:
    """Two logical CPU devices for the tf.distribute tests (tests/trainer/test_distribute.py).

    It must happen before TensorFlow initialises its devices, so here, at import time, once for
    the whole session; ops still run on ``/CPU:0`` by default, so the other tests are unaffected.
    """
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    try:
        if cpus:  # (listing logical devices would initialise them)
            tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError:  # devices already initialised (TensorFlow imported and used before conftest)
        pass


_split_cpu()


@pytest.fixture(scope="session")
def keras_mod():
    """Keras (imports TensorFlow once per test session)."""
    import keras

    return keras


def tiny_cnn(keras, input_shape=(12, 12, 3), n_classes=4, *, bn: bool = False, dropout: bool = False):
    """A tiny chain: conv1 → pool → conv2 [→ BN] → Flatten [→ Dropout] → dense1 (softmax)."""
    L = keras.layers
    layers = [
        keras.Input(input_shape),
        L.Conv2D(4, 3, padding="same", activation="relu", name="conv1"),
        L.MaxPooling2D(2, name="pool1"),
        L.Conv2D(6, 3, padding="same", activation="relu", name="conv2"),
    ]
    if bn:
        layers.append(L.BatchNormalization(name="bn2"))
    layers += [L.Flatten(name="flatten")]
    if dropout:
        layers.append(L.Dropout(0.3, name="drop"))
    layers.append(L.Dense(n_classes, activation="softmax", name="dense1"))
    return keras.Sequential(layers, name="tiny")


@pytest.fixture(scope="session")
def tiny_data():
    """Small random-but-learnable data: class = dominant colour channel + a brightness band."""
    rng = np.random.default_rng(0)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 4, n)
        x = rng.integers(0, 120, (n, 12, 12, 3)).astype(np.int64)
        for c in range(3):
            x[y == c, :, :, c] += 120
        x[y == 3] += 60
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    return make(256), make(64)
