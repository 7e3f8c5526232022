"""Channel dependency graphs of Keras models and group filter surgery (add/delete/reinit) over them.

A chain's filter surgery changes one layer and its consumer. In a residual network the outputs of
every layer feeding one ``Add`` must keep the same channels, a ``Concatenate`` puts its inputs'
channels side by side, and a ``DepthwiseConv2D`` has one channel (times its multiplier) per input
channel. This module follows those ties, the way Torch-Pruning's dependency graph does, so that
``add-filters``, ``delete-filters`` and ``reinit-filters`` change every tied layer together.

**The graph.** Every tensor's channel axis (the last one; channels_last only) is a list of channel
*atoms*. A producer (``Conv2D``, ``Dense``, ``SeparableConv2D``'s pointwise part) creates fresh
atoms; element-wise layers (element-wise activations, Dropout, pooling, padding, cropping,
upsampling, global pooling) pass the list on; ``BatchNormalization`` passes it on and has one entry
of each of its four arrays per channel; ``DepthwiseConv2D`` with multiplier ``m`` maps input
channel ``c`` to outputs ``c*m .. c*m+m-1`` (atoms derived from ``c``'s); ``Concatenate`` on the
channel axis concatenates its inputs' lists; ``Add`` (and ``Subtract``, ``Multiply``, ``Average``,
``Maximum``, ``Minimum``, and ``Concatenate`` on another axis) unifies its inputs position by
position (a union-find over atoms). ``Flatten`` maps channel ``c`` at spatial position ``p`` to
feature ``p*C + c`` for the ``Dense`` that reads it. A *group* is a class of unified atoms; the
producers whose channels are in it change together, and so does every consumer of them.

Anything else (a softmax over channels, ``Reshape``, ``LayerNormalization``, attention, grouped
convolutions, nested models, the model input and outputs) gets fixed atoms: a change that reaches
such a layer is refused with a `SteeringError` that names it.

**The operations.**

* ``add-filters`` appends ``n`` channels to every producer of the target's group; with the default
  ``init="zero"`` every consumer's weights on them are zero, so the model computes exactly what it
  computed before; the new filters get fresh kernels (the layer's initializer), zero biases, and
  BatchNormalization gets gamma 1, beta 0, moving mean 0 and moving variance 1 for them.
* ``delete-filters`` removes channels from every producer, member and consumer of the group. The
  result computes what the old model computed with the deleted channels' outgoing weights (the
  consumers' input slices) zeroed throughout the group.
* ``reinit-filters`` redraws those channels in place in every producer and depthwise member of
  the group (BatchNormalization reset as for a new channel), zeroes their optimizer slot slices, and
  leaves every other weight alone.

The new model is rebuilt with `keras.models.clone_model` from the layers' configs (``filters`` or
``units`` changed), same names and order, weights copied slice by slice; the optimizer is rebuilt
and every slot carried over slice for slice (`revacnn.steering.surgery`'s transfer), with the
variable count checked (Keras itself would load optimizer state by position and only warn).

**Frozen layers.** Adding filters to a group in which a layer that would get new slices (a
producer's new filters or a consumer's new input weights) is frozen is refused: with a frozen
consumer the new filters' outgoing weights would stay zero and the filters would be dead on
arrival. Unfreeze it first. Deleting and re-initialising in frozen layers is allowed.

Example:
    >>> p = plan(model, {"op": "add-filters", "args": {"layer": "conv1", "n": 2}})  # doctest: +SKIP
    >>> print(p.format())                                                          # doctest: +SKIP
    >>> res = apply(model, optimizer, {"op": "delete-filters",
    ...                                "args": {"layer": "conv1", "indices": [0]}})  # doctest: +SKIP
    >>> res.model, res.optimizer, res.changed["conv1"]                            # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import keras
import numpy as np

from ..errors import LayerNotFoundError, SteeringError
from .surgery import (
    _apply_remap,
    _const,
    _from_initializer,
    _kernel,
    _Remap,
    _seeds,
    _slot_vars,
    _to_numpy,
    _transfer_optimizer,
)

__all__ = [
    "ELEMENTWISE_ACTIVATIONS",
    "ChannelGraph",
    "GraphSurgeryResult",
    "LayerChange",
    "Plan",
    "apply",
    "plan",
]

L = keras.layers

#: Activation names that act on each value separately (so on each channel separately).
ELEMENTWISE_ACTIVATIONS: frozenset[str] = frozenset(
    {
        "linear", "relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "sigmoid", "hard_sigmoid",
        "tanh", "hard_tanh", "silu", "swish", "hard_silu", "hard_swish", "softplus", "softsign",
        "exponential", "mish", "celu", "log_sigmoid", "sparse_plus", "squareplus",
        "tanh_shrink", "soft_shrink", "hard_shrink", "threshold",
    }
)
OPS = ("add-filters", "delete-filters", "reinit-filters")

_PASS: tuple[type, ...] = (
    L.MaxPooling2D, L.AveragePooling2D, L.GlobalAveragePooling2D, L.GlobalMaxPooling2D,
    L.Dropout, L.SpatialDropout2D, L.GaussianDropout, L.GaussianNoise, L.AlphaDropout,
    L.ZeroPadding2D, L.Cropping2D, L.UpSampling2D, L.ActivityRegularization, L.Identity,
    L.ReLU, L.LeakyReLU, L.ELU,
)
_MERGE: tuple[type, ...] = (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum)
_BN_PARAMS: tuple[tuple[str, float], ...] = (
    ("gamma", 1.0), ("beta", 0.0), ("moving_mean", 0.0), ("moving_variance", 1.0),
)


def _activation_name(fn: Any) -> str:
    try:
        name = keras.activations.serialize(fn)
    except Exception:  # an unregistered callable
        name = getattr(fn, "__name__", repr(fn))
    if isinstance(name, dict):
        name = name.get("config", name.get("class_name", "?"))
        name = name if isinstance(name, str) else repr(name)
    return str(name)


def _elementwise(fn: Any) -> bool:
    return _activation_name(fn) in ELEMENTWISE_ACTIVATIONS


# --------------------------------------------------------------------------------------------
# Plain-data plan
# --------------------------------------------------------------------------------------------


@dataclass
class LayerChange:
    """What a change does to one layer.

    Attributes:
        layer: The layer's name.
        type: Its class name.
        role: ``producer`` (its filters change), ``consumer`` (its input weights change), both
            (``producer+consumer``), ``member`` (BatchNormalization, depthwise: channels follow),
            ``merge``/``concat``/``pass`` (no weights; channels pass through).
        in_channels: ``[old, new]`` input channel counts (features for Dense), or ``None``.
        out_channels: ``[old, new]`` output channel counts, or ``None``.
        deleted: Old output channel indices removed (or re-initialised, for reinit).
        added: New output channel positions that are new channels.
        in_deleted: Old input channel indices removed.
        in_added: New input channel positions that are new channels.
        variables: Paths of the variables the change writes.

    Example:
        >>> ch = plan(model, {"op": "add-filters",
        ...                   "args": {"layer": "conv1", "n": 2}}).changes[0]  # doctest: +SKIP
        >>> ch.layer, ch.role, ch.out_channels, ch.added                        # doctest: +SKIP
        ('conv1', 'producer', [16, 18], [16, 17])
    """

    layer: str
    type: str
    role: str
    in_channels: list[int] | None = None
    out_channels: list[int] | None = None
    deleted: list[int] = field(default_factory=list)
    added: list[int] = field(default_factory=list)
    in_deleted: list[int] = field(default_factory=list)
    in_added: list[int] = field(default_factory=list)
    variables: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """Every layer and channel range a change touches, as plain data (JSON-ready via `to_dict`).

    Attributes:
        op: ``add-filters``, ``delete-filters`` or ``reinit-filters``.
        layer: The target layer.
        args: The command's arguments.
        group: The producers whose channels are tied to the target's (the target included).
        changes: One `LayerChange` per layer touched, in graph order.

    Example:
        >>> p = plan(model, {"op": "delete-filters",
        ...                  "args": {"layer": "conv1", "indices": [2]}})  # doctest: +SKIP
        >>> [c.layer for c in p.changes]                                   # doctest: +SKIP
        ['conv1', 'bn1', 'add', 'conv2', 'shortcut']
    """

    op: str
    layer: str
    args: dict[str, Any]
    group: list[str]
    changes: list[LayerChange]

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain JSON-serialisable data."""
        return asdict(self)

    @property
    def layers(self) -> list[str]:
        """Names of the layers the change touches."""
        return [c.layer for c in self.changes]

    def format(self) -> str:
        """A human-readable listing (what ``--dry-run`` prints)."""
        args = ", ".join(f"{k}={v}" for k, v in self.args.items() if k != "layer")
        lines = [f"plan: {self.op} {self.layer} ({args}); group: {', '.join(self.group)}"]
        verb = "reinit" if self.op == "reinit-filters" else "delete"
        for c in self.changes:
            parts = [f"  {c.layer} ({c.type}, {c.role})"]
            if c.role in ("member", "pass", "merge", "concat"):
                parts.append(f"channels {c.out_channels[0]}->{c.out_channels[1]}")
            elif c.in_deleted or c.in_added:
                parts.append(f"in {c.in_channels[0]}->{c.in_channels[1]}")
                if c.in_deleted:
                    parts.append(f"drop inputs {_ranges(c.in_deleted)}")
                if c.in_added:
                    parts.append(f"new inputs {_ranges(c.in_added)}")
            if c.role not in ("consumer", "member", "pass", "merge", "concat") and (
                c.deleted or c.added
            ):
                parts.append(f"out {c.out_channels[0]}->{c.out_channels[1]}")
            if c.deleted:
                parts.append(f"{verb} {_ranges(c.deleted)}")
            if c.added:
                parts.append(f"new {_ranges(c.added)}")
            lines.append(" ".join(parts))
        return "\n".join(lines)


