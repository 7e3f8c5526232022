"""Restoring a recorded epoch: from its checkpoint, or by a deterministic replay from the nearest earlier one.

With retention (``checkpoint_every`` K > 1) most epochs have no checkpoint. `restore` then loads
the nearest earlier checkpoint of the run that recorded the epoch, trains the epochs in between
again into a scratch store (the same data order, the same steering commands at the same batches,
the same auto-freezes), checks that the result equals the run's record of the epoch bit for bit
(every kernel and bias, the probe predictions and the metrics), and returns that state. A fork
from it then trains on exactly as a fork from a checkpointed epoch would. The replayed state is
saved as the epoch's checkpoint (a fork point stays checkpointed), so the next fork from there
does not replay again.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from ..errors import RevacnnError, StoreError
from ..storage import Run, RunWriter, Store, create_session, open_store
from .checkpoint import (
    Checkpoint,
    assign_model,
    compile_model,
    load_run_checkpoint,
    model_from_checkpoint,
    optimizer_from_checkpoint,
    to_bytes,
)

log = logging.getLogger("revacnn")

#: metrics a replay must reproduce exactly (duration and wall-clock times differ by nature)
EXACT_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "n_batches", "step")


class ReplayMismatchError(RevacnnError, RuntimeError):
    """A replay from a checkpoint did not reproduce the run's record bit for bit."""


@dataclass
class Replayed:
    """How a restored state was obtained.

    Attributes:
        epoch: the restored epoch.
        from_epoch: the checkpoint it was replayed from (== epoch: read directly).
        commands: steering commands applied again during the replay.
        saved: the replayed state was saved as the epoch's checkpoint.
    """

    epoch: int
    from_epoch: int
    commands: int = 0
    saved: bool = False

    @property
    def replayed(self) -> bool:
        return self.from_epoch != self.epoch

    def message(self, run_id: str) -> str:
        """One line saying what was replayed."""
        if not self.replayed:
            return f"restored run {run_id} epoch {self.epoch} from its checkpoint"
        span = f"epoch {self.epoch}" if self.epoch == self.from_epoch + 1 else f"epochs {self.from_epoch + 1}..{self.epoch}"
        return (f"revacnn: epoch {self.epoch} of run {run_id} has no checkpoint: replayed {span} from its "
                f"checkpoint at epoch {self.from_epoch} ({self.commands} steering command(s) applied again), "
                f"bit-exact with the record" + ("; saved as the checkpoint of the fork point" if self.saved else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "from_checkpoint": self.from_epoch, "commands": self.commands,
                "saved": self.saved}


def build(ckpt: Checkpoint) -> tuple[keras.Model, keras.optimizers.Optimizer, dict[str, Any]]:
    """The model of a checkpoint, compiled as it trained (optimizer state, loss, metrics), and its state."""
    model = model_from_checkpoint(ckpt, compiled=False)
    optimizer = optimizer_from_checkpoint(ckpt, model)
    assign_model(model, ckpt)
    compile_model(model, optimizer, ckpt.compile_config)
    return model, optimizer, ckpt.state


def restore_checkpoint(store: Store, run: Run, epoch: int, data: Any = None, *, save: bool = True,
                       progress: bool = False) -> tuple[Checkpoint, Replayed]:
    """The exact `Checkpoint` of ``run``'s ``epoch``: read, or replayed from the nearest earlier one.

    Args:
        store: the store.
        run: the run (a fork's inherited epochs resolve to the ancestor that recorded them).
        epoch: a committed epoch of the run's history.
        data: the training data for runs on custom data (``(train, validation)`` or a `TrainData`).
        save: save a replayed state as the epoch's checkpoint.
        progress: show the replay's progress bar.

    Raises:
        EpochNotFoundError: the epoch is not committed. ReplayMismatchError: the replay differs
        from the record (e.g. other thread settings or nondeterministic ops).

    Example:
        >>> ckpt, how = restore_checkpoint(store, store.run(run_id), 7)
        >>> how.replayed, how.from_epoch
        (True, 5)
    """
    rec = run.epoch(epoch)  # raises EpochNotFoundError with the available span
    source = store.run(rec.run_id)
    have = store.checkpoint_epochs_of(source.run_id)
    if epoch in have:
        return load_run_checkpoint(source, epoch), Replayed(epoch, epoch)
    own = set(source.epochs())
    earlier = [e for e in have if e < epoch and e in own]
    if not earlier:
        raise StoreError(
            f"Run {source.run_id} has no checkpoint at or before epoch {epoch} to replay from "
            f"(checkpoints: {have or 'none'}); it cannot be restored"
        )
    base = earlier[-1]
    ckpt, n_commands = _replay(store, source, base, epoch, data, progress=progress)
    how = Replayed(epoch, base, n_commands)
    if save:
        try:
            w = RunWriter(store, source.run_id)
            w.write_checkpoint(epoch, to_bytes(ckpt, _record_of(source.epoch(epoch))))
            w.sync()
            how.saved = True
        except OSError as exc:  # a read-only parent: the fork goes on, the next one replays again
            log.warning("replayed checkpoint of %s epoch %d not saved: %s", source.run_id, epoch, exc)
    return ckpt, how


def _record_of(rec: Any) -> Any:
    def record(layer: str, key: str) -> np.ndarray | None:
        try:
            lr = rec.layer(layer)
            return getattr(lr, key) if key in ("kernel", "bias") else lr.array(key)
        except KeyError:
            return None

    return record


def _replay(store: Store, source: Run, base: int, epoch: int, data: Any, *, progress: bool) -> tuple[Checkpoint, int]:
    """Train ``source`` again from its checkpoint ``base`` up to ``epoch`` in a scratch store."""
    from ..config import TrainConfig
    from .fit import _data_for, _prev_from_model, _setup_determinism, _skip_to
    from .trainer import Trainer, TrainerState

    config = TrainConfig.from_dict(source.config)
    config.epochs = epoch
    config.live_every_s = 0.0
    _setup_determinism(config)
    model, optimizer, state = build(load_run_checkpoint(source, base))
    tmp = Path(tempfile.mkdtemp(prefix="revacnn-replay-"))
    try:
        scratch = open_store(tmp / "store")
        images, labels = store.probes(source.session_id)
        sid = create_session(
            scratch, dataset=config.dataset, model=config.model, probe_images=images, probe_labels=labels,
            probe_indices=list(range(len(labels))), class_names=store.class_names(source.session_id),
            config=config.to_dict(),
        )
        writer = RunWriter.create(scratch, session_id=sid, config=config.to_dict(), durable=False)
        n = _copy_commands(store, source.run_id, scratch, writer.run_id, base, epoch)
        tdata = _data_for(source, config, data)
        _skip_to(tdata, base)
        trainer = Trainer(
            model=model, optimizer=optimizer, data=tdata, probe_images=images, probe_labels=labels,
            writer=writer, config=config, state=TrainerState.from_dict(state["trainer"]),
            tracker_state=state.get("tracker"), doctor_state=state.get("doctor"), progress=progress,
        )
        trainer.recorder._prev = _prev_from_model(trainer)
        trainer.run(start_epoch=base, epochs=epoch, record_start=False)
        replayed = scratch.run(writer.run_id)
        if epoch not in replayed.epochs():
            raise ReplayMismatchError(
                f"Replaying run {source.run_id} from epoch {base} to {epoch} did not reach epoch {epoch} "
                f"(recorded {replayed.epochs()}; {replayed.status_info.get('message')})"
            )
        _check_equal(source, replayed, epoch, base)
        return load_run_checkpoint(replayed, epoch), n
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_commands(store: Store, run_id: str, scratch: Store, scratch_id: str, base: int, epoch: int) -> int:
    """Queue in the scratch run the commands ``run_id`` applied in epochs ``base+1 .. epoch``, at their batch."""
    from ..steering.commands import CONTROL_OPS

    events = store.run(run_id).events()
    qdir = store.layout.commands_dir(run_id)
    out = scratch.layout.commands_dir(scratch_id)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for row in events.itertuples(index=False):
        if row.epoch is None or not base < int(row.epoch) <= epoch or row.kind in CONTROL_OPS:
            continue
        cid = str(row.event_id)
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in cid)[:40]
        found = [*sorted((qdir / "done").glob(f"*-{safe}.json")), *sorted(qdir.glob(f"*-{safe}.json"))]
        if not found:  # the trainer's own events (auto-freeze) happen again by themselves
            continue
        raw = json.loads(found[0].read_text())
        raw["apply_at"] = [int(row.epoch), int(row.batch)]
        (out / found[0].name).write_text(json.dumps(raw))
        n += 1
    return n


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if a is None or b is None:
        return a is None and b is None or _nan(a) and _nan(b)
    return a == b


