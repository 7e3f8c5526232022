"""A Keras model's graph as revacnn records it: its conv/dense layers (nested models included), their filters, probes.

Any built ``keras.Sequential`` or functional ``keras.Model`` is accepted, nested models included
(their layers are named ``outer/inner``, e.g. ``block1/conv1``). Recorded layers:

* ``Conv2D`` (any ``groups``): one filter per output channel, kernel ``(F, kh, kw, c_in/groups)``;
* ``DepthwiseConv2D``: one filter per input channel × depth multiplier (output channel
  ``c * multiplier + m``), kernel ``(F, kh, kw, 1)``;
* ``SeparableConv2D``: its pointwise filters, kernel ``(F, 1, 1, c_in * multiplier)``; the depthwise
  kernel is kept with the record (array ``depthwise_kernel``);
* ``Dense``: one unit per output, recorded as units (kind ``dense``).

Probe activations come from the graph itself: `GraphProbe` runs the model's own nodes (what
``Functional.call`` does, recursing into nested models) and returns the outputs of the recorded
layers, like a multi-output ``keras.Model`` over those layers' outputs would, but also for layers
inside nested models (whose tensors a single outer ``keras.Model`` cannot reach).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from ..errors import UnsupportedLayerError

L = keras.layers

try:  # Keras 3 internals: the class of functional models, and the per-op call helper
    from keras.src.models.functional import Functional
    from keras.src.models.functional import operation_fn as _operation_fn
except ImportError:  # pragma: no cover - other Keras 3 layouts
    from keras.models import Functional  # type: ignore[attr-defined,no-redef]

    def _operation_fn(op: Any, training: Any) -> Any:  # type: ignore[misc]
        return lambda *a, **k: op(*a, training=training, **k)


#: Layers whose output is taken as a convolution's "post-activation" output when they follow it.
_ACTIVATIONS: tuple[type, ...] = (L.Activation, L.ReLU, L.LeakyReLU, L.ELU, L.PReLU)
_SUPPORTED_TEXT = (
    "Sequential and functional keras.Model graphs (nested ones included) of any Keras layers; "
    "recorded as filters: Conv2D (any groups), DepthwiseConv2D, SeparableConv2D; Dense as units"
)


@dataclass
class RecordedLayer:
    """One recorded layer: its qualified name, the layer, and how its filters are laid out.

    Attributes:
        name: ``layer.name``, prefixed by the nested models it sits in (``block1/conv1``).
        layer: the Keras layer.
        ctype: ``conv`` (Conv2D, any groups), ``depthwise``, ``separable`` or ``dense``.
        rgb_input: the layer sees the model's 3-channel input directly (RGB measures apply).
    """

    name: str
    layer: keras.layers.Layer
    ctype: str
    rgb_input: bool = False

    @property
    def kind(self) -> str:
        """``conv`` or ``dense`` (the ``layers.kind`` column)."""
        return "dense" if self.ctype == "dense" else "conv"

    @property
    def kernel_var(self) -> keras.Variable:
        """The variable whose last axis indexes the filters (pointwise kernel of a separable conv)."""
        if self.ctype == "separable":
            return self.layer.pointwise_kernel
        return self.layer.kernel

    @property
    def bias_var(self) -> keras.Variable | None:
        return getattr(self.layer, "bias", None) if getattr(self.layer, "use_bias", False) else None

    @property
    def n_filters(self) -> int:
        k = self.kernel_var.shape
        if self.ctype == "depthwise":
            return int(k[-2]) * int(k[-1])
        return int(k[-1])

    def kernel(self) -> np.ndarray:
        """The kernel in Keras layout with filters last: ``(kh, kw, c, F)`` (conv kinds) or ``(in, F)``."""
        k = np.array(self.kernel_var.numpy())
        if self.ctype == "depthwise":  # (kh, kw, cin, mult) -> (kh, kw, 1, cin*mult)
            kh, kw, cin, mult = k.shape
            k = k.reshape(kh, kw, 1, cin * mult)
        return k

    def bias(self) -> np.ndarray | None:
        b = self.bias_var
        return None if b is None else np.array(b.numpy())

    def extra_arrays(self) -> dict[str, np.ndarray]:
        """Arrays kept with the record besides the filters (a separable conv's depthwise kernel)."""
        if self.ctype == "separable":
            return {"depthwise_kernel": np.array(self.layer.depthwise_kernel.numpy())}
        return {}

    def filter_mask(self, var: keras.Variable, mask: np.ndarray) -> np.ndarray | None:
        """``mask`` over filters broadcast to ``var``'s shape (None: the variable holds no filter)."""
        if var is self.bias_var:
            return mask
        if var is not self.kernel_var:
            return None
        shape = tuple(int(s) for s in var.shape)
        if self.ctype == "depthwise":
            m = mask.reshape(shape[-2], shape[-1])
            return np.broadcast_to(m, shape).copy()
        return np.broadcast_to(mask, shape).copy()


def _ctype(layer: keras.layers.Layer) -> str | None:
    if isinstance(layer, L.SeparableConv2D):
        return "separable"
    if isinstance(layer, L.DepthwiseConv2D):
        return "depthwise"
    if isinstance(layer, L.Conv2D):
        return "conv"
    if isinstance(layer, L.Dense):
        return "dense"
    return None


def _graph(model: keras.Model) -> Any:
    """The functional graph behind ``model`` (a Sequential's inner functional), or None."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if isinstance(model, Functional):
        return model
    return None


def _check_graph(model: keras.Model, where: str) -> Any:
    g = _graph(model)
    custom_call = (
        isinstance(model, keras.Sequential) and type(model).call is not keras.Sequential.call
    ) or (isinstance(model, Functional) and type(model).call is not Functional.call)
    if g is None or custom_call:
        what = "subclassed" if g is None else "custom call()"
        raise UnsupportedLayerError(
            f"{where}{model.name!r} is a {what} model of type {type(model).__name__}, whose graph Keras "
            f"cannot trace. Received: {type(model).__name__} (supported: {_SUPPORTED_TEXT}; build it with "
            "keras.Model(inputs, outputs) or keras.Sequential)"
        )
    return g


def _operations(model: keras.Model) -> list[Any]:
    """The graph's operations in the model's layer order (InputLayers left out)."""
    return [op for op in model.layers if not isinstance(op, L.InputLayer)]


def recorded_layers(model: keras.Model) -> list[RecordedLayer]:
    """The model's recorded layers in graph order, nested models included.

    Example:
        >>> [r.name for r in recorded_layers(resnet20((32, 32, 3), 10))][:3]
        ['conv1', 'conv2', 'conv3']
    """
    out: list[RecordedLayer] = []
    in_ch = model.inputs[0].shape[-1] if getattr(model, "inputs", None) else None

    def walk(m: keras.Model, prefix: str, top: bool) -> None:
        for op in _operations(m):
            if isinstance(op, keras.Model):
                walk(op, f"{prefix}{op.name}/", False)
                continue
            ct = _ctype(op)
            if ct is None:
                continue
            out.append(RecordedLayer(f"{prefix}{op.name}", op, ct))

    walk(model, "", True)
    first_conv = next((r for r in out if r.kind == "conv"), None)
    if first_conv is not None and in_ch == 3 and first_conv.ctype == "conv":
        first_conv.rgb_input = int(first_conv.kernel_var.shape[-2]) == 3 and first_conv.layer.groups == 1
    return out


def validate_model(model: keras.Model) -> keras.Model:
    """Check that revacnn can record ``model``; raise `UnsupportedLayerError` saying what is supported.

    Example:
        >>> validate_model(convnetjs((32, 32, 3), 10)).name
        'convnetjs'
    """
    if not isinstance(model, keras.Model):
        raise UnsupportedLayerError(
            f"Received: model of type {type(model).__name__} (expected a keras.Model: {_SUPPORTED_TEXT})"
        )
    if not model.built:
        raise UnsupportedLayerError(
            f"Model {model.name!r} is not built: give it a keras.Input or call model.build(input_shape)"
        )
    _check_graph(model, "Model ")

    def walk(m: keras.Model) -> None:
        for op in _operations(m):
            if isinstance(op, keras.Model):
                _check_graph(op, "Nested model ")
                walk(op)
            elif isinstance(op, L.Conv2D) and op.data_format != "channels_last" or (
                isinstance(op, (L.DepthwiseConv2D, L.SeparableConv2D)) and op.data_format != "channels_last"
            ):
                raise UnsupportedLayerError(
                    f"Layer {op.name!r}: only channels_last convolutions are supported. "
                    f"Received: data_format={op.data_format!r}"
                )

    walk(model)
    if not any(r.kind == "conv" for r in recorded_layers(model)):
        raise UnsupportedLayerError(
            f"Model {model.name!r} has no convolution to record. Received: no Conv2D, DepthwiseConv2D "
            "or SeparableConv2D layer"
        )
    return model


def find_layer(model: keras.Model, name: str) -> RecordedLayer | None:
    """The recorded layer called ``name`` (qualified), or None."""
    return next((r for r in recorded_layers(model) if r.name == name), None)


class GraphProbe:
    """Post-activation outputs of the recorded conv layers and the model's output, from the graph itself.

    A conv layer's output is taken after its own activation; when its activation is linear and
    its only consumer is an activation layer (``Activation``, ``ReLU``, ``LeakyReLU`` …), or a
    ``BatchNormalization`` whose only consumer is one, after that activation layer.

    Example:
        >>> probe = GraphProbe(model, recorded_layers(model))
        >>> acts, probs = probe(x)  # acts: one (P, H, W, F) tensor per conv layer
    """

    def __init__(self, model: keras.Model, layers: Sequence[RecordedLayer]) -> None:
        self.model = model
        self.convs = [r for r in layers if r.kind == "conv"]
        self._take: dict[int, int] = {}  # id(operation whose output to take) -> index in convs
        for i, r in enumerate(self.convs):
            self._take[id(self._tap(r.layer))] = i

    def _tap(self, layer: keras.layers.Layer) -> Any:
        act = getattr(layer, "activation", None)
        if act is not None and act is not keras.activations.linear and getattr(act, "__name__", "") != "linear":
            return layer
        cur = layer
        for _ in range(2):
            nodes = [n for n in cur._outbound_nodes if n.operation is not None]
            if len(nodes) != 1:
                return layer
            nxt = nodes[0].operation
            if isinstance(nxt, _ACTIVATIONS):
                return nxt
            if not isinstance(nxt, L.BatchNormalization):
                return layer
            cur = nxt
        return layer

    def _run(self, m: keras.Model, x: Any, found: list[Any]) -> Any:
        g = _graph(m)
        inputs = g._standardize_inputs(x)

        def op_fn(op: Any) -> Any:
            if isinstance(op, keras.Model):
                return lambda *a, **k: self._run(op, a[0] if len(a) == 1 else list(a), found)
            call = _operation_fn(op, training=False)
            idx = self._take.get(id(op))
            if idx is None:
                return call

            def tapped(*a: Any, **k: Any) -> Any:
                y = call(*a, **k)
                found[idx] = y
                return y

            return tapped

        out = g._run_through_graph(inputs, operation_fn=op_fn)
        return out[0] if isinstance(out, (list, tuple)) and len(out) == 1 else out

    def __call__(self, x: Any) -> tuple[list[Any], Any]:
        found: list[Any] = [None] * len(self.convs)
        out = self._run(self.model, x, found)
        return found, out
