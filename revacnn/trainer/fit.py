"""Entry points that set up a recorded training: `fit` for a user's model, `train` from a config, `resume`, `fork`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ..config import TrainConfig
from ..errors import ConfigError, EpochNotFoundError, RevacnnError, RunBusyError
from ..models import build_model, validate_model
from ..storage import Run, RunWriter, Store, create_session, open_store
from .checkpoint import (
    assign_model,
    load_checkpoint,
    model_from_checkpoint,
    optimizer_from_checkpoint,
)
from .trainer import TrainData, Trainer, TrainerState

log = logging.getLogger("revacnn")

_DETERMINISM_ON = False


def _setup_determinism(config: TrainConfig) -> None:
    global _DETERMINISM_ON
    if config.deterministic and not _DETERMINISM_ON:
        tf.config.experimental.enable_op_determinism()
        _DETERMINISM_ON = True


def _make_optimizer(name: str, lr: float, momentum: float) -> keras.optimizers.Optimizer:
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=momentum)
    raise ConfigError(f"Received: optimizer={name!r} (expected adam or sgd)")


def _loss_fn(model: keras.Model) -> Any:
    loss = getattr(model, "loss", None) if getattr(model, "compiled", False) else None
    if loss is None:
        return keras.losses.SparseCategoricalCrossentropy()
    fn = keras.losses.get(loss) if isinstance(loss, (str, dict)) else loss
    if not isinstance(fn, keras.losses.Loss):  # a per-example function: reduce to the batch mean
        from keras.src.losses.losses import LossFunctionWrapper

        fn = LossFunctionWrapper(fn)
    return fn


def _as_labels(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        y = y.argmax(axis=1)
    return y.reshape(-1).astype(np.int64)


def _as_images(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ConfigError(f"Received: {what} with shape {x.shape} (expected (N, H, W, C) images)")
    if x.dtype != np.uint8:
        if x.size and float(np.nanmax(x)) <= 1.0 + 1e-6:
            x = np.clip(np.round(x * 255.0), 0, 255)
        x = np.clip(x, 0, 255).astype(np.uint8)
    return x


def _select_probes(y_val: np.ndarray, n: int, seed: int) -> np.ndarray:
    from ..data import select_probes

    return select_probes(y_val, min(n, len(y_val)), seed=seed)


def fit(
    model: keras.Model,
    data: tuple[np.ndarray, np.ndarray],
    validation_data: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    epochs: int = 5,
    batch_size: int = 64,
    store: Store | str | None = None,
    probes: int = 16,
    name: str | None = None,
    seed: int = 0,
    lr: float = 1e-3,
    class_names: Sequence[str] | None = None,
    progress: bool = True,
    embeddings: bool = True,
    deterministic: bool = True,
    auto_freeze: bool = False,
) -> Run:
    """Train a Keras model and record every epoch (epoch 0 = initialisation) into a store.

    Args:
        model: a built Keras model made of Conv2D, Dense, pooling, BatchNormalization, Dropout,
            Activation and Flatten layers. A compiled model trains with its own optimizer and loss,
            an uncompiled one with Adam(``lr``) and sparse categorical cross-entropy.
        data: ``(x, y)``: images ``(N, H, W, C)`` (uint8 0..255, or floats in 0..1) and integer labels.
        validation_data: ``(x_val, y_val)``; probes come from it (from ``data`` when absent).
        epochs: epochs to train after epoch 0.
        batch_size: examples per step.
        store: a `Store` or a path (default ``$REVACNN_STORE`` or ``./store``).
        probes: how many probe images to record every epoch.
        name: the run's name.
        seed: seeds the data order, dropout and probe choice.
        lr: learning rate of the default optimizer.
        class_names: names of the classes, for the app.
        progress: show a progress bar.
        embeddings: compute t-SNE embeddings of the filters.
        deterministic: enable TF op determinism (exact replays of forks and resumes).
        auto_freeze: freeze converged conv layers bottom-up, as recorded events (docs/diagnoses.md).

    Returns:
        The recorded `Run`.

    Example:
        >>> run = revacnn.fit(model, (x, y), validation_data=(xv, yv), epochs=3, store="store")
        >>> run.epoch(3).layer("conv1").kernel.shape
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"Received: epochs={epochs!r} (expected an integer >= 0)")
    validate_model(model)
    st = store if isinstance(store, Store) else open_store(store)
    x, y = _as_images(data[0], "x"), _as_labels(data[1])
    if validation_data is not None:
        xv, yv = _as_images(validation_data[0], "x_val"), _as_labels(validation_data[1])
    else:
        xv, yv = x[:0], y[:0]
    if len(x) != len(y):
        raise ConfigError(f"Received: {len(x)} images and {len(y)} labels (expected the same number)")
    compiled = bool(getattr(model, "compiled", False)) and getattr(model, "optimizer", None) is not None
    optimizer = model.optimizer if compiled else keras.optimizers.Adam(learning_rate=lr)
    cfg = TrainConfig(
        dataset="custom", model="custom", epochs=epochs, batch_size=batch_size,
        lr=float(np.asarray(optimizer.learning_rate)), optimizer=type(optimizer).__name__.lower(),
        train_size=len(x), val_size=len(xv), probes=probes, seed=seed, name=name,
        embeddings=embeddings, deterministic=deterministic, auto_freeze=bool(auto_freeze),
    )
    _setup_determinism(cfg)
    src_x, src_y = (xv, yv) if len(yv) else (x, y)
    pidx = _select_probes(src_y, probes, seed)
    n_classes = int(model.output_shape[-1])
    names = list(class_names) if class_names else [str(i) for i in range(n_classes)]
    sid = create_session(
        st, dataset="custom", model=model.name, probe_images=src_x[pidx], probe_labels=src_y[pidx],
        probe_indices=pidx, class_names=names, config=cfg.to_dict(),
    )
    optimizer.build(model.trainable_variables)
    writer = RunWriter.create(st, session_id=sid, config=cfg.to_dict(), name=name)
    trainer = Trainer(
        model=model, optimizer=optimizer, loss_fn=_loss_fn(model), data=TrainData(x, y, xv, yv),
        probe_images=src_x[pidx], probe_labels=src_y[pidx], writer=writer, config=cfg, progress=progress,
    )
    trainer.run(start_epoch=0, epochs=epochs)
    return st.run(writer.run_id)


