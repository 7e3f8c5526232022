"""Model surgery: add, delete and re-initialise filters exactly, carrying the optimizer state over.

The original ReVACNN scrambled the next layer's weights and reset the optimizer when it added
or removed filters. Here every structural change is exact:

* ``add_filters`` appends ``n`` output channels to a Conv2D (or units to a Dense) layer and grows
  the input channels of the next weighted layer (its *consumer*) to match. With the default
  ``init="zero"`` the new filters' outgoing weights are zero, so the network computes exactly what
  it computed before (function-preserving), while the new filters themselves get a fresh random
  kernel so that they receive gradients and can learn.
* ``delete_filters`` removes filters and the matching input channels of the consumer (and of a
  BatchNormalization in between). The new network computes what the old one computed with the
  deleted filters' outgoing weights (the consumer's input slices) set to zero.

  BatchNormalization caveat: zeroing a filter's *output* is not the same as deleting it when a
  BatchNormalization follows, because BN maps a zero channel to ``beta - gamma * mean / sqrt(var +
  eps)``, which is generally not zero, and that value would still reach the consumer. Zeroing the
  consumer's input slice is the exact reference, and that is what deletion reproduces.
* ``reinit_filters`` redraws some filters in place and zeroes their optimizer slot slices.

Graphs (residual ``Add``, ``Concatenate``, depthwise convolutions) are handled by
`revacnn.steering.graph`, which the live trainer and forks use for every model; on a chain it gives
the same result as this module, whose optimizer transfer it reuses.

Supported models here: ``keras.Sequential`` models and functional models that are a single chain
(one input, one output, every layer fed by the previous one), channels_last, made of Conv2D,
Dense, pooling (MaxPooling2D, AveragePooling2D, GlobalAveragePooling2D, GlobalMaxPooling2D),
BatchNormalization, Dropout/SpatialDropout2D, Activation/ReLU/LeakyReLU/ELU, padding/cropping and
Flatten. Between the operated layer and its consumer only channel-wise layers, Flatten (index
remapping: the flattened index of ``(h, w, c)`` is ``h*W*C + w*C + c``) and BatchNormalization
(new channel: gamma 1, beta 0, moving mean 0, moving variance 1) may appear.

Optimizer state: a new optimizer of the same class and config (the *current* learning rate
included) is built over the new model's trainable variables; ``iterations`` and every other
global optimizer variable are copied; every slot variable (Adam/AdamW momentum and velocity, SGD
momentum, RMSprop velocity/momentum/average gradient, gradient accumulators, EMA averages, ...)
of a surviving weight is copied slice by slice; slots of new filters start at zero. Slots are
found through the optimizer's own slot lists (attributes indexed like
``optimizer._get_variable_index``) and, for anything else, through the name Keras gives a
variable made by ``add_variable_from_reference`` (``"<reference path with _>_<slot>"``).

The returned model is not compiled: compile it with the returned optimizer (``model.compile(
optimizer=result.optimizer, ...)``) or use the optimizer in a custom training step.

Example:
    >>> res = add_filters(model, optimizer, "conv1", 2)  # doctest: +SKIP
    >>> model, optimizer = res.model, res.optimizer      # doctest: +SKIP
    >>> res.kept                                         # doctest: +SKIP
    array([ 0,  1,  2,  3, -1, -1])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from revacnn.errors import LayerNotFoundError, SteeringError, UnsupportedLayerError

__all__ = [
    "SurgeryResult",
    "add_filters",
    "delete_filters",
    "reinit_filters",
    "consumer_of",
]

L = keras.layers

# Layers that act on each channel separately and keep channels_last layout: the channel index
# passes through them unchanged.
_CHANNELWISE: tuple[type, ...] = (
    L.MaxPooling2D,
    L.AveragePooling2D,
    L.GlobalAveragePooling2D,
    L.GlobalMaxPooling2D,
    L.Dropout,
    L.SpatialDropout2D,
    L.GaussianDropout,
    L.GaussianNoise,
    L.AlphaDropout,
    L.Activation,
    L.ReLU,
    L.LeakyReLU,
    L.ELU,
    L.ZeroPadding2D,
    L.Cropping2D,
    L.ActivityRegularization,
)
# Layers whose output channels can be added or deleted, and that can consume channels.
_WEIGHTED: tuple[type, ...] = (L.Conv2D, L.Dense)
_BN_PARAMS: tuple[tuple[str, float], ...] = (
    ("gamma", 1.0),
    ("beta", 0.0),
    ("moving_mean", 0.0),
    ("moving_variance", 1.0),
)


@dataclass
class SurgeryResult:
    """The outcome of a structural change.

    Attributes:
        model: The new model: same layer names and order, built, weights copied and remapped.
        layer: The name of the layer operated on.
        kept: For the operated layer, the old filter index of each new filter, ``-1`` for new ones.
        optimizer: A new optimizer of the same class and config, built over all trainable
            variables of the new model, with ``iterations`` and all slots carried over.

    Example:
        >>> res = delete_filters(model, opt, "conv2", [0, 3])  # doctest: +SKIP
        >>> res.kept                                            # doctest: +SKIP
        array([1, 2, 4, 5])
    """

    model: keras.Model
    layer: str
    kept: np.ndarray
    optimizer: keras.optimizers.Optimizer


# --------------------------------------------------------------------------------------------
# Model structure
# --------------------------------------------------------------------------------------------


def _chain(model: keras.Model) -> list[keras.layers.Layer]:
    """Return the model's layers in call order (no InputLayer), refusing non-chain models."""
    if not isinstance(model, keras.Model):
        raise SteeringError(
            f"Model surgery needs a keras.Model. Received: model of type {type(model).__name__}"
        )
    if not model.built:
        raise SteeringError(
            f"Model surgery needs a built model. Received: model '{model.name}' that is not "
            "built (call it on data or build it first)"
        )
    if isinstance(model, keras.Sequential):
        return list(model.layers)
    nodes_by_depth = getattr(model, "_nodes_by_depth", None)
    if nodes_by_depth is None:
        raise UnsupportedLayerError(
            "Model surgery supports Sequential and functional models. Received: a subclassed "
            f"model of type {type(model).__name__}"
        )
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UnsupportedLayerError(
            "Model surgery supports single-input single-output chain models. Received: "
            f"{len(model.inputs)} inputs and {len(model.outputs)} outputs"
        )
    layers: list[keras.layers.Layer] = []
    for depth in sorted(nodes_by_depth, reverse=True):
        nodes = nodes_by_depth[depth]
        if len(nodes) != 1 or len(nodes[0].input_tensors) > 1:
            names = sorted({n.operation.name for n in nodes})
            raise UnsupportedLayerError(
                "Model surgery supports chain models only (every layer fed by the previous "
                f"one). Received: a branching model (layers {', '.join(names)} at one depth)"
            )
        op = nodes[0].operation
        if not isinstance(op, L.InputLayer):
            layers.append(op)
    return layers


