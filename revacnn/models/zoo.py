"""The built-in models (convnetjs, revacnn, resnet20): channels-last CNNs that read uint8 images as given."""

from __future__ import annotations

from collections.abc import Callable

import keras

from ..errors import ConfigError

#: Layer types the chain filter surgery understands (recording takes any Sequential/functional graph).
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

    rescale (uint8 0..255 to 0..1) → conv 16 5x5 → pool → conv 20 5x5 → pool → conv 20 5x5 → pool → softmax.
    """
    L = keras.layers
    return keras.Sequential(
        [
            keras.Input(input_shape),
            L.Rescaling(1.0 / 255.0, name="rescale"),
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

    rescale → conv32 3x3 → pool → conv64 → conv64 → pool → dense128 → dense10.
    """
    L = keras.layers
    return keras.Sequential(
        [
            keras.Input(input_shape),
            L.Rescaling(1.0 / 255.0, name="rescale"),
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


def resnet20(input_shape: tuple[int, int, int], num_classes: int, *, dropout: float = 0.0,
             rescale: bool = True) -> keras.Model:
    """The CIFAR ResNet-20 of He et al. (2016), as a functional model (~0.27M parameters).

    rescale → conv1 (16, 3x3) → BN → ReLU → 3 stages × 3 basic blocks (16, 32, 64 filters; the
    first block of stages 2 and 3 halves the resolution) → global average pooling → dense1
    (softmax). A basic block is conv → BN → ReLU → conv → BN, added to its shortcut, then ReLU;
    where the shape changes the shortcut is a 1x1 projection conv with BN. Convolutions are named
    ``conv1`` … ``conv21`` in creation order (a block's projection after its two convs). With
    ``dropout`` > 0, a Dropout layer (``drop``) sits between the pooling and dense1. ``rescale``
    (default, for the uint8 built-in datasets) maps 0..255 to 0..1 first; pass ``rescale=False``
    for inputs that are standardized already.

    Example:
        >>> model = resnet20((32, 32, 3), 10)
        >>> model.count_params() // 1000
        272
    """
    Ly = keras.layers
    n = {"conv": 0, "bn": 0, "relu": 0, "add": 0}

    def name(kind: str) -> str:
        n[kind] += 1
        return f"{kind}{n[kind]}"

    def conv(x: keras.KerasTensor, filters: int, size: int, strides: int = 1) -> keras.KerasTensor:
        return Ly.Conv2D(filters, size, strides=strides, padding="same", use_bias=False,
                         kernel_initializer="he_normal", name=name("conv"))(x)

    def bn(x: keras.KerasTensor) -> keras.KerasTensor:
        return Ly.BatchNormalization(name=name("bn"))(x)

    def relu(x: keras.KerasTensor) -> keras.KerasTensor:
        return Ly.ReLU(name=name("relu"))(x)

    inputs = keras.Input(input_shape)
    x = Ly.Rescaling(1.0 / 255.0, name="rescale")(inputs) if rescale else inputs
    x = relu(bn(conv(x, 16, 3)))
    width = 16
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            strides = 2 if stage > 0 and block == 0 else 1
            y = relu(bn(conv(x, filters, 3, strides)))
            y = bn(conv(y, filters, 3))
            shortcut = x
            if strides != 1 or width != filters:
                shortcut = bn(conv(x, filters, 1, strides))
            x = relu(Ly.Add(name=name("add"))([y, shortcut]))
            width = filters
    x = Ly.GlobalAveragePooling2D(name="gap")(x)
    if dropout:
        x = Ly.Dropout(dropout, name="drop")(x)
    outputs = Ly.Dense(num_classes, activation="softmax", name="dense1")(x)
    return keras.Model(inputs, outputs, name="resnet20")


MODELS: dict[str, Callable[[tuple[int, int, int], int], keras.Model]] = {
    "convnetjs": convnetjs,
    "revacnn": revacnn,
    "resnet20": resnet20,
}


def model_factory(spec: str) -> Callable[..., keras.Model]:
    """The user's model factory named ``MODULE:FUNCTION`` (imported; `ConfigError` if it is not there).

    Example:
        >>> model_factory("revacnn.models.zoo:resnet20")((32, 32, 3), 10).name
        'resnet20'
    """
    import importlib

    module, _, func = spec.partition(":")
    try:
        mod = importlib.import_module(module)
    except Exception as exc:
        raise ConfigError(f"Cannot import the model module. Received: model={spec!r} ({type(exc).__name__}: {exc})") from None
    fn = getattr(mod, func, None)
    if not callable(fn):
        raise ConfigError(f"Received: model={spec!r} ({module} has no function {func!r})")
    return fn


def _call_factory(fn: Callable[..., keras.Model], spec: str, input_shape: tuple[int, int, int],
                  num_classes: int) -> keras.Model:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    model = fn(input_shape, num_classes) if len(params) >= 2 else fn()
    if not isinstance(model, keras.Model):
        raise ConfigError(f"Received: model={spec!r} returned {type(model).__name__} (expected a keras.Model)")
    return model


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """Build a built-in model by name, or call the user's factory ``MODULE:FUNCTION``.

    Example:
        >>> model = build_model("convnetjs", (32, 32, 3), 10)
        >>> [l.name for l in conv_layers(model)]
        ['conv1', 'conv2', 'conv3']
    """
    if isinstance(name, str) and ":" in name and name not in MODELS:
        return _call_factory(model_factory(name), name, tuple(input_shape), int(num_classes))
    if name not in MODELS:
        raise ConfigError(
            f"Unknown model. Received: model={name!r} (expected one of {', '.join(MODELS)} or MODULE:FUNCTION)"
        )
    return MODELS[name](tuple(input_shape), int(num_classes))


def conv_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The model's recorded convolution layers in graph order (nested models included)."""
    from .graph import recorded_layers

    return [r.layer for r in recorded_layers(model) if r.kind == "conv"]


def weighted_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The model's recorded layers (convolutions and Dense) in graph order (nested models included)."""
    from .graph import recorded_layers

    return [r.layer for r in recorded_layers(model)]