def _ranges(idx: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    out: list[str] = []
    idx = sorted(int(i) for i in idx)
    start = prev = None
    for i in [*idx, None]:
        if i is not None and prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            out.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = i
    return ",".join(out)


@dataclass
class GraphSurgeryResult:
    """The outcome of a group change.

    Attributes:
        model: The new model (for reinit: the same model, changed in place).
        optimizer: The new optimizer with every slot carried over (for reinit: the same one).
        layer: The target layer.
        kept: The target's old output index of each new output channel (``-1``: new).
        changed: For every layer with filters whose output channels changed, the same array.
        plan: The `Plan` that was applied.

    Example:
        >>> res = apply(model, opt, {"op": "delete-filters",
        ...                          "args": {"layer": "stem", "indices": [0]}})  # doctest: +SKIP
        >>> {k: v.tolist() for k, v in res.changed.items()}                     # doctest: +SKIP
        {'stem': [1, 2, 3], 'b1c2': [1, 2, 3]}
    """

    model: keras.Model
    optimizer: keras.optimizers.Optimizer | None
    layer: str
    kept: np.ndarray
    changed: dict[str, np.ndarray]
    plan: Plan


# --------------------------------------------------------------------------------------------
# The channel graph
# --------------------------------------------------------------------------------------------


class _UF:
    """Union-find over integer atoms (grows on demand)."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def copy(self) -> _UF:
        other = _UF()
        other.parent = list(self.parent)
        return other

    def grow(self, n: int) -> None:
        while len(self.parent) < n:
            self.parent.append(len(self.parent))

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class _Node:
    index: int
    layer: Any
    kind: str
    inputs: list[tuple]
    outputs: list[tuple]
    in_shapes: list[tuple]
    out_shapes: list[tuple]
    reason: str = ""
    multiplier: int = 1


def _key(t: Any) -> tuple:
    h = t._keras_history
    return (id(h.operation), int(h.node_index), int(h.tensor_index))


def _channels_last(layer: Any) -> bool:
    return getattr(layer, "data_format", "channels_last") in (None, "channels_last")


def _classify(layer: Any, in_shapes: list[tuple]) -> tuple[str, str, int]:
    """(kind, reason if fixed, depth multiplier) of a layer."""
    name = type(layer).__name__
    if isinstance(layer, L.InputLayer):
        return "input", "the model input (its channels are fixed)", 1
    if isinstance(layer, keras.Model):
        return "fixed", f"a nested model ({name}); surgery does not go into nested models", 1
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        return "fixed", f"a LoRA or quantized {name}", 1
    if not _channels_last(layer):
        return "fixed", f"a {name} with data_format={layer.data_format!r} (channels_last only)", 1
    if isinstance(layer, L.SeparableConv2D):
        return "separable", "", int(layer.depth_multiplier)
    if isinstance(layer, L.DepthwiseConv2D):
        return "depthwise", "", int(layer.depth_multiplier)
    if isinstance(layer, L.Conv2D):
        if int(getattr(layer, "groups", 1)) != 1:
            return "fixed", f"a grouped Conv2D (groups={layer.groups}), which mixes channel ranges", 1
        return "producer", "", 1
    if isinstance(layer, L.Dense):
        return "producer", "", 1
    if isinstance(layer, L.BatchNormalization):
        rank = len(in_shapes[0])
        if layer.axis not in (-1, rank - 1) and list(np.atleast_1d(layer.axis)) not in (
            [-1],
            [rank - 1],
        ):
            return "fixed", f"a BatchNormalization over axis {layer.axis} (not the channels)", 1
        return "bn", "", 1
    if isinstance(layer, L.Activation):
        act = _activation_name(layer.activation)
        if act not in ELEMENTWISE_ACTIVATIONS:
            return "fixed", f"Activation({act!r}), which mixes channels", 1
        return "pass", "", 1
    if isinstance(layer, _PASS):
        return "pass", "", 1
    if isinstance(layer, L.Concatenate):
        rank = len(in_shapes[0])
        return ("concat" if layer.axis in (-1, rank - 1) else "merge"), "", 1
    if isinstance(layer, _MERGE):
        return "merge", "", 1
    if isinstance(layer, L.Flatten):
        return "flatten", "", 1
    if isinstance(layer, L.Softmax):
        return "fixed", "a Softmax layer, which mixes channels", 1
    if isinstance(layer, (L.Reshape, L.Permute)):
        return "fixed", f"a {name}, which moves channels to other positions", 1
    if isinstance(layer, (L.LayerNormalization, L.GroupNormalization, L.UnitNormalization)):
        return "fixed", f"a {name}, which normalises across channels", 1
    if isinstance(layer, (L.MultiHeadAttention, L.Attention, L.AdditiveAttention)):
        return "fixed", f"an attention layer ({name}), which mixes channels", 1
    return "fixed", f"a {name}, which surgery cannot map channels through", 1


class ChannelGraph:
    """The channel dependency graph of a built Sequential or functional Keras model.

    Attributes:
        model: The model.
        nodes: The graph's nodes in topological order.
        lists: For every tensor (keyed by its Keras history), its channel atoms.

    Example:
        >>> g = ChannelGraph(model)               # doctest: +SKIP
        >>> g.group_of("conv1")                   # doctest: +SKIP
        ['conv1', 'block1_conv2', 'block2_conv2']
    """

    def __init__(self, model: keras.Model) -> None:
        if not isinstance(model, keras.Model):
            raise SteeringError(
                f"Model surgery needs a keras.Model. Received: model of type {type(model).__name__}"
            )
        if not model.built:
            raise SteeringError(
                f"Model surgery needs a built model. Received: model {model.name!r} that is not "
                "built (call it on data or build it first)"
            )
        graph = model._functional if isinstance(model, keras.Sequential) else model
        by_depth = getattr(graph, "_nodes_by_depth", None)
        if by_depth is None:
            raise SteeringError(
                "Model surgery supports Sequential models with an Input and functional models. "
                f"Received: model {model.name!r} of type {type(model).__name__} whose graph "
                "Keras does not expose"
            )
        self.model = model
        self.nodes: list[_Node] = []
        for depth in sorted(by_depth, reverse=True):
            for node in by_depth[depth]:
                op = node.operation
                ins = list(node.input_tensors)
                outs = list(node.output_tensors)
                in_shapes = [tuple(t.shape) for t in ins]
                kind, reason, mult = _classify(op, in_shapes)
                if len(outs) != 1 and kind != "fixed":
                    kind, reason = "fixed", f"a {type(op).__name__} with several outputs"
                if kind == "input":
                    in_shapes = [tuple(t.shape) for t in outs]
                self.nodes.append(
                    _Node(len(self.nodes), op, kind, [_key(t) for t in ins],
                          [_key(t) for t in outs], in_shapes, [tuple(t.shape) for t in outs],
                          reason, mult)
                )
        self.output_keys = [_key(t) for t in graph.outputs]
        self._memo: dict[tuple, int] = {}
        self.derived: dict[int, int] = {}  # derived atom -> source atom
        self.uf = _UF()
        self.node_count: dict[str, int] = {}
        for n in self.nodes:
            self.node_count[n.layer.name] = self.node_count.get(n.layer.name, 0) + 1
        self.lists = self._propagate(self.uf, {}, first=True)

    # ------------------------------------------------------------------ atoms
    def _atom(self, key: tuple, src: int | None = None) -> int:
        a = self._memo.get(key)
        if a is None:
            a = self._memo[key] = len(self._memo)
            if src is not None:
                self.derived[a] = src
        return a

    def _propagate(
        self, uf: _UF, override: dict[int, list[int]], *, first: bool
    ) -> dict[tuple, list[int]]:
        """Channel atoms of every tensor; ``override`` replaces some producers' outputs."""
        lists: dict[tuple, list[int]] = {}
        for n in self.nodes:
            ins = [lists[k] for k in n.inputs]
            if n.index in override:
                out = override[n.index]
            elif n.kind in ("input", "fixed", "producer", "separable"):
                width = int(n.out_shapes[0][-1]) if n.out_shapes[0] else 1
                tag = "p" if n.kind in ("producer", "separable") else "x"
                out = [self._atom((tag, n.index, i)) for i in range(width)]
                for t in range(1, len(n.outputs)):  # a multi-output fixed layer
                    w = int(n.out_shapes[t][-1]) if n.out_shapes[t] else 1
                    lists[n.outputs[t]] = [self._atom(("x", n.index, t, i)) for i in range(w)]
            elif n.kind == "depthwise":
                m = n.multiplier
                out = (
                    list(ins[0])
                    if m == 1
                    else [self._atom(("dw", n.index, j, a), a) for a in ins[0] for j in range(m)]
                )
            elif n.kind in ("pass", "bn"):
                out = list(ins[0])
            elif n.kind == "concat":
                out = [a for lst in ins for a in lst]
            elif n.kind == "merge":
                width = len(ins[0])
                if any(len(lst) != width for lst in ins):
                    raise SteeringError(
                        f"The inputs of {type(n.layer).__name__} {n.layer.name!r} would no longer "
                        f"line up: {[len(lst) for lst in ins]} channels"
                    )
                if not first:
                    self._check_aligned(uf, n, ins)
                for lst in ins[1:]:
                    uf.grow(len(self._memo))
                    for a, b in zip(ins[0], lst, strict=True):
                        uf.union(a, b)
                out = list(ins[0])
            elif n.kind == "flatten":
                positions = math.prod(int(d) for d in n.in_shapes[0][1:-1])
                out = [self._atom(("f", n.index, p, a), a) for p in range(positions) for a in ins[0]]
            else:  # pragma: no cover
                raise SteeringError(f"Internal error: node kind {n.kind!r}")
            lists[n.outputs[0]] = out
        uf.grow(len(self._memo))
        return lists

    def _check_aligned(self, uf: _UF, n: _Node, ins: list[list[int]]) -> None:
        """In a changed graph, an old channel may only meet the same old channel at a merge."""
        uf.grow(len(self._memo))
        old = len(self.uf.parent)
        for pos, column in enumerate(zip(*ins, strict=True)):
            olds = {self.uf.find(a) for a in column if a < old}
            if len(olds) > 1 or (olds and any(a >= old for a in column)):
                raise SteeringError(
                    f"The inputs of {type(n.layer).__name__} {n.layer.name!r} would no longer line "
                    f"up at channel {pos}: the change reaches only some of its inputs (its "
                    "channels are tied to part of another layer's channels through a "
                    "Concatenate or a depth multiplier)"
                )

    # ------------------------------------------------------------------ queries
    def node_of(self, name: str) -> _Node:
        """The (single) node of layer ``name``."""
        if not isinstance(name, str):
            raise SteeringError(f"A layer name must be a string. Received: layer={name!r}")
        found = [n for n in self.nodes if n.layer.name == name]
        if not found:
            names = [n.layer.name for n in self.nodes if n.kind in ("producer", "separable")]
            raise LayerNotFoundError(
                f"No such layer. Received: layer={name!r} (layers with filters: {', '.join(names)})"
            )
        if len(found) > 1:
            raise SteeringError(
                f"Layer {name!r} is shared ({len(found)} calls in the graph); surgery on shared "
                "layers is not supported"
            )
        return found[0]

    def out_list(self, name: str) -> list[int]:
        """The channel atoms of layer ``name``'s output."""
        return self.lists[self.node_of(name).outputs[0]]

    def classes(self, atoms: Sequence[int], uf: _UF | None = None) -> list[int]:
        uf = uf or self.uf
        return [uf.find(a) for a in atoms]

    def group_of(self, name: str) -> list[str]:
        """The producers whose output channels are tied to ``name``'s (``name`` first)."""
        target = set(self.classes(self.out_list(name)))
        out = [name]
        for n in self.nodes:
            if n.kind in ("producer", "separable", "input", "fixed") and n.layer.name != name:
                if target & set(self.classes(self.lists[n.outputs[0]])):
                    out.append(n.layer.name)
        return out


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


def _command(command: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(command, Mapping):
        op, args = command.get("op"), command.get("args", {})
    else:
        op, args = getattr(command, "op", None), getattr(command, "args", None)
    if op not in OPS:
        raise SteeringError(
            f"Group surgery does add-filters, delete-filters and reinit-filters. Received: op={op!r}"
        )
    if not isinstance(args, Mapping):
        raise SteeringError(f"Received: args={args!r} (expected a mapping)")
    return str(op), dict(args)


def _kept(old: list[int], new: list[int], uf_old: _UF, uf_new: _UF) -> np.ndarray:
    """Old position of every new channel (by class and occurrence), ``-1`` for new channels."""
    seen: dict[tuple[int, int], int] = {}
    count: dict[int, int] = {}
    for i, a in enumerate(old):
        c = uf_old.find(a)
        k = count.get(c, 0)
        count[c] = k + 1
        seen[(c, k)] = i
    out = np.full(len(new), -1, dtype=np.int64)
    count = {}
    n_old = len(uf_old.parent)
    for i, a in enumerate(new):
        if a >= n_old:
            continue
        c = uf_new.find(a)
        k = count.get(c, 0)
        count[c] = k + 1
        out[i] = seen.get((c, k), -1)
    return out


def _same(kept: np.ndarray, old_len: int) -> bool:
    return len(kept) == old_len and bool((kept == np.arange(old_len)).all())


@dataclass
class _Work:
    """Everything `plan` works out; `apply` turns it into a new model."""

    op: str
    args: dict[str, Any]
    graph: ChannelGraph
    target: _Node
    new_lists: dict[tuple, list[int]]
    uf_new: _UF
    kept_in: dict[int, list[np.ndarray]]
    kept_out: dict[int, np.ndarray]
    reinit: dict[int, np.ndarray]  # node index -> output positions re-initialised
    plan: Plan


def _indices(args: dict[str, Any], width: int, layer: str) -> list[int]:
    idx = args.get("indices")
    if (
        not isinstance(idx, (list, tuple))
        or not idx
        or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in idx)
    ):
        raise SteeringError(
            f"Received: indices={idx!r} (expected a non-empty list of filter indices of {layer})"
        )
    bad = [int(i) for i in idx if not 0 <= int(i) < width]
    if bad:
        raise SteeringError(
            f"Filter index out of range. Received: indices={bad} ({layer} has {width} filters: "
            f"0..{width - 1})"
        )
    if len(set(int(i) for i in idx)) != len(idx):
        raise SteeringError(f"Duplicate filter indices. Received: indices={list(idx)}")
    return sorted(int(i) for i in idx)


def _close(graph: ChannelGraph, classes: set[int]) -> set[int]:
    """Grow a set of classes until derived channels and their sources go together."""
    uf = graph.uf
    out = set(classes)
    changed = True
    while changed:
        changed = False
        for a, src in graph.derived.items():
            ca, cs = uf.find(a), uf.find(src)
            if (ca in out) != (cs in out):
                out |= {ca, cs}
                changed = True
        if changed:  # every atom derived from a source in the set joins it
            for a, src in graph.derived.items():
                if uf.find(src) in out and uf.find(a) not in out:
                    out.add(uf.find(a))
    return out


def _work(model: keras.Model, command: Any, frozen: Collection[str] = ()) -> _Work:
    op, args = _command(command)
    graph = ChannelGraph(model)
    layer = args.get("layer")
    target = graph.node_of(layer)
    if target.kind not in ("producer", "separable", "depthwise"):
        names = [n.layer.name for n in graph.nodes if n.kind in ("producer", "separable")]
        raise SteeringError(
            f"Cannot change the filters of layer {layer!r}: it is a {type(target.layer).__name__}. "
            f"Received: layer={layer!r} (expected a Conv2D, SeparableConv2D, DepthwiseConv2D or "
            f"Dense layer: {', '.join(names)})"
        )
    uf = graph.uf
    old_lists = graph.lists
    t_out = old_lists[target.outputs[0]]
    width = len(t_out)
    reinit: dict[int, np.ndarray] = {}
    what = {"add-filters": "add filters to", "delete-filters": "delete filters of",
            "reinit-filters": "re-initialise filters of"}[op]

    if op == "add-filters":
        n_new = args.get("n")
        if isinstance(n_new, bool) or not isinstance(n_new, (int, np.integer)) or n_new < 1:
            raise SteeringError(
                f"The number of filters to add must be an integer >= 1. Received: n={n_new!r}"
            )
        init = args.get("init", "zero")
        if init not in ("zero", "random"):
            raise SteeringError(f"Received: init={init!r} (expected 'zero' or 'random')")
        if target.kind == "depthwise":
            raise SteeringError(
                f"Cannot add filters to {layer!r}: a DepthwiseConv2D has one filter per input "
                "channel; add filters to the layer that feeds it"
            )
        group = set(graph.classes(t_out))
        seq = graph.classes(t_out)
        override: dict[int, list[int]] = {}
        news = [graph._atom(("new", i, len(graph._memo))) for i in range(int(n_new))]
        for n in graph.nodes:
            out = old_lists[n.outputs[0]] if n.outputs else []
            if not group & set(graph.classes(out)):
                continue
            if n.kind in ("input", "fixed"):
                raise SteeringError(
                    f"Cannot {what} {layer!r}: its channels are tied (through Add or Concatenate) "
                    f"to the output of layer {n.layer.name!r}, {n.reason}"
                )
            if n.kind in ("producer", "separable"):
                if graph.classes(out) != seq:
                    raise SteeringError(
                        f"Cannot {what} {layer!r}: its channels are tied to part of the output "
                        f"of layer {n.layer.name!r} (through a Concatenate inside a residual "
                        "sum); add filters to that layer instead"
                    )
                override[n.index] = list(out) + news
        uf_new = uf.copy()
        new_lists = graph._propagate(uf_new, override, first=False)
    else:
        if op == "delete-filters":
            idx = _indices(args, width, layer)
            if len(idx) >= width:
                raise SteeringError(
                    f"Cannot delete every filter of {layer!r}. Received: {len(idx)} indices "
                    f"({layer} has {width} filters; at least one must remain)"
                )
        else:
            idx = _indices(args, width, layer)
        chosen = _close(graph, {uf.find(t_out[i]) for i in idx})
        uf_new = uf
        if op == "delete-filters":
            new_lists = {k: [a for a in v if uf.find(a) not in chosen] for k, v in old_lists.items()}
        else:
            new_lists = old_lists
            for n in graph.nodes:
                if n.kind in ("producer", "separable", "depthwise", "bn", "input", "fixed"):
                    out = old_lists[n.outputs[0]]
                    pos = np.array([i for i, a in enumerate(out) if uf.find(a) in chosen], np.int64)
                    if len(pos) and n.kind in ("input", "fixed"):
                        raise SteeringError(
                            f"Cannot {what} {layer!r}: its channels are tied to the output of "
                            f"layer {n.layer.name!r}, {n.reason}"
                        )
                    if len(pos):
                        reinit[n.index] = pos

    # Per node: old position of every new input/output channel.
    kept_in: dict[int, list[np.ndarray]] = {}
    kept_out: dict[int, np.ndarray] = {}
    changes: list[LayerChange] = []
    out_keys = set(graph.output_keys)
    # Keras-level freezing (layer.trainable = False) counts as frozen too.
    frozen = set(frozen) | {n.layer.name for n in graph.nodes if not n.layer.trainable}
    for n in graph.nodes:
        kin = [_kept(old_lists[k], new_lists[k], uf, uf_new) for k in n.inputs]
        kout = _kept(old_lists[n.outputs[0]], new_lists[n.outputs[0]], uf, uf_new)
        in_changed = any(
            not _same(k, len(old_lists[key])) for k, key in zip(kin, n.inputs, strict=True)
        )
        out_changed = not _same(kout, len(old_lists[n.outputs[0]]))
        out_changed_r = n.index in reinit
        if not (in_changed or out_changed or out_changed_r):
            continue
        name = n.layer.name
        if n.kind in ("input", "fixed"):
            raise SteeringError(
                f"Cannot {what} {layer!r}: the change reaches layer {name!r}, {n.reason}; "
                "surgery through it is refused"
            )
        if out_changed and n.outputs[0] in out_keys:
            raise SteeringError(
                f"Cannot {what} {layer!r}: it would change the width of the model's output "
                f"(layer {name!r}, {len(old_lists[n.outputs[0]])} channels)"
            )
        if graph.node_count[name] > 1:
            raise SteeringError(
                f"Cannot {what} {layer!r}: the change reaches layer {name!r}, which is shared "
                f"({graph.node_count[name]} calls); surgery on shared layers is not supported"
            )
        act = getattr(n.layer, "activation", None)
        if (out_changed or out_changed_r) and act is not None and not _elementwise(act):
            raise SteeringError(
                f"Cannot {what} {layer!r}: the change reaches layer {name!r}, whose activation "
                f"{_activation_name(act)!r} mixes channels; surgery through it is refused"
            )
        if op == "add-filters" and name in frozen and n.kind in (
            "producer", "separable", "depthwise"
        ):
            role = "consumer" if in_changed and not out_changed else "producer"
            raise SteeringError(
                f"Cannot {what} {layer!r}: layer {name!r} is frozen, and as a {role} of the new "
                "channels it would get new weights that never train"
                + (" (the new filters would be dead on arrival: their outgoing weights stay "
                   "zero)" if role == "consumer" else "")
                + f"; unfreeze {name} first"
            )
        kept_in[n.index] = kin
        kept_out[n.index] = kout
        changes.append(_describe(n, kin, kout, old_lists, reinit.get(n.index), in_changed,
                                 out_changed))
    group = graph.group_of(layer) if target.kind != "depthwise" else [layer]
    return _Work(
        op=op, args=args, graph=graph, target=target, new_lists=new_lists, uf_new=uf_new,
        kept_in=kept_in, kept_out=kept_out, reinit=reinit,
        plan=Plan(op=op, layer=layer, args=args, group=group, changes=changes),
    )


def _describe(
    n: _Node,
    kin: list[np.ndarray],
    kout: np.ndarray,
    old_lists: dict[tuple, list[int]],
    reinit: np.ndarray | None,
    in_changed: bool,
    out_changed: bool,
) -> LayerChange:
    old_out = len(old_lists[n.outputs[0]])
    weighted = n.kind in ("producer", "separable")
    if n.kind in ("merge", "concat", "pass", "flatten"):
        role = {"merge": "merge", "concat": "concat"}.get(n.kind, "pass")
    elif n.kind in ("bn", "depthwise"):
        role = "member"
    elif weighted and in_changed and (out_changed or reinit is not None):
        role = "producer+consumer"
    elif weighted and in_changed:
        role = "consumer"
    else:
        role = "producer"
    ch = LayerChange(layer=n.layer.name, type=type(n.layer).__name__, role=role)
    if n.inputs and n.kind != "concat" and n.kind != "merge":
        old_in = len(old_lists[n.inputs[0]])
        ch.in_channels = [old_in, len(kin[0])]
        if in_changed:
            ch.in_deleted = sorted(set(range(old_in)) - set(kin[0][kin[0] >= 0].tolist()))
            ch.in_added = np.nonzero(kin[0] < 0)[0].tolist()
    ch.out_channels = [old_out, len(kout)]
    if reinit is not None:
        ch.deleted = [int(i) for i in reinit]
    else:
        ch.deleted = sorted(set(range(old_out)) - set(kout[kout >= 0].tolist()))
        ch.added = np.nonzero(kout < 0)[0].tolist()
    if n.kind in ("producer", "separable", "depthwise", "bn"):
        ch.variables = [v.path for v in n.layer.weights]
    return ch


def plan(model: keras.Model, command: Any, *, frozen: Collection[str] = ()) -> Plan:
    """Work out, without changing anything, every layer and channel range ``command`` touches.

    Args:
        model: A built Sequential or functional model.
        command: A `revacnn.steering.Command` or a mapping ``{"op": ..., "args": {...}}`` with op
            ``add-filters`` (args ``layer``, ``n``, optional ``init``), ``delete-filters`` or
            ``reinit-filters`` (args ``layer``, ``indices``).
        frozen: Names of frozen layers (adding filters that would give them new slices is
            refused).

    Returns:
        The `Plan` (plain data).

    Raises:
        LayerNotFoundError: No layer of that name.
        SteeringError: The change is refused; the message names the layer and the reason.

    Example:
        >>> print(plan(model, {"op": "add-filters",
        ...                    "args": {"layer": "conv1", "n": 2}}).format())  # doctest: +SKIP
        plan: add-filters conv1 (n=2); group: conv1, block1_conv2
          conv1 (Conv2D, producer) out 16->18 new 16-17
          ...
    """
    return _work(model, command, frozen).plan


# --------------------------------------------------------------------------------------------
# Applying
# --------------------------------------------------------------------------------------------


def _expand(kept: np.ndarray, m: int) -> np.ndarray:
    """Per-channel kept indices -> per (channel, multiplier) kept indices."""
    if m == 1:
        return kept
    j = np.arange(m, dtype=np.int64)
    return np.where(kept[:, None] >= 0, kept[:, None] * m + j[None, :], -1).reshape(-1)


def _steps(value: np.ndarray, steps: Sequence[_Remap]) -> np.ndarray:
    for step in steps:
        shape = list(value.shape)
        shape[step.axis] = len(step.kept)
        value = _apply_remap(value, tuple(shape), step)
    return value


def _remaps(work: _Work, seed: int | None) -> tuple[dict[int, list[_Remap]], dict[str, dict]]:
    """``id(old variable) -> remap steps`` and the config changes of every layer."""
    nodes = {n.index: n for n in work.graph.nodes}
    order = sorted(work.kept_in)
    # Seeds: the target's kernel first, then one for the incoming weights (as the chain
    # surgery draws them), then one per further layer.
    base = _seeds(seed, 2)
    extra = iter(_seeds(None if seed is None else seed + 1, 2 * len(order) + 2))
    out_seed = {work.target.index: base[0]}
    zero_in = work.op == "delete-filters" or work.args.get("init", "zero") == "zero"
    first_in = True
    plan: dict[int, list[_Remap]] = {}
    configs: dict[str, dict] = {}
    for i in order:
        n = nodes[i]
        layer = n.layer
        kin, kout = work.kept_in[i], work.kept_out[i]
        in_ch = bool(kin) and not _same(kin[0], len(work.graph.lists[n.inputs[0]]))
        out_ch = not _same(kout, len(work.graph.lists[n.outputs[0]]))
        if n.kind in ("producer", "separable"):
            if in_ch:
                s = base[1] if first_in else next(extra)
                first_in = False
                fill = _const(0.0) if zero_in else None
                if n.kind == "producer":
                    init = _from_initializer(layer.kernel_initializer, s) if fill is None else fill
                    axis = 2 if isinstance(layer, L.Conv2D) else 0
                    plan.setdefault(id(_kernel(layer)), []).append(_Remap(axis, kin[0], init))
                else:
                    plan.setdefault(id(layer.depthwise_kernel), []).append(
                        _Remap(2, kin[0], _from_initializer(layer.depthwise_initializer,
                                                            next(extra)))
                    )
                    init = (_from_initializer(layer.pointwise_initializer, s)
                            if fill is None else fill)
                    plan.setdefault(id(layer.pointwise_kernel), []).append(
                        _Remap(2, _expand(kin[0], n.multiplier), init)
                    )
            if out_ch:
                s = out_seed[i] if i in out_seed else next(extra)
                if n.kind == "producer":
                    axis = -1
                    kernel = _kernel(layer)
                    init = layer.kernel_initializer
                    configs[layer.name] = {
                        "filters" if isinstance(layer, L.Conv2D) else "units": int(len(kout))
                    }
                else:
                    axis, kernel, init = -1, layer.pointwise_kernel, layer.pointwise_initializer
                    configs[layer.name] = {"filters": int(len(kout))}
                plan.setdefault(id(kernel), []).append(
                    _Remap(axis, kout, _from_initializer(init, s))
                )
                if layer.use_bias:
                    plan.setdefault(id(layer.bias), []).append(_Remap(0, kout, _const(0.0)))
        elif n.kind == "depthwise":
            if in_ch:
                plan[id(layer.kernel)] = [
                    _Remap(2, kin[0], _from_initializer(layer.depthwise_initializer, next(extra)))
                ]
            if out_ch and layer.use_bias:
                plan[id(layer.bias)] = [_Remap(0, kout, _const(0.0))]
        elif n.kind == "bn":
            for attr, value in _BN_PARAMS:
                var = getattr(layer, attr, None)
                if var is not None:
                    plan[id(var)] = [_Remap(0, kout, _const(value))]
    return plan, configs


def _rebuild(model: keras.Model, configs: dict[str, dict]) -> keras.Model:
    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if layer.name in configs:
            config = {**config, **configs[layer.name]}
        return type(layer).from_config(config)

    graph = model._functional if isinstance(model, keras.Sequential) else model
    inputs = []
    for t in graph.inputs:
        src = t._keras_history.operation
        inputs.append(keras.Input(batch_shape=tuple(t.shape), dtype=t.dtype, name=src.name))
    new = keras.models.clone_model(
        model, input_tensors=inputs if len(inputs) > 1 else inputs[0], clone_function=clone
    )
    new.trainable = model.trainable
    return new


def _copy(
    model: keras.Model, new: keras.Model, plan: dict[int, list[_Remap]]
) -> dict[int, keras.Variable]:
    mapping: dict[int, keras.Variable] = {}
    for old_layer in model.layers:
        if isinstance(old_layer, L.InputLayer):
            continue
        new_layer = new.get_layer(old_layer.name)
        old_vars, new_vars = list(old_layer.variables), list(new_layer.variables)
        if len(old_vars) != len(new_vars):
            raise SteeringError(
                f"Internal error: layer {old_layer.name!r} has {len(old_vars)} variables before "
                f"surgery and {len(new_vars)} after"
            )
        for ov, nv in zip(old_vars, new_vars, strict=True):
            value = _to_numpy(ov)
            if id(ov) in plan:
                value = _steps(value, plan[id(ov)])
            if tuple(value.shape) != tuple(nv.shape):
                raise SteeringError(
                    f"Internal error: variable {ov.path} has shape {value.shape}, its rebuilt "
                    f"counterpart {tuple(nv.shape)}"
                )
            nv.assign(value)
            mapping[id(ov)] = nv
    return mapping


def _reinit(work: _Work, optimizer: Any, seed: int | None) -> None:
    """Redraw the chosen output channels of every producer and member, in place."""
    nodes = {n.index: n for n in work.graph.nodes}
    seeds = iter(_seeds(seed, 2 * len(work.reinit) + 2))
    first = True
    for i in sorted(work.reinit):
        n, pos = nodes[i], work.reinit[i]
        layer = n.layer
        todo: list[tuple[keras.Variable, np.ndarray, Any]] = []  # variable, mask, fill
        if n.kind in ("producer", "separable"):
            s = next(seeds)
            if i == work.target.index and first:
                s = _seeds(seed, 1)[0]
                first = False
            kernel = _kernel(layer) if n.kind == "producer" else layer.pointwise_kernel
            init = layer.kernel_initializer if n.kind == "producer" else layer.pointwise_initializer
            mask = np.zeros(tuple(kernel.shape), bool)
            mask[..., pos] = True
            todo.append((kernel, mask, _from_initializer(init, s)))
            if layer.use_bias:
                m = np.zeros(tuple(layer.bias.shape), bool)
                m[pos] = True
                todo.append((layer.bias, m, _const(0.0)))
        elif n.kind == "depthwise":
            mult = n.multiplier
            mask = np.zeros(tuple(layer.kernel.shape), bool)
            for p in pos:
                mask[..., int(p) // mult, int(p) % mult] = True
            todo.append((layer.kernel, mask, _from_initializer(layer.depthwise_initializer,
                                                               next(seeds))))
            if layer.use_bias:
                m = np.zeros(tuple(layer.bias.shape), bool)
                m[pos] = True
                todo.append((layer.bias, m, _const(0.0)))
        elif n.kind == "bn":
            for attr, value in _BN_PARAMS:
                var = getattr(layer, attr, None)
                if var is not None:
                    m = np.zeros(tuple(var.shape), bool)
                    m[pos] = True
                    todo.append((var, m, _const(value)))
        for var, mask, fill in todo:
            old = _to_numpy(var)
            var.assign(np.where(mask, fill(tuple(var.shape), old.dtype), old))
            for slot in _slot_vars(optimizer, var):
                state = _to_numpy(slot)
                slot.assign(np.where(mask, 0, state).astype(state.dtype))


def _changed(work: _Work) -> dict[str, np.ndarray]:
    out = {}
    for i, kout in work.kept_out.items():
        n = work.graph.nodes[i]
        if n.kind in ("producer", "separable", "depthwise"):
            if work.op == "reinit-filters":
                if i in work.reinit:
                    out[n.layer.name] = np.arange(len(kout), dtype=np.int64)
            elif not _same(kout, len(work.graph.lists[n.outputs[0]])):
                out[n.layer.name] = kout.copy()
    return out


def apply(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer | None,
    command: Any,
    *,
    seed: int | None = None,
    frozen: Collection[str] = (),
) -> GraphSurgeryResult:
    """Apply a group change: add, delete or re-initialise filters across every tied layer.

    Args:
        model: A built Sequential or functional model.
        optimizer: The Keras optimizer training ``model`` (``None``: weights only, e.g. to plan a
            fork's later changes).
        command: As for `plan`.
        seed: Seed of the random draws (new filters' kernels, re-initialised filters).
        frozen: Names of frozen layers (see `plan`).

    Returns:
        A `GraphSurgeryResult`; for add/delete a new (uncompiled) model and optimizer, for reinit
        the same model and optimizer changed in place.

    Raises:
        LayerNotFoundError: No layer of that name.
        SteeringError: The change is refused; the message names the layer and the reason.

    Example:
        >>> res = apply(model, opt, {"op": "add-filters",
        ...                          "args": {"layer": "conv1", "n": 2}})  # doctest: +SKIP
        >>> res.model.get_layer("conv1").filters                          # doctest: +SKIP
        18
    """
    work = _work(model, command, frozen)
    target = work.target
    changed = _changed(work)
    kept = changed.get(target.layer.name, np.arange(len(work.graph.lists[target.outputs[0]])))
    if work.op == "reinit-filters":
        _reinit(work, optimizer, seed)
        return GraphSurgeryResult(model=model, optimizer=optimizer, layer=target.layer.name,
                                  kept=kept, changed=changed, plan=work.plan)
    remaps, configs = _remaps(work, seed)
    new_model = _rebuild(model, configs)
    mapping = _copy(model, new_model, remaps)
    new_opt = None
    if optimizer is not None:
        new_opt = _transfer_optimizer(optimizer, new_model, mapping, remaps)
        if optimizer.built and len(new_opt.variables) != len(optimizer.variables):
            raise SteeringError(
                f"Internal error: the rebuilt {type(optimizer).__name__} has "
                f"{len(new_opt.variables)} variables, the old one {len(optimizer.variables)}"
            )
    return GraphSurgeryResult(model=new_model, optimizer=new_opt, layer=target.layer.name,
                              kept=kept, changed=changed, plan=work.plan)