def _to_numpy(x: Any) -> np.ndarray:
    """A writable NumPy copy of a variable or tensor (``.numpy()`` avoids NumPy 2 warnings)."""
    return np.array(x.numpy() if hasattr(x, "numpy") else keras.ops.convert_to_numpy(x))


def _names(layers: Sequence[keras.layers.Layer]) -> str:
    return ", ".join(layer.name for layer in layers)


def _find(layers: list[keras.layers.Layer], name: str) -> int:
    if not isinstance(name, str):
        raise SteeringError(
            f"A layer name must be a string. Received: layer={name!r} (layers are {_names(layers)})"
        )
    for i, layer in enumerate(layers):
        if layer.name == name:
            return i
    raise LayerNotFoundError(
        f"No such layer. Received: layer={name!r} (layers are {_names(layers)})"
    )


def _check_weighted(layer: keras.layers.Layer, layers: list[keras.layers.Layer], what: str) -> None:
    """Refuse anything but a plain channels_last Conv2D or Dense layer."""
    if not isinstance(layer, _WEIGHTED) or isinstance(layer, keras.Model):
        ops = [la for la in layers if isinstance(la, _WEIGHTED)]
        raise SteeringError(
            f"Cannot {what} layer {layer.name!r}: it is a {type(layer).__name__}. Received: "
            f"layer={layer.name!r} (expected a Conv2D or Dense layer: {_names(ops)})"
        )
    if isinstance(layer, L.Conv2D):
        if layer.data_format != "channels_last":
            raise UnsupportedLayerError(
                f"Model surgery supports channels_last only. Received: layer {layer.name!r} "
                f"with data_format={layer.data_format!r}"
            )
        if getattr(layer, "groups", 1) != 1:
            raise UnsupportedLayerError(
                f"Model surgery does not support grouped convolutions. Received: layer "
                f"{layer.name!r} with groups={layer.groups}"
            )
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        raise UnsupportedLayerError(
            f"Model surgery does not support LoRA or quantized layers. Received: layer "
            f"{layer.name!r}"
        )


