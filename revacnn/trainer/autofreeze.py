"""``--auto-freeze``: the trainer freezes converged conv layers itself, bottom-up, as recorded events.

At the end of every trained epoch, before the epoch's snapshot and checkpoint are taken, the lowest
conv layer that is not frozen yet is asked the doctor's `converged` question
(`revacnn.analysis.doctor.converged_layer`: its relative weight change against its own peak, and the
linear CKA of its probe activations against the previous epoch's). If it has converged it is frozen
through the same steering op a user would send, and an ``events`` row says so (``kind`` ``freeze``,
``args.source`` ``auto-freeze``). Bottom-up, one layer per epoch: a layer is only frozen once every
conv layer below it is, as in FreezeOut, so frozen layers never sit above trained ones; and the
last conv layer, the one the classifier reads, is never frozen: it keeps adapting the features to
the head (freezing it too cost 6 accuracy points in `benchmarks/bench_doctor.py`).

The decision happens in the main thread at the epoch boundary (not in the recorder's worker), so it
is deterministic: a resume or a no-change fork replays the same freezes at the same epochs. The peaks
travel with each checkpoint in the trainer's state; the previous epoch's kernels and activations are
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

    def check(self, trainer: Trainer, epoch: int, batch: int) -> str | None:
        """After a trained epoch: update the peaks; freeze the lowest unfrozen layer if converged.

        Returns:
            The frozen layer's name, or None.
        """
        now = self._current(trainer)
        peaks = trainer.state.convergence_peak
        frozen = set(trainer.state.frozen_layers)
        candidate = None
        top = list(now)[-1] if now else None
        for name, (uids, kernel, acts) in now.items():  # bottom-up, in graph order
            old = self._prev.get(name)
            if old is None or old[0] != uids or old[1].shape != kernel.shape:
                continue  # new layer or filters changed this epoch: no comparable history
            if candidate is None and name not in frozen and name != top:
                candidate = (name, LayerArrays(
                    name=name, kernel=kernel, bias=None, activations=acts, grad_l1=None, uids=uids,
                    prev_kernel=old[1], prev_activations=old[2], peak_change=peaks.get(name)))
            change = relative_change(kernel, old[1])
            if np.isfinite(change):
                peaks[name] = max(peaks.get(name, 0.0), change)
        self._prev = now
        if candidate is None:
            return None
        name, arrays = candidate
        lower = list(now)[: list(now).index(name)]
        if any(n not in frozen for n in lower):
            return None
        finding = converged_layer(arrays)
        if finding is None:
            return None
        cmd = Command(op="freeze", args={"layer": name, "source": "auto-freeze"})
        try:
            from .steer import apply  # imports the trainer module: import at call time

            message = apply(trainer, cmd)
        except Exception as exc:  # a refused freeze must not stop training
            log.warning("auto-freeze of %s refused: %s", name, exc)
            return None
        trainer.writer.write_event(
            event_id=cmd.command_id, epoch=epoch, batch=batch, kind="freeze", args=cmd.args,
            status="applied", message=f"auto-freeze: {message} ({finding.message})",
        )
        return name