def load_data(config: TrainConfig):
    """The dataset a config names (generated, local copy or keras.datasets)."""
    from ..data import load_dataset

    return load_dataset(
        config.dataset, data_dir=config.data_dir, train_size=config.train_size,
        val_size=config.val_size, seed=config.seed,
    )


def train(config: TrainConfig, store: Store, *, progress: bool = True, on_start: Any = None) -> Run:
    """Start a new session and its root run from a config (what ``revacnn train`` does).

    ``on_start(run_id)`` is called once the run exists, before training (the CLI prints the id).
    """
    config.validate()
    if config.dataset == "custom":
        raise ConfigError("dataset='custom' runs are made with revacnn.fit(model, data)")
    _setup_determinism(config)
    ds = load_data(config)
    keras.utils.set_random_seed(config.seed)
    model = build_model(config.model, ds.input_shape, ds.num_classes)
    optimizer = _make_optimizer(config.optimizer, config.lr, config.momentum)
    optimizer.build(model.trainable_variables)
    pidx = _select_probes(ds.y_val, config.probes, config.seed)
    sid = create_session(
        store, dataset=config.dataset, model=config.model, probe_images=ds.x_val[pidx],
        probe_labels=ds.y_val[pidx], probe_indices=pidx, class_names=ds.class_names,
        config=config.to_dict(),
    )
    writer = RunWriter.create(store, session_id=sid, config=config.to_dict(), name=config.name)
    if on_start is not None:
        on_start(writer.run_id)
    trainer = Trainer(
        model=model, optimizer=optimizer, loss_fn=keras.losses.SparseCategoricalCrossentropy(),
        data=TrainData(ds.x_train, ds.y_train, ds.x_val, ds.y_val), probe_images=ds.x_val[pidx],
        probe_labels=ds.y_val[pidx], writer=writer, config=config, progress=progress,
    )
    trainer.run(start_epoch=0, epochs=config.epochs)
    return store.run(writer.run_id)


def _restore(run: Run, epoch: int) -> tuple[keras.Model, keras.optimizers.Optimizer, dict[str, Any]]:
    ckpt = load_checkpoint(run.checkpoint_path(epoch))
    model = model_from_checkpoint(ckpt)
    optimizer = optimizer_from_checkpoint(ckpt, model)
    assign_model(model, ckpt)
    return model, optimizer, ckpt.state