def _width(layer: keras.layers.Layer) -> int:
    return int(layer.filters if isinstance(layer, L.Conv2D) else layer.units)


def _kernel(layer: keras.layers.Layer) -> keras.Variable:
    kernel = getattr(layer, "_kernel", None)
    return layer.kernel if kernel is None else kernel


def _input_shapes(model: keras.Model, layers: list[keras.layers.Layer]) -> list[tuple]:
    """The (batch-included) input shape of every layer of the chain."""
    shape = tuple(model.inputs[0].shape)
    shapes = []
    for layer in layers:
        shapes.append(shape)
        shape = tuple(layer.compute_output_shape(shape))
    return shapes


def _is_channelwise(layer: keras.layers.Layer) -> bool:
    if not isinstance(layer, _CHANNELWISE) or isinstance(layer, keras.Model):
        return False
    return getattr(layer, "data_format", "channels_last") in (None, "channels_last")


def consumer_of(model: keras.Model, layer: str) -> str | None:
    """Name of the next weighted layer fed by ``layer`` (``None`` for the last one).

    BatchNormalization and weightless layers between the two are skipped: the consumer is the
    layer whose kernel reads ``layer``'s channels.

    Args:
        model: A built Sequential or chain functional model.
        layer: Name of a layer of ``model``.

    Returns:
        The consumer's name, or ``None`` when no weighted layer follows.

    Raises:
        LayerNotFoundError: ``layer`` is not in the model.

    Example:
        >>> consumer_of(model, "conv2")  # doctest: +SKIP
        'dense1'
    """
    layers = _chain(model)
    i = _find(layers, layer)
    for nxt in layers[i + 1 :]:
        if isinstance(nxt, L.BatchNormalization) or not nxt.weights:
            continue
        return nxt.name
    return None


# --------------------------------------------------------------------------------------------
# Plans: how every variable of the old model maps onto the new one
# --------------------------------------------------------------------------------------------


@dataclass
class _Remap:
    """New value = old value taken at ``kept`` along ``axis``; -1 positions come from ``fill``."""

    axis: int
    kept: np.ndarray
    fill: Callable[[tuple[int, ...], np.dtype], np.ndarray]


