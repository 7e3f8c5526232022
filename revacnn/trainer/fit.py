"""Entry points that set up a recorded training: `fit` for a user's model, `train` from a config, `resume`, `fork`."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ..config import TrainConfig, check_checkpoint_every
from ..errors import ConfigError, EpochNotFoundError, RevacnnError, RunBusyError
from ..models import build_model, validate_model
from ..storage import Run, RunWriter, Store, create_session, open_store
from .checkpoint import load_run_checkpoint
from .sources import ArraySource, class_indices
from .trainer import TrainData, Trainer, TrainerState

log = logging.getLogger("revacnn")

_DETERMINISM_ON = False


def _setup_determinism(config: TrainConfig) -> None:
    global _DETERMINISM_ON
    if config.deterministic and not _DETERMINISM_ON:
        tf.config.experimental.enable_op_determinism()
        _DETERMINISM_ON = True


def runtime_settings() -> dict[str, Any]:
    """The settings bit-exact replay depends on: TF thread pools and the oneDNN switch.

    Example:
        >>> sorted(runtime_settings())
        ['cpu_count', 'inter_op_threads', 'intra_op_threads', 'onednn', 'tensorflow']
    """
    return {
        "intra_op_threads": int(tf.config.threading.get_intra_op_parallelism_threads()),
        "inter_op_threads": int(tf.config.threading.get_inter_op_parallelism_threads()),
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
        "cpu_count": int(os.cpu_count() or 0),
        "tensorflow": tf.__version__,
    }


def check_runtime(config: TrainConfig, what: str, strategy: Any = None) -> str | None:
    """Compare the run's recorded runtime settings with this process's; warn when they differ.

    The replica count (``strategy``) is compared too: a run continued on another number of
    replicas sums its gradients in another order (float tolerance, not bit-exact).

    Returns:
        The warning printed (and logged), or None when the settings match.
    """
    then = dict(config.runtime or {})
    now = runtime_settings()
    if not then:
        return None
    now["replicas"] = _replicas(strategy)
    then["replicas"] = int((config.extra or {}).get("strategy", {}).get("replicas", 1))
    diff = {k: (then.get(k), now[k]) for k in now if then.get(k) != now[k]}
    if not diff:
        return None
    msg = (
        f"revacnn: this {what} runs under different settings than the run it continues "
        + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
        + "; bit-exact replay is not promised"
    )
    log.warning(msg)
    print(msg, file=sys.stderr)
    return msg


def _replicas(strategy: Any) -> int:
    return 1 if strategy is None else int(strategy.num_replicas_in_sync)


def _distributed(strategy: Any) -> tuple[Any, Any]:
    """``(description, CommandSync or None)`` of a strategy; the sync exists across several workers."""
    from .distribute import CommandSync, describe

    d = describe(strategy)
    return d, (CommandSync(strategy) if d["workers"] > 1 else None)


def _open_writer(store: Store, strategy: Any, sync: Any, make: Any) -> RunWriter:
    """The chief runs ``make()`` (it creates the session and the run); the others get its run id."""
    from .distribute import WorkerWriter, broadcast_run_id, describe

    if sync is None:
        return make()
    task = describe(strategy)["task"]
    if task == 0:
        writer = make()
        broadcast_run_id(sync, writer.run_id)
        return writer
    return WorkerWriter(store, broadcast_run_id(sync, None), task)


def _single_worker(strategy: Any, what: str) -> None:
    from .distribute import describe

    if describe(strategy)["workers"] > 1:
        raise ConfigError(f"Received: a {what} under a strategy with several workers (expected one host: "
                          f"{what} it on one device or under MirroredStrategy)")


def _make_optimizer(name: str, lr: float, momentum: float) -> keras.optimizers.Optimizer:
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=momentum)
    raise ConfigError(f"Received: optimizer={name!r} (expected adam or sgd)")


def _select_probes(y_val: np.ndarray, n: int, seed: int) -> np.ndarray:
    from ..data import select_probes

    return select_probes(y_val, min(n, len(y_val)), seed=seed)


#: how many validation examples a dataset is read for, to choose probes from
PROBE_POOL = 2000


def _probes(data: TrainData, probes: Any, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels as given, indices into the pool) of the session's probes."""
    if isinstance(probes, (tuple, list)) and len(probes) == 2:
        px, py = np.asarray(probes[0]), np.asarray(probes[1])
        if len(px) != len(py) or len(px) == 0:
            raise ConfigError(f"Received: probes with {len(px)} images and {len(py)} labels "
                              "(expected the same number, at least one)")
        return px, py, np.arange(len(px))
    if isinstance(probes, bool) or not isinstance(probes, (int, np.integer)) or probes < 1:
        raise ConfigError(f"Received: probes={probes!r} (expected an integer >= 1 or an (x, y) pair)")
    src = data.val if data.val is not None else data.train
    if not isinstance(src, ArraySource) and data.val is None:
        raise ConfigError(
            f"Received: {src.kind} training data without validation_data (probes come from validation "
            "data: pass validation_data, or probes=(x, y))"
        )
    x, y = src.sample(PROBE_POOL) if not isinstance(src, ArraySource) else (src.x, src.y)
    pidx = _select_probes(class_indices(y), int(probes), seed)
    return x[pidx], y[pidx], pidx


