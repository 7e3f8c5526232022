"""The package façade: conveniences that cross layers (`Run.fork`, `Run.steer`, `Run.load_model`).

`revacnn.storage` imports nothing above it, so a `Run` does not know the trainer or the steering
channel. This module, imported by `revacnn/__init__.py`, installs those methods on `Run`; the
heavy layers (trainer, TensorFlow) are imported only when a method is called.

Example:
    >>> import revacnn
    >>> run = revacnn.open_store("store").run("run-…")
    >>> child = run.fork(2, changes=[revacnn.steering.parse("freeze", ["conv1"])])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import EpochNotFoundError, SteeringError
from .storage import Run

if TYPE_CHECKING:
    import keras


def fork(self: Run, epoch: int, *, changes: Any = (), epochs: int | None = None, lr: float | None = None,
         name: str | None = None, progress: bool = False, **kwargs: Any) -> Run:
    """Branch a new run from ``epoch`` with steering ``changes`` applied there; see `revacnn.trainer.fork`.

    Further keyword arguments (``data=``, ``callbacks=``, ``batch_size=``, ``auto_freeze=`` …) go
    to `revacnn.trainer.fork` unchanged: a run trained on the user's own data needs it again.

    Example:
        >>> from revacnn.steering import parse
        >>> child = run.fork(2, changes=[parse("freeze", ["conv1"])], data=((x, y), (xv, yv)))
    """
    from .trainer import fork as _fork

    return _fork(self.store, self.run_id, epoch, changes=changes, epochs=epochs, lr=lr, name=name,
                 progress=progress, **kwargs)


def steer(self: Run, op: str, *args: Any, wait: bool = True, timeout_s: float = 30.0,
          init: str | None = None) -> dict[str, Any] | None:
    """Send a steering command to this run's live trainer and (by default) wait for its event.

    Example:
        >>> run.steer("freeze", "conv1")["status"]
        'applied'
    """
    from .steering import parse, send, wait_for_event

    cmd = parse(op, [str(a) for a in args], init=init)
    if self.status != "running":
        raise SteeringError(f"Run {self.run_id} is {self.status}, not running: nothing to steer")
    send(self.store, self.run_id, cmd)
    if not wait:
        return {"event_id": cmd.command_id, "status": "sent"}
    return wait_for_event(self.store, self.run_id, cmd.command_id, timeout_s=timeout_s)


def load_model(self: Run, epoch: int | None = None, **kwargs: Any) -> keras.Model:
    """A `keras.Model` holding the weights of ``epoch`` (default: the last committed one).

    An epoch without a checkpoint (retention ``checkpoint_every`` > 1) is replayed from the
    nearest earlier one; a run on custom data then needs ``data=(train, validation)``.

    Example:
        >>> model = run.load_model(3)
    """
    if epoch is None:
        epoch = self.last_epoch()
        if epoch is None:
            raise EpochNotFoundError(f"Run {self.run_id} has no committed epoch yet")
    self.epoch(epoch)  # raises EpochNotFoundError before TensorFlow is imported
    from .trainer.checkpoint import model_from_checkpoint
    from .trainer.replay import restore_checkpoint, say

    ckpt, how = restore_checkpoint(self.store, self, epoch, kwargs.get("data"), save=False)
    say(how, self.run_id)
    return model_from_checkpoint(ckpt)


def install() -> None:
    """Put `fork`, `steer` and `load_model` on `revacnn.storage.Run` (idempotent)."""
    Run.fork = fork  # type: ignore[attr-defined]
    Run.steer = steer  # type: ignore[attr-defined]
    Run.load_model = load_model  # type: ignore[attr-defined]


install()
