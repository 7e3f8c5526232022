"""Checkpoints: every model and optimizer variable, seed states and trainer state; compact files sharing kernels with the record."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from ..errors import CorruptStoreError, StoreError
from ..storage.checkpoints import CheckpointData, SharedSource, encode, read_checkpoint_file


@dataclass
class Checkpoint:
    """What a checkpoint holds, in memory.

    Attributes:
        model_config: ``keras.saving.serialize_keras_object(model)``.
        model_vars: values of ``model.variables`` in order (includes Dropout seed-generator states).
        model_paths: the variables' paths, to check the order on restore.
        optimizer_config: ``keras.optimizers.serialize(optimizer)``.
        optimizer_vars: values of ``optimizer.variables`` in order (iterations, slots …).
        state: the trainer's own state (epoch, filter uids, frozen sets, lr, timing …).
        compile_config: ``model.get_compile_config()`` without the optimizer (the loss, metrics,
            loss weights …), so that a restored model trains with the loss it was compiled with.
    """

    model_config: dict[str, Any]
    model_vars: list[np.ndarray]
    model_paths: list[str]
    optimizer_config: dict[str, Any]
    optimizer_vars: list[np.ndarray]
    state: dict[str, Any] = field(default_factory=dict)
    compile_config: dict[str, Any] = field(default_factory=dict)
    #: per model variable index, the epoch-record array that may hold it (kernels, biases)
    sources: dict[int, SharedSource] = field(default_factory=dict)


def shared_sources(model: keras.Model) -> dict[int, SharedSource]:
    """Which of ``model.variables`` the epoch record holds: each recorded layer's kernel and bias.

    Conv2D (any groups), a separable conv's pointwise and depthwise kernels, DepthwiseConv2D and
    Dense kernels, and every recorded bias. Whether the record really holds one bit for bit is
    checked when the checkpoint is written (`encode`); a variable it does not hold is stored.

    Example:
        >>> sorted(s.key for s in shared_sources(model).values())
        ['bias', 'bias', 'kernel', 'kernel']
    """
    from ..models.graph import recorded_layers

    where: dict[int, SharedSource] = {}
    for r in recorded_layers(model):
        kt = {"depthwise": "depthwise", "dense": "transpose"}.get(r.ctype, "filters_last")
        where[id(r.kernel_var)] = SharedSource(r.name, "kernel", kt)
        if r.bias_var is not None:
            where[id(r.bias_var)] = SharedSource(r.name, "bias", "identity")
        if r.ctype == "separable":
            where[id(r.layer.depthwise_kernel)] = SharedSource(r.name, "depthwise_kernel", "identity")
    return {i: where[id(v)] for i, v in enumerate(model.variables) if id(v) in where}


def capture(model: keras.Model, optimizer: keras.optimizers.Optimizer, state: dict[str, Any]) -> Checkpoint:
    """Copy the current model and optimizer state into a `Checkpoint` (cheap: small numpy copies)."""
    return Checkpoint(
        model_config=keras.saving.serialize_keras_object(model),
        model_vars=[np.array(v.numpy()) for v in model.variables],
        model_paths=[v.path for v in model.variables],
        optimizer_config=keras.optimizers.serialize(optimizer),
        optimizer_vars=[np.array(v.numpy()) for v in optimizer.variables],
        state=json.loads(json.dumps(state, default=_jsonable)),
        compile_config=compile_config_of(model),
        sources=shared_sources(model),
    )


def compile_config_of(model: keras.Model) -> dict[str, Any]:
    """The model's serialized compile arguments without the optimizer ({} when not compiled)."""
    try:
        cc = model.get_compile_config() if getattr(model, "compiled", False) else {}
        cc = {k: v for k, v in (cc or {}).items() if k != "optimizer"}
        return json.loads(json.dumps(cc, default=_jsonable))
    except Exception:  # an unserialisable custom loss: the restored model falls back to the default
        import logging

        logging.getLogger("revacnn").warning("the model's compile config cannot be saved", exc_info=True)
        return {}


def compile_model(model: keras.Model, optimizer: keras.optimizers.Optimizer, compile_config: dict[str, Any]) -> None:
    """Compile ``model`` with ``optimizer`` and a saved compile config (default: sparse cross-entropy)."""
    cfg = keras.saving.deserialize_keras_object(dict(compile_config)) if compile_config else {}
    if cfg.get("loss") is None:
        cfg["loss"] = keras.losses.SparseCategoricalCrossentropy()
    model.compile(optimizer=optimizer, **cfg)


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _meta(ckpt: Checkpoint) -> dict[str, Any]:
    return {
        "model_config": ckpt.model_config,
        "model_paths": ckpt.model_paths,
        "optimizer_config": ckpt.optimizer_config,
        "n_model": len(ckpt.model_vars),
        "n_optimizer": len(ckpt.optimizer_vars),
        "state": ckpt.state,
        "compile_config": ckpt.compile_config,
    }