def _data_for(run: Run, config: TrainConfig, data: Any) -> TrainData:
    if data is not None:
        (x, y), (xv, yv) = data
        return TrainData(_as_images(x, "x"), _as_labels(y), _as_images(xv, "x_val"), _as_labels(yv))
    if config.dataset == "custom":
        raise ConfigError(
            f"Run {run.run_id} was trained on custom data with revacnn.fit; pass the same data: "
            "resume(store, run_id, data=((x, y), (x_val, y_val)))"
        )
    ds = load_data(config)
    return TrainData(ds.x_train, ds.y_train, ds.x_val, ds.y_val)


def resume(store: Store, run_id: str, *, progress: bool = True, data: Any = None) -> Run:
    """Continue an interrupted run from its last committed epoch (what ``revacnn resume`` does)."""
    run = store.run(run_id)
    writer = RunWriter(store, run_id).acquire()  # one writer per run: RunBusyError while another lives
    status = run.status
    if status in ("running", "finished"):
        writer.release()
        if status == "running":
            raise RunBusyError(f"Run {run_id} is running: its trainer is alive; nothing to resume")
        raise ConfigError(f"Run {run_id} already finished all its epochs; fork it to train further")
    own = run.epochs()
    if not own:
        if run.parent_run_id is None and TrainConfig.from_dict(run.config).dataset != "custom":
            return _restart(store, run, writer, progress=progress)
        raise EpochNotFoundError(f"Run {run_id} has no committed epoch to resume from")
    last = own[-1]
    config = TrainConfig.from_dict(run.config)
    _setup_determinism(config)
    model, optimizer, state = _restore(run, last)
    tstate = TrainerState.from_dict(state["trainer"])
    writer.discard_after(last)
    from ..steering.channel import requeue_discarded

    requeue_discarded(store, run_id, last)  # commands of the discarded epochs apply again, at their batch
    writer.set_status("running", f"resumed from epoch {last}")
    images, labels = store.probes(run.session_id)
    trainer = Trainer(
        model=model, optimizer=optimizer, loss_fn=keras.losses.SparseCategoricalCrossentropy(),
        data=_data_for(run, config, data), probe_images=images, probe_labels=labels, writer=writer,
        config=config, state=tstate, tracker_state=state.get("tracker"),
            doctor_state=state.get("doctor"), progress=progress,
    )
    trainer.recorder._prev = _prev_from_model(trainer)
    trainer.run(start_epoch=last, epochs=config.epochs, record_start=False)
    return store.run(run_id)


def _restart(store: Store, run: Run, writer: RunWriter, *, progress: bool) -> Run:
    """Resume a root run killed before its epoch 0 was committed: train it again from its config.

    A built-in run is a function of its config and seed, so this gives the run it would have been.
    """
    config = TrainConfig.from_dict(run.config)
    _setup_determinism(config)
    ds = load_data(config)
    keras.utils.set_random_seed(config.seed)
    model = build_model(config.model, ds.input_shape, ds.num_classes)
    optimizer = _make_optimizer(config.optimizer, config.lr, config.momentum)
    optimizer.build(model.trainable_variables)
    writer.discard_after(-1)
    from ..steering.channel import requeue_discarded

    requeue_discarded(store, run.run_id, -1)
    writer.set_status("running", "restarted: no epoch was committed")
    images, labels = store.probes(run.session_id)
    trainer = Trainer(
        model=model, optimizer=optimizer, loss_fn=keras.losses.SparseCategoricalCrossentropy(),
        data=TrainData(ds.x_train, ds.y_train, ds.x_val, ds.y_val), probe_images=images,
        probe_labels=labels, writer=writer, config=config, progress=progress,
    )
    trainer.run(start_epoch=0, epochs=config.epochs)
    return store.run(run.run_id)