def _const(value: float) -> Callable[[tuple[int, ...], np.dtype], np.ndarray]:
    def fill(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.full(shape, value, dtype=dtype)

    return fill


def _from_initializer(
    initializer: Any, seed: int
) -> Callable[[tuple[int, ...], np.dtype], np.ndarray]:
    """A fill drawing the whole new shape from a re-seeded copy of ``initializer``.

    Drawing the full shape (and keeping only the new slices) gives the new filters the same
    scale the layer's initializer would give them (Glorot/He use the whole kernel's fan).
    Keras initializers with ``seed=None`` return the same values on every call, hence the copy.
    """
    init = keras.initializers.get(initializer)
    config = init.get_config()
    if "seed" in config:
        init = type(init).from_config({**config, "seed": int(seed)})

    def fill(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.asarray(_to_numpy(init(shape, dtype="float32")), dtype=dtype)

    return fill


def _apply_remap(old: np.ndarray, new_shape: tuple[int, ...], remap: _Remap) -> np.ndarray:
    if (remap.kept >= 0).all():  # nothing new: a plain selection, no draw needed
        return np.take(old, remap.kept, axis=remap.axis)
    out = np.moveaxis(np.array(remap.fill(new_shape, old.dtype), dtype=old.dtype), remap.axis, 0)
    src = np.moveaxis(old, remap.axis, 0)
    have = remap.kept >= 0
    out[np.nonzero(have)[0]] = src[remap.kept[have]]
    return np.moveaxis(out, 0, remap.axis)


def _zero_remap(value: np.ndarray, remap: _Remap | Sequence[_Remap]) -> np.ndarray:
    """Apply a remap (or a sequence of them, one axis each) with zeros for new positions."""
    for step in [remap] if isinstance(remap, _Remap) else remap:
        shape = list(value.shape)
        shape[step.axis] = len(step.kept)
        value = _apply_remap(value, tuple(shape), _Remap(step.axis, step.kept, _const(0.0)))
    return value


def _refuse_mixing(layer: keras.layers.Layer, target: str, what: str) -> None:
    """Refuse a layer whose activation mixes channels (softmax over channels ...)."""
    from .graph import _activation_name, _elementwise

    if isinstance(layer, L.Softmax):
        name = "softmax"
    else:
        act = getattr(layer, "activation", None)
        if act is None or _elementwise(act):
            return
        name = _activation_name(act)
    raise SteeringError(
        f"Cannot {what} layer {target!r}: the change reaches layer {layer.name!r}, whose "
        f"activation {name!r} mixes channels; surgery through it is refused"
    )


def _seeds(seed: int | None, n: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(s) for s in rng.integers(0, 2**31 - 1, size=n)]


def _plan(
    model: keras.Model,
    layer: str,
    kept: np.ndarray,
    *,
    outgoing: str,
    seed: int | None,
    what: str,
) -> tuple[list[keras.layers.Layer], int, dict[int, _Remap]]:
    """Check the path from ``layer`` to its consumer and plan every variable's remapping.

    Returns:
        The chain, the operated layer's index, and a map ``id(old variable) -> _Remap``.
    """
    layers = _chain(model)
    i = _find(layers, layer)
    op = layers[i]
    _check_weighted(op, layers, what)
    kernel_seed, consumer_seed = _seeds(seed, 2)
    plan: dict[int, _Remap] = {
        id(_kernel(op)): _Remap(-1, kept, _from_initializer(op.kernel_initializer, kernel_seed)),
    }
    if op.use_bias:
        plan[id(op.bias)] = _Remap(0, kept, _const(0.0))

    shapes = _input_shapes(model, layers)
    feat = kept  # old feature index of every new feature on the last axis
    _refuse_mixing(op, layer, what)
    for j in range(i + 1, len(layers)):
        nxt = layers[j]
        if isinstance(nxt, (L.Activation, L.Softmax)):
            _refuse_mixing(nxt, layer, what)
        if _is_channelwise(nxt):
            continue
        if isinstance(nxt, L.Flatten) and not isinstance(nxt, keras.Model):
            if getattr(nxt, "data_format", "channels_last") != "channels_last":
                raise UnsupportedLayerError(
                    f"Model surgery supports channels_last only. Received: layer {nxt.name!r} "
                    f"with data_format={nxt.data_format!r}"
                )
            in_shape = shapes[j]
            channels = int(in_shape[-1])
            positions = math.prod(int(d) for d in in_shape[1:-1])
            # Flatten of (..., C) puts channel c of spatial position p at p * C + c.
            base = (np.arange(positions, dtype=np.int64) * channels)[:, None]
            flat = np.where(feat[None, :] >= 0, base + feat[None, :], -1)
            feat = flat.reshape(-1)
            continue
        if isinstance(nxt, L.BatchNormalization):
            rank = len(shapes[j])
            if nxt.axis not in (-1, rank - 1):
                raise UnsupportedLayerError(
                    f"Model surgery needs BatchNormalization over the last axis. Received: "
                    f"layer {nxt.name!r} with axis={nxt.axis}"
                )
            for attr, value in _BN_PARAMS:
                var = getattr(nxt, attr, None)
                if var is not None:
                    plan[id(var)] = _Remap(0, feat, _const(value))
            continue
        if isinstance(nxt, _WEIGHTED) and not isinstance(nxt, keras.Model):
            _check_weighted(nxt, layers, "feed")
            fill = (
                _const(0.0)
                if outgoing == "zero"
                else _from_initializer(nxt.kernel_initializer, consumer_seed)
            )
            axis = 2 if isinstance(nxt, L.Conv2D) else 0
            plan[id(_kernel(nxt))] = _Remap(axis, feat, fill)
            return layers, i, plan
        if not nxt.weights and not isinstance(nxt, keras.Model):
            raise UnsupportedLayerError(
                f"Cannot {what} layer {layer!r}: the path to its consumer goes through "
                f"{nxt.name!r}, a {type(nxt).__name__}, which surgery does not support "
                "(expected pooling, dropout, activation, padding, BatchNormalization, Flatten)"
            )
        raise UnsupportedLayerError(
            f"Cannot {what} layer {layer!r}: its consumer {nxt.name!r} is a "
            f"{type(nxt).__name__} (expected Conv2D or Dense)"
        )
    raise SteeringError(
        f"Cannot {what} layer {layer!r}: it is the output layer, and changing its units would "
        f"change the number of outputs ({_width(op)}). Received: layer={layer!r} "
        f"(layers with a consumer: "
        f"{_names([la for la in layers if isinstance(la, _WEIGHTED)][:-1])})"
    )


# --------------------------------------------------------------------------------------------
# Rebuilding the model
# --------------------------------------------------------------------------------------------


def _rebuild(
    model: keras.Model, layers: list[keras.layers.Layer], configs: dict[str, dict]
) -> tuple[keras.Model, list[keras.layers.Layer]]:
    """A new model of the same kind from the layers' configs (some replaced), built, uncompiled."""
    new_layers = [
        type(layer).from_config(configs.get(layer.name, layer.get_config())) for layer in layers
    ]
    ref = model.inputs[0]
    input_name = None
    if isinstance(model, keras.Sequential):
        first = model._layers[0] if model._layers else None
        if isinstance(first, L.InputLayer):
            input_name = first.name
    else:
        input_name = model.layers[0].name if isinstance(model.layers[0], L.InputLayer) else None
    # The batch size stays free (a model built by a first call records that call's batch size).
    batch_shape = (None, *tuple(ref.shape)[1:])
    inputs = keras.Input(batch_shape=batch_shape, dtype=ref.dtype, name=input_name)
    if isinstance(model, keras.Sequential):
        new = keras.Sequential([inputs, *new_layers], name=model.name, trainable=model.trainable)
    else:
        x = inputs
        for layer in new_layers:
            x = layer(x)
        new = keras.Model(inputs, x, name=model.name, trainable=model.trainable)
    return new, new_layers


def _copy_layers(
    old_layers: list[keras.layers.Layer],
    new_layers: list[keras.layers.Layer],
    plan: dict[int, _Remap],
) -> dict[int, keras.Variable]:
    """Copy (and remap) every variable; return ``id(old variable) -> new variable``."""
    mapping: dict[int, keras.Variable] = {}
    for old_layer, new_layer in zip(old_layers, new_layers, strict=True):
        old_vars, new_vars = list(old_layer.variables), list(new_layer.variables)
        if len(old_vars) != len(new_vars):
            raise SteeringError(
                f"Internal error: layer {old_layer.name!r} has {len(old_vars)} variables before "
                f"surgery and {len(new_vars)} after"
            )
        for old_var, new_var in zip(old_vars, new_vars, strict=True):
            value = _to_numpy(old_var)
            remap = plan.get(id(old_var))
            if remap is not None:
                value = _apply_remap(value, tuple(new_var.shape), remap)
            if tuple(value.shape) != tuple(new_var.shape):
                raise SteeringError(
                    f"Internal error: variable {old_var.path} has shape {value.shape}, its "
                    f"rebuilt counterpart {tuple(new_var.shape)}"
                )
            new_var.assign(value)
            mapping[id(old_var)] = new_var
    return mapping


# --------------------------------------------------------------------------------------------
# Optimizer state
# --------------------------------------------------------------------------------------------


def _slot_table(optimizer: keras.optimizers.Optimizer) -> dict[int, tuple[int, str]]:
    """Map ``id(slot variable) -> (index of its model variable, slot key)``.

    Slots come first from the optimizer's own per-variable lists (``_momentums``,
    ``_velocities``, ``momentums``, ``_accumulated_gradients`` ...: any attribute holding one
    optimizer variable, or ``None``, per model variable in ``_get_variable_index`` order, each
    shaped like its model variable), then from the ``add_variable_from_reference`` naming rule.
    Variables not in the table (``iteration``, ``learning_rate`` ...) are global state.
    """
    refs = list(getattr(optimizer, "_trainable_variables", []))
    n = len(refs)
    own = {id(v) for v in optimizer.variables}
    table: dict[int, tuple[int, str]] = {}
    if n == 0:
        return table
    for attr, value in sorted(vars(optimizer).items()):
        if attr in ("_variables", "_trainable_variables") or not isinstance(value, (list, tuple)):
            continue
        if len(value) != n or all(v is None for v in value):
            continue
        if all(
            v is None or (id(v) in own and tuple(v.shape) == tuple(r.shape))
            for v, r in zip(value, refs, strict=True)
        ):
            for k, v in enumerate(value):
                if v is not None:
                    table.setdefault(id(v), (k, attr))
    prefixes = sorted(
        ((r.path.replace("/", "_") + "_", k) for k, r in enumerate(refs) if hasattr(r, "path")),
        key=lambda p: -len(p[0]),
    )
    for v in optimizer.variables:
        if id(v) in table:
            continue
        for prefix, k in prefixes:
            if v.name.startswith(prefix) and tuple(v.shape) == tuple(refs[k].shape):
                table[id(v)] = (k, "name:" + v.name[len(prefix) :])
                break
    return table


def _transfer_optimizer(
    optimizer: keras.optimizers.Optimizer,
    new_model: keras.Model,
    mapping: dict[int, keras.Variable],
    plan: dict[int, _Remap],
) -> keras.optimizers.Optimizer:
    """A new optimizer over the new model's variables with the old state carried over."""
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise SteeringError(
            "Model surgery needs a Keras optimizer. Received: optimizer of type "
            f"{type(optimizer).__name__}"
        )
    new_opt = type(optimizer).from_config(optimizer.get_config())
    old_refs = list(optimizer._trainable_variables) if optimizer.built else []
    new_refs: list[keras.Variable] = []
    for ref in old_refs:
        if id(ref) not in mapping:
            raise SteeringError(
                f"The optimizer tracks variable {getattr(ref, 'path', ref.name)!r}, which is not "
                "a variable of the model. Received: an optimizer built over another model"
            )
        new_refs.append(mapping[id(ref)])
    seen = {id(v) for v in new_refs}
    new_refs += [v for v in new_model.trainable_variables if id(v) not in seen]
    new_opt.build(new_refs)

    old_table, new_table = _slot_table(optimizer), _slot_table(new_opt)
    new_slots = {key: v for v in new_opt.variables if (key := new_table.get(id(v))) is not None}
    # Global state (iteration, learning_rate, Nadam's u_product ...) is created in the same order
    # by both optimizers; unnamed ones get auto-numbered paths, so pair them by position.
    new_globals = iter([v for v in new_opt.variables if id(v) not in new_table])
    filled: set[int] = set()
    for old_var in optimizer.variables:
        value = _to_numpy(old_var)
        key = old_table.get(id(old_var))
        if key is None:
            target = next(new_globals, None)
        else:
            target = new_slots.get(key)
            remap = plan.get(id(old_refs[key[0]]))
            if remap is not None and target is not None:
                value = _zero_remap(value, remap)
        if target is None or tuple(target.shape) != tuple(value.shape) or id(target) in filled:
            raise SteeringError(
                f"Cannot carry optimizer variable {old_var.path!r} over to the rebuilt "
                f"{type(optimizer).__name__} (no matching variable); refusing to lose its state"
            )
        target.assign(value)
        filled.add(id(target))
    # Everything left unfilled must be a (zero) slot of a variable the old optimizer did not track.
    n_old = len(old_refs)
    for v in new_opt.variables:
        if id(v) not in filled and (id(v) not in new_table or new_table[id(v)][0] < n_old):
            raise SteeringError(
                f"Internal error: optimizer variable {v.path!r} of the rebuilt "
                f"{type(optimizer).__name__} has no counterpart in the old one"
            )
    return new_opt


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _indices(indices: Sequence[int], width: int, layer: str) -> np.ndarray:
    try:
        raw = list(indices)
    except TypeError:
        raise SteeringError(
            f"Filter indices must be a sequence of integers. Received: indices={indices!r}"
        ) from None
    if not raw:
        raise SteeringError(
            f"No filter indices given. Received: indices=[] for layer {layer!r} "
            f"(expected indices in 0..{width - 1})"
        )
    bad = [
        i for i in raw if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer))
    ]
    if bad:
        raise SteeringError(f"Filter indices must be integers. Received: {bad[0]!r} in {raw!r}")
    out = np.asarray([int(i) for i in raw], dtype=np.int64)
    wrong = [int(i) for i in out if not 0 <= i < width]
    if wrong:
        raise SteeringError(
            f"Filter index out of range. Received: {wrong} for layer {layer!r} "
            f"(it has {width} filters: expected 0..{width - 1})"
        )
    uniq, counts = np.unique(out, return_counts=True)
    if (counts > 1).any():
        raise SteeringError(
            f"Duplicate filter indices. Received: {sorted(int(i) for i in uniq[counts > 1])} "
            f"more than once in {raw!r}"
        )
    return out