def _one_hot(data: TrainData) -> bool:
    src = data.train
    if isinstance(src, ArraySource):
        return src.y.ndim == 2 and src.y.shape[1] > 1
    spec = getattr(getattr(src, "ds", None), "element_spec", None)
    if isinstance(spec, tuple) and len(spec) > 1 and hasattr(spec[1], "shape"):
        shape = spec[1].shape
        return shape.rank == 2 and (shape[-1] or 0) > 1
    return False


def _default_loss(data: TrainData) -> keras.losses.Loss:
    """Cross-entropy for an uncompiled model: sparse for integer labels, categorical for one-hot."""
    if _one_hot(data):
        return keras.losses.CategoricalCrossentropy()
    return keras.losses.SparseCategoricalCrossentropy()


def fit(
    model: keras.Model,
    data: Any,
    validation_data: Any = None,
    *,
    epochs: int = 5,
    batch_size: int = 64,
    store: Store | str | None = None,
    probes: int | tuple[Any, Any] = 16,
    name: str | None = None,
    seed: int = 0,
    lr: float = 1e-3,
    class_names: Sequence[str] | None = None,
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    progress: bool = True,
    embeddings: bool = True,
    deterministic: bool = True,
    auto_freeze: bool = False,
    checkpoint_every: int = 1,
    strategy: Any = None,
) -> Run:
    """Train a Keras model as compiled and record every epoch (epoch 0 = initialisation) into a store.

    Args:
        model: a built Keras 3 Sequential or functional model (nested models included). A compiled
            model trains with its own optimizer (schedules included), loss and metrics; an
            uncompiled one with Adam(``lr``) and sparse categorical cross-entropy (categorical for
            one-hot labels).
        data: ``(x, y)`` arrays of any numeric dtype, fed exactly as given (labels integers or
            one-hot), or a ``tf.data.Dataset`` / ``keras.utils.PyDataset`` of ``(x, y)`` batches.
        validation_data: the same kinds; probes come from it (from ``data`` arrays when absent).
        epochs: epochs to train after epoch 0.
        batch_size: examples per step (arrays only: datasets are batched already).
        store: a `Store` or a path (default ``$REVACNN_STORE`` or ``./store``).
        probes: how many probe images to record every epoch, or an ``(x, y)`` pair of them.
        name: the run's name.
        seed: seeds the data order of arrays and the probe choice (seed the model's own
            randomness, e.g. Dropout, with ``keras.utils.set_random_seed`` before building it).
        lr: learning rate of the default optimizer.
        class_names: names of the classes, for the app.
        callbacks: Keras callbacks, called as ``model.fit`` calls them (EarlyStopping,
            ReduceLROnPlateau, ModelCheckpoint, CSVLogger, TensorBoard …).
        progress: show a progress bar.
        embeddings: compute t-SNE embeddings of the filters.
        deterministic: enable TF op determinism (exact replays of forks and resumes).
        auto_freeze: freeze converged conv layers bottom-up, as recorded events (docs/diagnoses.md).
        checkpoint_every: keep an exact checkpoint every K epochs (and at epoch 0, the last epoch
            and fork points); a fork or resume from any other epoch replays from the nearest
            earlier checkpoint, bit-exactly.
        strategy: a ``tf.distribute.MirroredStrategy`` or ``MultiWorkerMirroredStrategy``; build and
            compile ``model`` inside its ``scope()``. Each global batch (``batch_size`` examples) is
            split across the replicas; the recorded gradient sums are of the global-batch loss. With
            several workers, every worker calls `fit` alike and only the chief writes the store.

    Returns:
        The recorded `Run`.

    Example:
        >>> run = revacnn.fit(model, (x, y), validation_data=(xv, yv), epochs=3, store="store")
        >>> run.epoch(3).layer("conv1").kernel.shape
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"Received: epochs={epochs!r} (expected an integer >= 0)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"Received: batch_size={batch_size!r} (expected an integer >= 1)")
    check_checkpoint_every(checkpoint_every)
    validate_model(model)
    st = store if isinstance(store, Store) else open_store(store)
    tdata = TrainData.of(data, validation_data)
    compiled = bool(getattr(model, "compiled", False)) and getattr(model, "optimizer", None) is not None
    from .distribute import check_distributed, scope

    with scope(strategy):
        optimizer = model.optimizer if compiled else keras.optimizers.Adam(learning_rate=lr)
    dist, sync = _distributed(strategy)
    if strategy is not None:
        check_distributed(model, optimizer, strategy)
        if auto_freeze and sync is not None:
            raise ConfigError("Received: auto_freeze=True with several workers (expected one host)")
    n_train = len(tdata.train) if isinstance(tdata.train, ArraySource) else None
    n_val = len(tdata.val) if isinstance(tdata.val, ArraySource) else None
    cfg = TrainConfig(
        dataset="custom", model="custom", epochs=epochs, batch_size=batch_size,
        lr=float(np.asarray(optimizer.learning_rate)), optimizer=type(optimizer).__name__.lower(),
        train_size=n_train, val_size=n_val, probes=probes if isinstance(probes, int) else len(probes[1]),
        seed=seed, name=name, embeddings=embeddings, deterministic=deterministic,
        auto_freeze=bool(auto_freeze), runtime=runtime_settings(), checkpoint_every=checkpoint_every,
        extra={"data": tdata.train.kind, "validation_data": tdata.val.kind if tdata.val else None,
               "strategy": {k: v for k, v in dist.items() if k != "task"}},
    )
    _setup_determinism(cfg)
    px, py, pidx = _probes(tdata, probes, seed)
    n_classes = int(model.output_shape[-1])
    names = list(class_names) if class_names else [str(i) for i in range(max(n_classes, 2))]

    def make() -> RunWriter:
        sid = create_session(
            st, dataset="custom", model=model.name, probe_images=px, probe_labels=class_indices(py),
            probe_indices=pidx, class_names=names, config=cfg.to_dict(),
        )
        return RunWriter.create(st, session_id=sid, config=cfg.to_dict(), name=name)

    with scope(strategy):
        if not compiled:
            model.compile(optimizer=optimizer, loss=_default_loss(tdata))
        optimizer.build(model.trainable_variables)
    writer = _open_writer(st, strategy, sync, make)
    trainer = Trainer(
        model=model, optimizer=optimizer, data=tdata, probe_images=px, probe_labels=class_indices(py),
        writer=writer, config=cfg, progress=progress, callbacks=callbacks, strategy=strategy, sync=sync,
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


def train(config: TrainConfig, store: Store, *, progress: bool = True, on_start: Any = None,
          strategy: Any = None) -> Run:
    """Start a new session and its root run from a config (what ``revacnn train`` does).

    ``on_start(run_id)`` is called once the run exists, before training (the CLI prints the id).
    Under a ``strategy`` (`revacnn.trainer.distribute.make_strategy`) the model and optimizer are
    built in its scope; with several workers every worker calls `train` alike and the chief records.
    """
    config.validate()
    if config.dataset == "custom":
        raise ConfigError("dataset='custom' runs are made with revacnn.fit(model, data)")
    _setup_determinism(config)
    ds = load_data(config)
    keras.utils.set_random_seed(config.seed)
    from .distribute import scope

    dist, sync = _distributed(strategy)
    if config.auto_freeze and sync is not None:
        raise ConfigError("Received: --auto-freeze with several workers (expected one host)")
    with scope(strategy):
        model = build_model(config.model, ds.input_shape, ds.num_classes)
        validate_model(model)
        if getattr(model, "compiled", False) and getattr(model, "optimizer", None) is not None:
            optimizer = model.optimizer  # a user's factory may compile its model
        else:
            optimizer = _make_optimizer(config.optimizer, config.lr, config.momentum)
            model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy())
        optimizer.build(model.trainable_variables)
    config.runtime = runtime_settings()
    config.extra = {**config.extra, "strategy": {k: v for k, v in dist.items() if k != "task"}}
    pidx = _select_probes(ds.y_val, config.probes, config.seed)

    def make() -> RunWriter:
        sid = create_session(
            store, dataset=config.dataset, model=config.model, probe_images=ds.x_val[pidx],
            probe_labels=ds.y_val[pidx], probe_indices=pidx, class_names=ds.class_names,
            config=config.to_dict(),
        )
        return RunWriter.create(store, session_id=sid, config=config.to_dict(), name=config.name)

    writer = _open_writer(store, strategy, sync, make)
    if on_start is not None:
        on_start(writer.run_id)
    trainer = Trainer(
        model=model, optimizer=optimizer, data=TrainData.arrays(ds.x_train, ds.y_train, ds.x_val, ds.y_val),
        probe_images=ds.x_val[pidx], probe_labels=ds.y_val[pidx], writer=writer, config=config,
        progress=progress, strategy=strategy, sync=sync,
    )
    trainer.run(start_epoch=0, epochs=config.epochs)
    return store.run(writer.run_id)


def _restore(run: Run, epoch: int, strategy: Any = None) -> tuple[keras.Model, keras.optimizers.Optimizer,
                                                                  dict[str, Any]]:
    """The model of ``run``'s checkpointed epoch, compiled as it trained (optimizer state, loss, metrics).

    Under a ``strategy`` the model and optimizer are made in its scope (replicated variables):
    a checkpoint holds plain arrays, whatever set-up recorded it.
    """
    from .distribute import scope
    from .replay import build

    with scope(strategy):
        return build(load_run_checkpoint(run, epoch))


def _data_for(run: Run, config: TrainConfig, data: Any) -> TrainData:
    if data is not None:
        if isinstance(data, TrainData):
            return data
        train, val = data
        return TrainData.of(train, val)
    if config.dataset == "custom":
        raise ConfigError(
            f"Run {run.run_id} was trained on custom data with revacnn.fit; pass the same data: "
            "resume(store, run_id, data=((x, y), (x_val, y_val))) or data=(train_ds, val_ds)"
        )
    ds = load_data(config)
    return TrainData.arrays(ds.x_train, ds.y_train, ds.x_val, ds.y_val)


def _skip_to(data: TrainData, epoch: int) -> None:
    """Advance a dataset's iteration count so that the next epoch is its ``epoch + 1``-th (exact replay)."""
    skip = getattr(data.train, "skip_to", None)
    if skip is not None:
        skip(epoch + 1)


