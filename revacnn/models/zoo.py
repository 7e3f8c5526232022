"""The built-in models and the layer types a recorded model may contain."""

from __future__ import annotations

from collections.abc import Callable

import keras

from ..errors import ConfigError, UnsupportedLayerError

#: Layer types the recording trainer and the filter surgery understand.
SUPPORTED_LAYERS: tuple[type, ...] = (
    keras.layers.InputLayer,
    keras.layers.Conv2D,
    keras.layers.Dense,
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.BatchNormalization,
    keras.layers.Dropout,
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.Flatten,
)


def convnetjs(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """The ConvNetJS CIFAR-10 demo net that ReVACNN's JavaScript version drew.

    conv 16 5x5 → pool → conv 20 5x5 → pool → conv 20 5x5 → pool → softmax.
    """
    L = keras.layers
    return keras.Sequential(
        [
            keras.Input(input_shape),
            L.Conv2D(16, 5, padding="same", activation="relu", name="conv1"),
            L.MaxPooling2D(2, name="pool1"),
            L.Conv2D(20, 5, padding="same", activation="relu", name="conv2"),
            L.MaxPooling2D(2, name="pool2"),
            L.Conv2D(20, 5, padding="same", activation="relu", name="conv3"),
            L.MaxPooling2D(2, name="pool3"),
            L.Flatten(name="flatten"),
            L.Dense(num_classes, activation="softmax", name="dense1"),
        ],
        name="convnetjs",
    )


def revacnn(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """The original ReVACNN Keras model.

    conv32 3x3 → pool → conv64 → conv64 → pool → dense128 → dense10.
    """
    L = keras.layers
    return keras.Sequential(
        [
            keras.Input(input_shape),
            L.Conv2D(32, 3, padding="same", activation="relu", name="conv1"),
            L.MaxPooling2D(2, name="pool1"),
            L.Conv2D(64, 3, padding="same", activation="relu", name="conv2"),
            L.Conv2D(64, 3, padding="same", activation="relu", name="conv3"),
            L.MaxPooling2D(2, name="pool2"),
            L.Flatten(name="flatten"),
            L.Dense(128, activation="relu", name="dense1"),
            L.Dense(num_classes, activation="softmax", name="dense2"),
        ],
        name="revacnn",
    )


MODELS: dict[str, Callable[[tuple[int, int, int], int], keras.Model]] = {
    "convnetjs": convnetjs,
    "revacnn": revacnn,
}


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """Build a built-in model by name.

    Example:
        >>> model = build_model("convnetjs", (32, 32, 3), 10)
        >>> [l.name for l in conv_layers(model)]
        ['conv1', 'conv2', 'conv3']
    """
    if name not in MODELS:
        raise ConfigError(f"Unknown model. Received: model={name!r} (expected one of {', '.join(MODELS)})")
    return MODELS[name](tuple(input_shape), int(num_classes))


def validate_model(model: keras.Model) -> keras.Model:
    """Check that ``model`` is a chain of supported layers; raise `UnsupportedLayerError` otherwise."""
    if not isinstance(model, keras.Model):
        raise UnsupportedLayerError(f"Received: model of type {type(model).__name__} (expected a keras.Model)")
    if not model.built:
        raise UnsupportedLayerError(
            f"Model {model.name!r} is not built: give it an Input or call model.build(input_shape)"
        )
    for layer in model.layers:
        if not isinstance(layer, SUPPORTED_LAYERS):
            names = ", ".join(t.__name__ for t in SUPPORTED_LAYERS if t is not keras.layers.InputLayer)
            raise UnsupportedLayerError(
                f"Layer {layer.name!r} of type {type(layer).__name__} is not supported. "
                f"Received: {type(layer).__name__} (supported: {names})"
            )
        if isinstance(layer, keras.layers.Conv2D) and layer.data_format != "channels_last":
            raise UnsupportedLayerError(f"Layer {layer.name!r}: only channels_last convolutions are supported")
    if not isinstance(model, keras.Sequential):
        # A functional model must be a plain chain: each layer feeds exactly the next one.
        for layer in model.layers:
            if len(layer._inbound_nodes) > 1 or (
                layer._inbound_nodes and len(layer._inbound_nodes[0].parent_nodes) > 1
            ):
                raise UnsupportedLayerError(
                    f"Layer {layer.name!r} has several inputs or is shared; only chains of layers are supported"
                )
    if not conv_layers(model):
        raise UnsupportedLayerError(f"Model {model.name!r} has no Conv2D layer to record")
    return model


def conv_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The model's Conv2D layers in order."""
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def weighted_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The model's Conv2D and Dense layers in order."""
    return [layer for layer in model.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]