def _slot_vars(optimizer: keras.optimizers.Optimizer, var: keras.Variable) -> list[keras.Variable]:
    if optimizer is None or not optimizer.built:
        return []
    try:
        index = optimizer._get_variable_index(var)
    except KeyError:
        return []
    table = _slot_table(optimizer)
    return [v for v in optimizer.variables if table.get(id(v), (None,))[0] == index]


# --------------------------------------------------------------------------------------------
# Public operations
# --------------------------------------------------------------------------------------------


def add_filters(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    layer: str,
    n: int,
    *,
    init: str = "zero",
    seed: int | None = None,
) -> SurgeryResult:
    """Append ``n`` filters (Conv2D output channels or Dense units) to ``layer``.

    The consumer's input channels grow to match (through pooling, dropout, activations,
    BatchNormalization and Flatten). The new filters get a fresh kernel drawn from the layer's
    kernel initializer and a zero bias; a BatchNormalization in between gets gamma 1, beta 0,
    moving mean 0 and moving variance 1 for them.

    Args:
        model: The built model.
        optimizer: The optimizer training ``model`` (built over its trainable variables).
        layer: Name of a Conv2D or Dense layer that is not the output layer.
        n: Number of filters to add (>= 1).
        init: ``"zero"`` (default): the new filters' outgoing weights in the consumer are zero,
            so the model's outputs are unchanged (function-preserving). ``"random"``: they are
            drawn from the consumer's kernel initializer.
        seed: Seed for the random draws; ``None`` draws a fresh one.

    Returns:
        The new model, ``kept`` (old index per new filter, ``-1`` for the new ones) and the new
        optimizer with the old state carried over.

    Raises:
        LayerNotFoundError: No layer of that name.
        SteeringError: Bad ``n`` or ``init``, a layer that cannot get filters, the output layer.
        UnsupportedLayerError: A layer surgery cannot remap lies between ``layer`` and its
            consumer.

    Example:
        >>> res = add_filters(model, opt, "conv1", 2)  # doctest: +SKIP
        >>> res.model.get_layer("conv1").filters       # doctest: +SKIP
        10
    """
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 1:
        raise SteeringError(
            f"The number of filters to add must be an integer >= 1. Received: n={n!r}"
        )
    if init not in ("zero", "random"):
        raise SteeringError(
            f"Unknown initialisation. Received: init={init!r} (expected 'zero' or 'random')"
        )
    layers = _chain(model)
    op = layers[_find(layers, layer)]
    _check_weighted(op, layers, "add filters to")
    width = _width(op)
    kept = np.concatenate([np.arange(width, dtype=np.int64), np.full(int(n), -1, dtype=np.int64)])
    return _operate(model, optimizer, layer, kept, outgoing=init, seed=seed, what="add filters to")


