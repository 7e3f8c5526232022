"""``--auto-freeze``: the trainer anneals, then freezes, conv layers itself, bottom-up, as recorded events.

At the end of every trained epoch, before the epoch's snapshot and checkpoint are taken, every conv
layer that is not frozen (the last one aside) is asked the doctor's `converged` question
(`revacnn.analysis.doctor.converged_layer`: its relative weight change against its own peak, and the
linear CKA of its probe activations against the previous epoch's). A layer becomes *ready* when it
has read converged `AUTO_FREEZE_PATIENCE` epochs in a row, or when the run reaches its scheduled
point (FreezeOut's cubic schedule, `scheduled_point`), whichever comes first, and never before
`AUTO_FREEZE_MIN_FRACTION` of the planned epochs. A ready layer is not frozen at once: as in
FreezeOut, its learning rate is annealed to zero first, a cosine over `AUTO_FREEZE_ANNEAL_FRACTION`
of the planned epochs (an update scale in the compiled step, `revacnn.trainer.step.anneal_scale`;
an ``events`` row of ``kind`` ``anneal``), and at the first epoch end where the scale has reached 0
it is frozen through the same steering op a user would send (``kind`` ``freeze``); both rows carry
``args.source`` ``auto-freeze``. Bottom-up: a layer starts annealing only once every conv layer
below it anneals or is frozen, so frozen layers never sit above trained ones; the last conv layer,
the one the classifier reads, is never frozen. docs/diagnoses.md gives the measured effect of these
choices.

The decision happens in the main thread at the epoch boundary (not in the recorder's worker), so it
is deterministic: a resume or a no-change fork replays the same anneals and freezes at the same
epochs. The peaks, streaks and annealing windows travel with each checkpoint in the trainer's
state; the previous epoch's kernels and activations are taken from the model when a run (or a
resume) starts. A distributed run (a ``strategy``) has no annealing windows: a ready layer freezes at once.

Example:
    >>> run = revacnn.fit(model, (x, y), validation_data=(xv, yv), epochs=20, auto_freeze=True)
    >>> run.events()[["epoch", "kind", "message"]]
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from ..analysis.doctor import LayerArrays, converged_layer, relative_change
from ..steering.commands import Command

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger("revacnn.autofreeze")

AUTO_FREEZE_MIN_FRACTION: float = 0.3
"""No layer starts annealing before this fraction of the run's planned epochs (FreezeOut's ``t_0``;
0: from the first epoch on). Freezing convnetjs' conv1 and conv2 abruptly as soon as they read
converged (epoch 6 of 20, Adam at a constant rate) cost 5-7 accuracy points; see docs/diagnoses.md
for the figures of each setting measured."""

AUTO_FREEZE_PATIENCE: int = 2
"""A layer is ready after reading `converged` this many epochs in a row: a single quiet epoch
(Adam's step sizes fluctuate) is not enough (see docs/diagnoses.md for the measured effect)."""

AUTO_FREEZE_SCHEDULE: bool = True
"""Also make a layer ready at its `scheduled_point` even if it never reads converged (FreezeOut's
cubic schedule). False: the doctor's `converged` alone decides."""

AUTO_FREEZE_ANNEAL_FRACTION: float = 0.1
"""A ready layer's learning rate falls from 1x to 0 over this fraction of the planned epochs (at
least one epoch), a cosine; then it freezes. 0: freeze at once (no annealing)."""


def scheduled_point(index: int, n_conv: int, t0: float | None = None) -> float:
    """FreezeOut's cubic schedule: the fraction of the run at which conv layer ``index`` is ready.

    ``t_i = t0 + (1 - t0) * (index / n_conv) ** 3`` (Brock et al. 2017, with the classifier as layer
    ``n_conv``, never frozen): the lowest layer at ``t0``, the higher ones ever later.

    Example:
        >>> round(scheduled_point(1, 3, 0.3), 3)
        0.326
    """
    t0 = AUTO_FREEZE_MIN_FRACTION if t0 is None else t0
    if n_conv < 1 or not 0 <= index < n_conv:
        raise ValueError(f"Received: index={index}, n_conv={n_conv} (expected 0 <= index < n_conv)")
    return t0 + (1.0 - t0) * (index / n_conv) ** 3


class AutoFreezer:
    """Remembers each conv layer's last kernel and probe activations; anneals and freezes ready layers."""

    def __init__(self) -> None:
        self._prev: dict[str, tuple[list[int], np.ndarray, np.ndarray]] = {}

    def _current(self, trainer: Trainer) -> dict[str, tuple[list[int], np.ndarray, np.ndarray]]:
        acts, _ = trainer.probe()
        out = {}
        convs = [r for r in trainer.recs if r.kind == "conv"]  # the probe's order, nested names included
        for r, a in zip(convs, acts, strict=False):
            out[r.name] = (list(trainer.state.uids[r.name]), r.kernel(), np.asarray(a))
        return out

    def prime(self, trainer: Trainer) -> None:
        """Take the current model as "the previous epoch" (at the start of a run or a resume)."""
        self._prev = self._current(trainer)

    def check(self, trainer: Trainer, epoch: int, batch: int) -> list[str]:
        """After a trained epoch: update the peaks and streaks; freeze annealed layers; start annealing ready ones.

        Every conv layer that is not frozen (the last one aside) is asked `converged_layer`; a
        yes extends its streak, a no resets it. Every layer whose annealing window has ended
        (the optimizer's iterations reached its end: its update scale is 0) is frozen. Then,
        bottom-up, each layer that is neither frozen nor annealing, whose lower layers all are, and
        that is ready (`AUTO_FREEZE_PATIENCE` converged epochs, or its `scheduled_point`), starts
        annealing, until the first one that is not ready.

        Returns:
            The names of the layers frozen now (bottom-up), possibly none.
        """
        now = self._current(trainer)
        peaks = trainer.state.convergence_peak
        streak = trainer.state.convergence_streak
        frozen = set(trainer.state.frozen_layers)
        names = list(now)
        top = names[-1] if names else None
        findings: dict[str, str] = {}
        for name, (uids, kernel, acts) in now.items():  # bottom-up, in graph order
            old = self._prev.get(name)
            if old is None or old[0] != uids or old[1].shape != kernel.shape:
                streak[name] = 0  # new layer or filters changed this epoch: no comparable history
                continue
            if name not in frozen and name != top:
                finding = converged_layer(LayerArrays(
                    name=name, kernel=kernel, bias=None, activations=acts, grad_l1=None, uids=uids,
                    prev_kernel=old[1], prev_activations=old[2], peak_change=peaks.get(name)))
                streak[name] = streak.get(name, 0) + 1 if finding is not None else 0
                if finding is not None:
                    findings[name] = finding.message
            change = relative_change(kernel, old[1])
            if np.isfinite(change) and name not in trainer.state.annealing:
                peaks[name] = max(peaks.get(name, 0.0), change)
        self._prev = now
        annealing = trainer.state.annealing
        for name in [n for n in annealing if n in frozen or n not in now]:
            trainer.set_anneal(name, None)  # frozen by hand, or gone by surgery: nothing to anneal
        iteration = int(np.asarray(trainer.optimizer.iterations))
        done: list[str] = []
        for name in names[:-1]:  # windows that ended: the scale is 0, the layer has stopped moving
            window = annealing.get(name)
            if window is None or iteration < window[1]:
                continue
            if self._freeze(trainer, name, epoch, batch,
                            f"annealed to a learning rate of 0 over iterations {window[0]}-{window[1]}"):
                trainer.set_anneal(name, None)
                frozen.add(name)
                done.append(name)
        epochs = int(trainer.config.epochs or 0)
        if epoch < AUTO_FREEZE_MIN_FRACTION * epochs:
            return done
        for i, name in enumerate(names[:-1]):  # bottom-up; the last conv layer keeps training
            if name in frozen or name in annealing:
                continue
            point = scheduled_point(i, len(names))
            if streak.get(name, 0) >= AUTO_FREEZE_PATIENCE:
                why = f"converged {streak[name]} epochs in a row; {findings.get(name, '')}"
            elif AUTO_FREEZE_SCHEDULE and epoch >= point * epochs:
                why = f"its scheduled point, {point:.3f} of the run, is reached"
            else:
                break  # not ready: nothing above it may start either
            length = max(1, round(AUTO_FREEZE_ANNEAL_FRACTION * epochs)) * max(int(batch), 1)
            window = (iteration, iteration + length)
            if AUTO_FREEZE_ANNEAL_FRACTION <= 0 or not trainer.set_anneal(name, window):
                if not self._freeze(trainer, name, epoch, batch, why):
                    break
                frozen.add(name)
                done.append(name)
                continue
            cmd = Command(op="anneal", args={"layer": name, "source": "auto-freeze",
                                             "start_iteration": window[0], "end_iteration": window[1]})
            trainer.writer.write_event(
                event_id=cmd.command_id, epoch=epoch, batch=batch, kind="anneal", args=cmd.args,
                status="applied",
                message=f"auto-freeze: {name}'s learning rate anneals to 0 over iterations "
                        f"{window[0]}-{window[1]}, then it freezes ({why})",
            )
        return done

    @staticmethod
    def _freeze(trainer: Trainer, name: str, epoch: int, batch: int, why: str) -> bool:
        """Freeze ``name`` through the steering op and record the event; False if it was refused."""
        cmd = Command(op="freeze", args={"layer": name, "source": "auto-freeze"})
        try:
            from .steer import apply  # imports the trainer module: import at call time

            message = apply(trainer, cmd)
        except Exception as exc:  # a refused freeze must not stop training
            log.warning("auto-freeze of %s refused: %s", name, exc)
            return False
        trainer.writer.write_event(
            event_id=cmd.command_id, epoch=epoch, batch=batch, kind="freeze", args=cmd.args,
            status="applied", message=f"auto-freeze: {message} ({why})",
        )
        return True