def to_arrays(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    """The `Checkpoint` as named arrays for ``np.savez`` (the old, uncompressed format)."""
    out: dict[str, np.ndarray] = {"__meta__": np.array(json.dumps(_meta(ckpt), default=_jsonable))}
    for i, v in enumerate(ckpt.model_vars):
        out[f"model_{i:04d}"] = v
    for i, v in enumerate(ckpt.optimizer_vars):
        out[f"opt_{i:04d}"] = v
    return out


def to_bytes(ckpt: Checkpoint, record: Any = None) -> bytes:
    """The `Checkpoint` as a compact file (zstd, byte shuffle); kernels ``record`` holds exactly are shared.

    Args:
        ckpt: the checkpoint.
        record: ``record(layer, key)``: the array the epoch record holds (record layout), or None.

    Example:
        >>> data = to_bytes(capture(model, model.optimizer, {}), record=lambda layer, key: None)
    """
    meta = json.loads(json.dumps(_meta(ckpt), default=_jsonable))
    data, _ = encode(meta, ckpt.model_vars, ckpt.optimizer_vars, sources=ckpt.sources, record=record)
    return data


def from_data(d: CheckpointData) -> Checkpoint:
    """A `Checkpoint` from a decoded file."""
    meta = d.meta
    return Checkpoint(
        model_config=meta["model_config"],
        model_vars=d.model,
        model_paths=meta["model_paths"],
        optimizer_config=meta["optimizer_config"],
        optimizer_vars=d.opt,
        state=meta["state"],
        compile_config=meta.get("compile_config", {}),
    )


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint file (compact ``.ckpt`` without shared kernels, or an old ``.npz``).

    A compact checkpoint that shares kernels with its epoch record needs the run: use
    `load_run_checkpoint`.

    Raises:
        StoreError: the file is missing or corrupt.
    """
    try:
        return from_data(read_checkpoint_file(Path(path)))
    except (KeyError, TypeError) as exc:
        raise CorruptStoreError(f"Checkpoint {path} is corrupt ({type(exc).__name__}: {exc})") from None


def load_run_checkpoint(run: Any, epoch: int) -> Checkpoint:
    """The checkpoint of ``run``'s ``epoch``, its shared kernels read from the epoch record.

    Raises:
        EpochNotFoundError: no such committed epoch. StoreError: the epoch has no checkpoint.

    Example:
        >>> ckpt = load_run_checkpoint(store.run(run_id), 3)
    """
    try:
        return from_data(run.read_checkpoint(epoch))
    except (KeyError, TypeError) as exc:
        if type(exc).__module__.startswith("revacnn"):
            raise
        raise CorruptStoreError(
            f"Checkpoint of run {run.run_id} epoch {epoch} is corrupt ({type(exc).__name__}: {exc})"
        ) from None


def model_from_checkpoint(ckpt: Checkpoint, *, compiled: bool = True) -> keras.Model:
    """Rebuild the model of a checkpoint and load its variables (checked by count and shape).

    With ``compiled``, the model is compiled as it trained: its optimizer (state included) and the
    saved loss and metrics.
    """
    model = keras.saving.deserialize_keras_object(ckpt.model_config)
    assign_model(model, ckpt)
    if compiled:
        compile_model(model, optimizer_from_checkpoint(ckpt, model), ckpt.compile_config)
    return model


def assign_model(model: keras.Model, ckpt: Checkpoint) -> None:
    """Load the checkpoint's variable values into ``model``."""
    variables = model.variables
    if len(variables) != len(ckpt.model_vars):
        raise StoreError(
            f"Checkpoint holds {len(ckpt.model_vars)} model variables, the model has {len(variables)}"
        )
    for v, value in zip(variables, ckpt.model_vars, strict=True):
        if tuple(v.shape) != tuple(value.shape):
            raise StoreError(f"Checkpoint shape {value.shape} does not match variable {v.path} {v.shape}")
        v.assign(value)


def optimizer_from_checkpoint(ckpt: Checkpoint, model: keras.Model) -> keras.optimizers.Optimizer:
    """Rebuild the optimizer over all of ``model``'s trainable variables and load its state."""
    opt = keras.optimizers.deserialize(ckpt.optimizer_config)
    opt.build(model.trainable_variables)
    variables = opt.variables
    if len(variables) != len(ckpt.optimizer_vars):
        # Keras would only warn and load by position; a mismatch means corrupt state.
        raise StoreError(
            f"Checkpoint holds {len(ckpt.optimizer_vars)} optimizer variables, "
            f"the rebuilt optimizer has {len(variables)}"
        )
    for v, value in zip(variables, ckpt.optimizer_vars, strict=True):
        if tuple(v.shape) != tuple(value.shape):
            raise StoreError(f"Checkpoint optimizer shape {value.shape} does not match {v.path} {v.shape}")
        v.assign(value)
    return opt