def delete_filters(
    model: keras.Model, optimizer: keras.optimizers.Optimizer, layer: str, indices: Sequence[int]
) -> SurgeryResult:
    """Remove filters ``indices`` of ``layer`` and the matching input channels of its consumer.

    The new model computes what the old one computed with the deleted filters' outgoing weights
    (the consumer's input slices) zeroed. With a BatchNormalization in between, zeroing the
    filters' outputs instead would differ (BN turns a zero channel into a non-zero constant).

    Args:
        model: The built model.
        optimizer: The optimizer training ``model``.
        layer: Name of a Conv2D or Dense layer that is not the output layer.
        indices: Filters to delete: distinct, in range, not all of them.

    Returns:
        The new model, ``kept`` (the surviving old indices, in order) and the new optimizer.

    Raises:
        LayerNotFoundError: No layer of that name.
        SteeringError: Bad indices, deleting every filter, the output layer.
        UnsupportedLayerError: A layer surgery cannot remap lies between ``layer`` and its
            consumer.

    Example:
        >>> delete_filters(model, opt, "conv1", [1, 3]).kept  # doctest: +SKIP
        array([0, 2, 4, 5])
    """
    layers = _chain(model)
    op = layers[_find(layers, layer)]
    _check_weighted(op, layers, "delete filters of")
    width = _width(op)
    drop = _indices(indices, width, layer)
    if len(drop) >= width:
        raise SteeringError(
            f"Cannot delete every filter of layer {layer!r}. Received: {len(drop)} indices for "
            f"a layer with {width} filters (at least one must stay)"
        )
    kept = np.setdiff1d(np.arange(width, dtype=np.int64), drop)
    return _operate(
        model, optimizer, layer, kept, outgoing="zero", seed=0, what="delete filters of"
    )