def _prev_from_model(trainer: Trainer) -> dict[str, dict[int, np.ndarray]]:
    from ..models import weighted_layers

    prev: dict[str, dict[int, np.ndarray]] = {}
    for layer in weighted_layers(trainer.model):
        k = layer.kernel.numpy()
        F = k.shape[-1]
        flat = np.moveaxis(k, -1, 0).reshape(F, -1) if k.ndim == 4 else k.T
        if layer.bias is not None:
            flat = np.concatenate([flat, layer.bias.numpy()[:, None]], axis=1)
        prev[layer.name] = {u: flat[i].astype(np.float64) for i, u in enumerate(trainer.state.uids[layer.name])}
    return prev


def fork(
    store: Store,
    run_id: str,
    epoch: int,
    *,
    changes: Sequence[Any] = (),
    epochs: int | None = None,
    lr: float | None = None,
    name: str | None = None,
    progress: bool = True,
    data: Any = None,
    on_start: Any = None,
    auto_freeze: bool | None = None,
) -> Run:
    """Branch a new run from ``run_id``'s recorded ``epoch`` with ``changes`` applied at that point.

    Args:
        store: the store.
        run_id: the parent run (it may still be running: only committed epochs are used).
        epoch: the fork point K; the fork records its own epoch K after the changes, then trains on.
        changes: steering `Command`s (freeze, freeze-filters, add-filters, delete-filters, reinit-filters).
        epochs: the total epochs of the fork's history (default: the parent's).
        lr: a new learning rate from the fork point on.
        name: the fork's name.
        auto_freeze: freeze converged layers bottom-up from the fork point on (default: as the parent).

    Returns:
        The new `Run`.

    Example:
        >>> from revacnn.steering import parse
        >>> child = run.fork(2, changes=[parse("freeze", ["conv1"])], epochs=6)
    """
    parent = store.run(run_id)
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise ConfigError(f"Received: epoch={epoch!r} (expected an integer >= 0)")
    rec = parent.epoch(epoch)  # raises EpochNotFoundError with the available span
    config = TrainConfig.from_dict(parent.config)
    if epochs is not None:
        if not isinstance(epochs, int) or epochs < epoch:
            raise ConfigError(f"Received: epochs={epochs!r} (expected an integer >= the fork epoch {epoch})")
        config.epochs = epochs
    if lr is not None:
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ConfigError(f"Received: lr={lr!r} (expected a number > 0)")
        config.lr = float(lr)
    config.name = name
    if auto_freeze is not None:
        config.auto_freeze = bool(auto_freeze)
    config.extra = {"fork_changes": [c.to_json() for c in changes]}
    _setup_determinism(config)
    source = store.run(rec.run_id)
    model, optimizer, state = _restore(source, epoch)
    tstate = TrainerState.from_dict(state["trainer"])
    data_ = _data_for(parent, config, data)
    writer = RunWriter.create(
        store, session_id=parent.session_id, config=config.to_dict(), name=name,
        parent_run_id=run_id, fork_epoch=epoch,
    )
    if on_start is not None:
        on_start(writer.run_id)
    images, labels = store.probes(parent.session_id)
    try:
        trainer = Trainer(
            model=model, optimizer=optimizer, loss_fn=keras.losses.SparseCategoricalCrossentropy(),
            data=data_, probe_images=images, probe_labels=labels, writer=writer, config=config,
            state=tstate, tracker_state=state.get("tracker"),
            doctor_state=state.get("doctor"), progress=progress,
        )
        trainer.recorder._prev = _prev_from_model(trainer)
        from .steer import apply

        if lr is not None:
            trainer.optimizer.learning_rate = float(lr)
        for cmd in changes:
            if cmd.op in ("pause", "resume", "stop"):
                raise ConfigError(f"Received: change {cmd.op!r} (a fork takes structural changes and lr only)")
            msg = apply(trainer, cmd)
            writer.write_event(event_id=cmd.command_id, epoch=epoch, batch=0, kind=cmd.op, args=cmd.args,
                               status="applied", message=f"fork change: {msg}")
    except RevacnnError:
        # bad changes: nothing was trained, so leave no empty run behind
        trainer.recorder.close() if "trainer" in locals() else None
        import shutil

        shutil.rmtree(store.layout.run_dir(writer.run_id), ignore_errors=True)
        raise
    # the fork point's training metrics are those of the epoch the parent trained
    m = rec.metrics
    trainer.run(start_epoch=epoch, epochs=config.epochs, record_start=True,
                start_train_metrics=(m.get("loss"), m.get("accuracy")))
    return store.run(writer.run_id)
