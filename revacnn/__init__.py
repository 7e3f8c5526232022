"""revacnn: record, replay and steer the training of convolutional networks.

Example:
    >>> import revacnn
    >>> store = revacnn.open_store("store")
    >>> run = revacnn.fit(model, (x, y), validation_data=(xv, yv), epochs=3, store=store)
    >>> store.sql("SELECT epoch, val_accuracy FROM epochs")
"""

from __future__ import annotations

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # hide the CUDA-probe noise on CPU machines
_os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from . import _facade  # noqa: E402,F401  (installs Run.fork / Run.steer / Run.load_model)
from .config import TrainConfig  # noqa: E402
from .errors import (  # noqa: E402
    ConfigError,
    DatasetError,
    EpochNotFoundError,
    LayerNotFoundError,
    RevacnnError,
    RunNotFoundError,
    SQLError,
    SteeringError,
    StoreError,
    StoreNotFoundError,
    UnsupportedLayerError,
)
from .storage import EpochRecord, LayerRecord, Run, Store, open_store  # noqa: E402

__version__ = "0.1.0"


def fit(*args, **kwargs):  # noqa: ANN002, ANN003
    """Train a Keras model and record every epoch into a store. See `revacnn.trainer.fit`."""
    from .trainer import fit as _fit

    return _fit(*args, **kwargs)


fit.__doc__ = "Train a Keras model and record every epoch into a store (see revacnn.trainer.fit)."

__all__ = [
    "ConfigError",
    "DatasetError",
    "EpochNotFoundError",
    "EpochRecord",
    "LayerNotFoundError",
    "LayerRecord",
    "RevacnnError",
    "Run",
    "RunNotFoundError",
    "SQLError",
    "SteeringError",
    "Store",
    "StoreError",
    "StoreNotFoundError",
    "TrainConfig",
    "UnsupportedLayerError",
    "fit",
    "open_store",
]