def resume(store: Store, run_id: str, *, progress: bool = True, data: Any = None,
           callbacks: Sequence[keras.callbacks.Callback] | None = None, strategy: Any = None) -> Run:
    """Continue an interrupted run from its last committed epoch (what ``revacnn resume`` does).

    The model continues as it was compiled (optimizer state and schedule, loss, metrics). A run
    trained with `fit` on custom data needs the same data again: ``data=(train, validation)``.
    A run recorded under a strategy resumes on one device (default) or under ``strategy`` (one
    host), and the other way round; see docs/architecture.md for how exact that is.
    """
    if strategy is not None:
        _single_worker(strategy, "resume")
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
    config = TrainConfig.from_dict(run.config)
    last = _resume_point(store, run, own)
    _setup_determinism(config)
    check_runtime(config, "resume", strategy)
    model, optimizer, state = _restore(run, last, strategy)
    tstate = TrainerState.from_dict(state["trainer"])
    writer.discard_after(last)
    from ..steering.channel import requeue_discarded

    requeue_discarded(store, run_id, last)  # commands of the discarded epochs apply again, at their batch
    writer.set_status("running", f"resumed from epoch {last}")
    images, labels = store.probes(run.session_id)
    tdata = _data_for(run, config, data)
    _skip_to(tdata, last)
    trainer = Trainer(
        model=model, optimizer=optimizer, data=tdata, probe_images=images, probe_labels=labels, writer=writer,
        config=config, state=tstate, tracker_state=state.get("tracker"), doctor_state=state.get("doctor"),
        progress=progress, callbacks=callbacks, strategy=strategy,
    )
    trainer.recorder._prev = _prev_from_model(trainer)
    trainer.run(start_epoch=last, epochs=config.epochs, record_start=False)
    return store.run(run_id)


