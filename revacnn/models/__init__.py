"""Built-in CNNs (convnetjs, revacnn, resnet20), a model's recorded layers and probe, and the model check."""

from __future__ import annotations

from .graph import GraphProbe, RecordedLayer, find_layer, recorded_layers, validate_model
from .zoo import MODELS, SUPPORTED_LAYERS, build_model, conv_layers, resnet20, weighted_layers

__all__ = [
    "MODELS",
    "SUPPORTED_LAYERS",
    "GraphProbe",
    "RecordedLayer",
    "build_model",
    "conv_layers",
    "find_layer",
    "recorded_layers",
    "resnet20",
    "validate_model",
    "weighted_layers",
]