def _nan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _check_equal(source: Run, replayed: Run, epoch: int, base: int) -> None:
    """Raise `ReplayMismatchError` unless the replayed record of ``epoch`` equals the source's bit for bit."""
    a, b = source.epoch(epoch), replayed.epoch(epoch)
    diffs = []
    if a.layer_names != b.layer_names:
        diffs.append(f"layers {a.layer_names} vs {b.layer_names}")
    else:
        for name in a.layer_names:
            la, lb = a.layer(name), b.layer(name)
            for key in ("kernel", "bias", "filter_uids"):
                if la.has(key) != lb.has(key):
                    diffs.append(f"{name}/{key} present in one record only")
                elif la.has(key):
                    x, y = la.array(key), lb.array(key)
                    if x.shape != y.shape or x.tobytes() != y.tobytes():
                        diffs.append(f"{name}/{key}")
    if a.probabilities.tobytes() != b.probabilities.tobytes():
        diffs.append("probe predictions")
    ma, mb = a.metrics, b.metrics
    diffs += [f"metric {k} {ma.get(k)!r} vs {mb.get(k)!r}" for k in EXACT_METRICS if not _same(ma.get(k), mb.get(k))]
    if diffs:
        from .fit import runtime_settings

        raise ReplayMismatchError(
            f"Replaying run {source.run_id} from its checkpoint at epoch {base} did not reproduce its record "
            f"of epoch {epoch} bit for bit ({', '.join(diffs[:6])}). Received: runtime {runtime_settings()} "
            f"(the run recorded {source.config.get('runtime')}); expected the settings it ran under, with "
            "deterministic ops. Fork from a checkpointed epoch instead: "
            f"{source.store.checkpoint_epochs_of(source.run_id)}"
        )


def say(how: Replayed, run_id: str) -> None:
    """Print the one-line note of a replay on stderr (nothing when the epoch had a checkpoint)."""
    if how.replayed:
        msg = how.message(run_id)
        log.info(msg)
        print(msg, file=sys.stderr)
