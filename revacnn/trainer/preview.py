"""Dry runs of steering changes: the surgery plans of a command list against a recorded epoch's model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import EpochNotFoundError
from ..steering import graph
from ..storage import Store
from .checkpoint import model_from_checkpoint


def preview(
    store: Store, run_id: str, changes: Sequence[Any], *, epoch: int | None = None
) -> tuple[int, list[graph.Plan | str]]:
    """Plan ``changes`` (steering `Command`s) against ``run_id``'s model at ``epoch``; apply nothing.

    Filter surgery commands (add/delete/reinit-filters) give a `revacnn.steering.graph.Plan`;
    later changes are planned on the architecture the earlier ones produce; freeze/unfreeze
    update the frozen set the plans are checked against; anything else gives a one-line note.

    Args:
        store: The store.
        run_id: The run (running or not).
        changes: The commands, in order.
        epoch: The recorded epoch to plan against (default: the run's last committed one).

    Returns:
        ``(epoch, [plan or note per change])``.

    Raises:
        EpochNotFoundError: The run has no committed epoch (or not that one).
        SteeringError: A change is refused (the message names the layer and the reason).

    Example:
        >>> from revacnn.steering import parse
        >>> epoch, plans = preview(store, "run-1", [parse("add-filters", ["conv1", "2"])])  # doctest: +SKIP
        >>> print(plans[0].format())                                                        # doctest: +SKIP
    """
    run = store.run(run_id)
    if epoch is None:
        epoch = run.last_epoch()
        if epoch is None:
            raise EpochNotFoundError(f"Run {run_id} has no committed epoch to plan against yet")
    from .replay import restore_checkpoint, say

    ckpt, how = restore_checkpoint(store, run, epoch, save=False)
    say(how, run_id)
    model = model_from_checkpoint(ckpt)
    frozen = set(ckpt.state.get("trainer", {}).get("frozen_layers", []))
    out: list[graph.Plan | str] = []
    for i, cmd in enumerate(changes):
        layer = cmd.args.get("layer")
        if cmd.op in graph.OPS:
            if i == len(changes) - 1 or cmd.op == "reinit-filters":
                out.append(graph.plan(model, cmd, frozen=frozen))
            else:
                res = graph.apply(model, None, cmd, seed=0, frozen=frozen)
                model = res.model
                out.append(res.plan)
            continue
        if cmd.op == "freeze":
            frozen.add(layer)
        elif cmd.op == "unfreeze":
            frozen.discard(layer)
        args = " ".join(f"{k}={v}" for k, v in cmd.args.items())
        out.append(f"{cmd.op} {args}".strip() + " (no filter surgery)")
    return epoch, out


def format_preview(epoch: int, plans: Sequence[graph.Plan | str]) -> str:
    """The text ``--dry-run`` prints."""
    lines = [f"dry run against epoch {epoch} (its checkpoint; nothing is applied, and changes made "
             "since that epoch are not included):"]
    for p in plans:
        lines.append(p.format() if isinstance(p, graph.Plan) else p)
    return "\n".join(lines)
