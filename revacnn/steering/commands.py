"""Steering commands as plain data: the ops, their arguments, and parsing them from words.

Applying a command to a live trainer is the trainer's job (`revacnn.trainer.steer`); this module
imports nothing above `revacnn.steering`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import SteeringError


@dataclass
class Command:
    """A steering request as it travels through the store.

    Attributes:
        op: the operation (``freeze``, ``add-filters`` …).
        args: its arguments (``{"layer": "conv1"}`` …).
        command_id: unique id; the resulting event carries it as ``event_id``.
        sent_at: UNIX time the sender wrote it.
        apply_at: ``(epoch, batch)``: not before this batch boundary (None: at the next one). Set
            when a resume puts back a command of a discarded epoch, and by tests.
    """

    op: str
    args: dict[str, Any] = field(default_factory=dict)
    command_id: str = field(default_factory=lambda: f"cmd-{secrets.token_hex(6)}")
    sent_at: float = field(default_factory=time.time)
    apply_at: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"op": self.op, "args": self.args, "command_id": self.command_id, "sent_at": self.sent_at}
        if self.apply_at is not None:
            out["apply_at"] = [int(self.apply_at[0]), int(self.apply_at[1])]
        return out


#: Commands that steer the trainer rather than change the model: a resume does not replay them.
CONTROL_OPS = ("pause", "resume", "stop")


#: op -> argument names (``indices`` takes the rest of the words)
OPS: dict[str, tuple[str, ...]] = {
    "freeze": ("layer",),
    "unfreeze": ("layer",),
    "freeze-filters": ("layer", "indices"),
    "unfreeze-filters": ("layer", "indices"),
    "add-filters": ("layer", "n"),
    "delete-filters": ("layer", "indices"),
    "reinit-filters": ("layer", "indices"),
    "set-lr": ("lr",),
    "pause": (),
    "resume": (),
    "stop": (),
}


def parse(op: str, words: Sequence[str], *, init: str | None = None) -> Command:
    """Build a `Command` from CLI words, e.g. ``parse("delete-filters", ["conv2", "3", "5"])``.

    Raises:
        SteeringError: unknown op or malformed arguments.
    """
    if op not in OPS:
        raise SteeringError(f"Unknown steering op. Received: op={op!r} (expected one of {', '.join(OPS)})")
    names = OPS[op]
    args: dict[str, Any] = {}
    words = list(words)
    for i, name in enumerate(names):
        if name == "indices":
            rest = [w for part in words[i:] for w in str(part).replace(",", " ").split()]
            if not rest:
                raise SteeringError(f"{op} needs filter indices. Received: {' '.join(words) or 'nothing'}")
            try:
                args["indices"] = [int(w) for w in rest]
            except ValueError:
                raise SteeringError(f"{op}: indices must be integers. Received: {' '.join(rest)}") from None
            break
        if i >= len(words):
            raise SteeringError(f"{op} needs {' '.join(n.upper() for n in names)}. Received: {' '.join(words) or 'nothing'}")
        w = words[i]
        if name == "n":
            try:
                args["n"] = int(w)
            except ValueError:
                raise SteeringError(f"{op}: N must be an integer. Received: {w!r}") from None
        elif name == "lr":
            try:
                args["lr"] = float(w)
            except ValueError:
                raise SteeringError(f"set-lr: X must be a number. Received: {w!r}") from None
        else:
            args[name] = w
    if "indices" not in names and len(words) > len(names):
        raise SteeringError(f"{op} takes {len(names)} argument(s). Received: {' '.join(words)}")
    if init is not None:
        if op not in ("add-filters",):
            raise SteeringError(f"--init applies to add-filters only. Received: op={op!r}")
        args["init"] = init
    return Command(op=op, args=args)