def _resume_point(store: Store, run: Run, own: list[int]) -> int:
    """The epoch a resume continues from: the last committed one with a checkpoint (retention K > 1).

    Later committed epochs are discarded and recorded again, identically (a deterministic replay).
    """
    have = set(store.checkpoint_epochs_of(run.run_id))
    at = [e for e in own if e in have]
    if not at:
        raise EpochNotFoundError(f"Run {run.run_id} has no checkpoint among its committed epochs {own}")
    last = at[-1]
    if last != own[-1]:
        msg = (f"revacnn: run {run.run_id} resumes from its checkpoint at epoch {last} (epochs {last + 1}.."
               f"{own[-1]} have none): they are trained and recorded again, identically")
        log.info(msg)
        print(msg, file=sys.stderr)
    return last


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
    prev: dict[str, dict[int, np.ndarray]] = {}
    for r in trainer.recs:
        k = r.kernel()
        F = k.shape[-1]
        flat = np.moveaxis(k, -1, 0).reshape(F, -1) if k.ndim == 4 else k.T
        b = r.bias()
        if b is not None:
            flat = np.concatenate([flat, b[:, None]], axis=1)
        prev[r.name] = {u: flat[i].astype(np.float64) for i, u in enumerate(trainer.state.uids[r.name])}
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
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    batch_size: int | None = None,
    auto_freeze: bool | None = None,
    checkpoint_every: int | None = None,
    strategy: Any = None,
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
        data: for runs on custom data (`fit`, `RevacnnCallback`): ``(train, validation)``, each
            ``(x, y)`` arrays, a tf.data.Dataset or a PyDataset.
        callbacks: Keras callbacks for the fork's training.
        batch_size: a new batch size for array data (default: the parent's).
        auto_freeze: freeze converged layers bottom-up from the fork point on (default: as the parent).
        checkpoint_every: the fork's checkpoint retention K (default: the parent's). A fork from
            an epoch without a checkpoint replays the parent from its nearest earlier checkpoint
            (bit-exact with the parent's record, said on stderr and in the fork's config
            ``extra["replayed"]``), and that epoch becomes checkpointed.
        strategy: train the fork under a ``MirroredStrategy`` (one host), whatever set-up the
            parent was recorded under (default: one device).

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
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"Received: batch_size={batch_size!r} (expected an integer >= 1)")
        config.batch_size = batch_size
    config.name = name
    if auto_freeze is not None:
        config.auto_freeze = bool(auto_freeze)
    if checkpoint_every is not None:
        config.checkpoint_every = check_checkpoint_every(checkpoint_every)
    config.extra = {**{k: v for k, v in config.extra.items() if k in ("data", "validation_data", "strategy")},
                    "fork_changes": [c.to_json() for c in changes]}
    if strategy is not None:
        _single_worker(strategy, "fork")
    _setup_determinism(config)
    check_runtime(config, "fork", strategy)
    config.runtime = runtime_settings()
    from .distribute import describe, scope
    from .replay import build, restore_checkpoint, say

    config.extra["strategy"] = {k: v for k, v in describe(strategy).items() if k != "task"}
    data_ = _data_for(parent, config, data)
    ckpt, how = restore_checkpoint(store, parent, epoch, data_, progress=progress)
    say(how, rec.run_id)
    if how.replayed:
        config.extra["replayed"] = how.to_dict()
    with scope(strategy):
        model, optimizer, state = build(ckpt)
    tstate = TrainerState.from_dict(state["trainer"])
    _skip_to(data_, epoch)
    writer = RunWriter.create(
        store, session_id=parent.session_id, config=config.to_dict(), name=name,
        parent_run_id=run_id, fork_epoch=epoch,
    )
    if on_start is not None:
        on_start(writer.run_id)
    images, labels = store.probes(parent.session_id)
    try:
        trainer = Trainer(
            model=model, optimizer=optimizer, data=data_, probe_images=images, probe_labels=labels,
            writer=writer, config=config, state=tstate, tracker_state=state.get("tracker"),
            doctor_state=state.get("doctor"), progress=progress, callbacks=callbacks, strategy=strategy,
        )
        trainer.recorder._prev = _prev_from_model(trainer)
        from .steer import apply, set_learning_rate

        if lr is not None:
            set_learning_rate(trainer.optimizer, float(lr))
        for cmd in changes:
            if cmd.op in ("pause", "resume", "stop"):
                raise ConfigError(f"Received: change {cmd.op!r} (a fork takes structural changes and lr only)")
            touched: list[str] = []
            msg = apply(trainer, cmd, touched=touched)
            writer.write_event(event_id=cmd.command_id, epoch=epoch, batch=0, kind=cmd.op,
                               args={**cmd.args, "touched": touched} if touched else cmd.args,
                               status="applied", message=f"fork change: {msg}")
    except RevacnnError:
        # bad changes: nothing was trained, so leave no empty run behind
        trainer.recorder.close() if "trainer" in locals() else None
        writer.abandon()  # its folder, and its objects on a store at a URL
        raise
    # the fork point's training metrics are those of the epoch the parent trained
    m = rec.metrics
    trainer.run(start_epoch=epoch, epochs=config.epochs, record_start=True,
                start_train_metrics=(m.get("loss"), m.get("accuracy")))
    return store.run(writer.run_id)
