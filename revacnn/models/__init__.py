"""Built-in CNNs (convnetjs, revacnn) and the check that a user's Keras model is one we can record."""

from __future__ import annotations

from .zoo import MODELS, SUPPORTED_LAYERS, build_model, conv_layers, validate_model, weighted_layers

__all__ = ["MODELS", "SUPPORTED_LAYERS", "build_model", "conv_layers", "validate_model", "weighted_layers"]
