"""``--auto-freeze``: the trainer freezes converged conv layers itself, bottom-up, as recorded events.

At the end of every trained epoch, before the epoch's snapshot and checkpoint are taken, every conv
layer that is not frozen (the last one aside) is asked the doctor's `converged` question
(`revacnn.analysis.doctor.converged_layer`: its relative weight change against its own peak, and the
linear CKA of its probe activations against the previous epoch's). A layer that has read converged
`AUTO_FREEZE_PATIENCE` epochs in a row is frozen through the same steering op a user would send, and
an ``events`` row says so (``kind`` ``freeze``, ``args.source`` ``auto-freeze``). Bottom-up: a layer
is only frozen once every conv layer below it is, as in FreezeOut, so frozen layers never sit above
trained ones (several may freeze at the same epoch); nothing freezes before
`AUTO_FREEZE_MIN_FRACTION` of the planned epochs; and the last conv layer, the one the classifier
reads, is never frozen. docs/diagnoses.md gives the measured effect of each of these choices.

The decision happens in the main thread at the epoch boundary (not in the recorder's worker), so it
is deterministic: a resume or a no-change fork replays the same freezes at the same epochs. The peaks
and streaks travel with each checkpoint in the trainer's state; the previous epoch's kernels and activations are
taken from the model when a run (or a resume) starts.

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

AUTO_FREEZE_MIN_FRACTION: float = 0.5
"""No layer freezes before this fraction of the run's planned epochs (FreezeOut's ``t_0``, whose
default is also 0.5; 0: from the first epoch on). Freezing convnetjs' conv1 and conv2 as soon as they
read converged (epoch 6 of 20) cost 5-7 accuracy points; see docs/diagnoses.md for the figures."""

AUTO_FREEZE_PATIENCE: int = 2
"""A layer freezes only after reading `converged` this many epochs in a row: a single quiet epoch
(Adam's step sizes fluctuate) is not enough (see docs/diagnoses.md for the measured effect)."""


class AutoFreezer:
    """Remembers each conv layer's last kernel and probe activations; freezes converged layers."""

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
        """After a trained epoch: update the peaks and streaks; freeze the converged bottom layers.

        Every conv layer that is not frozen (the last one aside) is asked `converged_layer`; a
        yes extends its streak, a no resets it. Then, bottom-up, each layer whose streak reached
        `AUTO_FREEZE_PATIENCE` and whose lower layers are all frozen is frozen, until the first
        one that is not ready: several layers may freeze at the same epoch, never one above a
        trained one.

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
            if np.isfinite(change):
                peaks[name] = max(peaks.get(name, 0.0), change)
        self._prev = now
        done: list[str] = []
        if epoch < AUTO_FREEZE_MIN_FRACTION * int(trainer.config.epochs or 0):
            return done
        for name in names[:-1]:  # bottom-up; the last conv layer keeps training
            if name in frozen:
                continue
            if streak.get(name, 0) < AUTO_FREEZE_PATIENCE:
                break  # not ready: nothing above it may freeze either
            cmd = Command(op="freeze", args={"layer": name, "source": "auto-freeze"})
            try:
                from .steer import apply  # imports the trainer module: import at call time

                message = apply(trainer, cmd)
            except Exception as exc:  # a refused freeze must not stop training
                log.warning("auto-freeze of %s refused: %s", name, exc)
                break
            frozen.add(name)
            done.append(name)
            trainer.writer.write_event(
                event_id=cmd.command_id, epoch=epoch, batch=batch, kind="freeze", args=cmd.args,
                status="applied",
                message=f"auto-freeze: {message} (converged {streak[name]} epochs in a row; "
                        f"{findings.get(name, '')})",
            )
        return done