def _operate(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    layer: str,
    kept: np.ndarray,
    *,
    outgoing: str,
    seed: int | None,
    what: str,
) -> SurgeryResult:
    layers, i, plan = _plan(model, layer, kept, outgoing=outgoing, seed=seed, what=what)
    op = layers[i]
    config = op.get_config()
    config["filters" if isinstance(op, L.Conv2D) else "units"] = int(len(kept))
    new_model, new_layers = _rebuild(model, layers, {op.name: config})
    mapping = _copy_layers(layers, new_layers, plan)
    new_opt = _transfer_optimizer(optimizer, new_model, mapping, plan)
    return SurgeryResult(model=new_model, layer=layer, kept=kept.copy(), optimizer=new_opt)


def reinit_filters(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer | None,
    layer: str,
    indices: Sequence[int],
    *,
    seed: int | None = None,
) -> None:
    """Re-draw filters ``indices`` of ``layer`` in place and reset their optimizer slots.

    The kernel slices are drawn from the layer's kernel initializer (over the whole kernel
    shape, so the scale is the layer's), the biases set to 0, and every optimizer slot slice of
    those filters (e.g. Adam moments, SGD momentum) set to 0. Outgoing weights are untouched.

    Args:
        model: The built model.
        optimizer: The optimizer training ``model`` (``None``: weights only).
        layer: Name of a Conv2D or Dense layer (the output layer is allowed).
        indices: Filters to re-initialise: distinct and in range.
        seed: Seed for the draw; ``None`` draws a fresh one.

    Raises:
        LayerNotFoundError: No layer of that name.
        SteeringError: Bad indices or a layer without filters.

    Example:
        >>> reinit_filters(model, opt, "conv2", [4], seed=1)  # doctest: +SKIP
    """
    layers = _chain(model)
    op = layers[_find(layers, layer)]
    _check_weighted(op, layers, "re-initialise filters of")
    idx = _indices(indices, _width(op), layer)
    kernel = _kernel(op)
    (kernel_seed,) = _seeds(seed, 1)
    value = _to_numpy(kernel)
    fresh = _from_initializer(op.kernel_initializer, kernel_seed)(tuple(kernel.shape), value.dtype)
    value[..., idx] = fresh[..., idx]
    kernel.assign(value)
    targets = [kernel]
    if op.use_bias:
        bias = _to_numpy(op.bias)
        bias[idx] = 0
        op.bias.assign(bias)
        targets.append(op.bias)
    for var in targets:
        for slot in _slot_vars(optimizer, var):
            state = _to_numpy(slot)
            state[..., idx] = 0
            slot.assign(state)
