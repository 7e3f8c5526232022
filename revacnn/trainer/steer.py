"""Applying steering commands to a live trainer: checks against the run, surgery, and the events."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from .._faults import kill_point
from ..errors import RevacnnError, SteeringError
from ..steering.commands import OPS, Command

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger("revacnn.steering")


def apply_pending(trainer: Trainer, epoch: int, batch: int, *, wait: bool = False) -> None:
    """Apply every queued command to ``trainer`` and record an event for each (called between batches).

    A command leaves the queue only after its event is written (`CommandQueue.ack`). Across
    several workers (``trainer.sync``), the chief's commands are broadcast and every worker
    applies them here, at the same batch (`_apply_broadcast`).

    ``add-filters`` and ``delete-filters`` are checked here and then prepared in the background
    (`PreparedSurgery`: the new model is built and its steps traced and warmed in a thread while
    the old model keeps training); they are applied at the first batch boundary after that, from
    the weights of that batch, and their event records that batch. The commands sent after one
    wait in the queue until it is applied, so commands still apply in the order they were sent.
    With ``wait`` (the end of an epoch, before its record) a surgery in preparation is waited
    for and applied here.
    """
    if getattr(trainer, "sync", None) is not None:
        _apply_broadcast(trainer, epoch, batch)
        return
    job: PreparedSurgery | None = trainer.__dict__.get("_surgery_job")
    if job is not None:
        if not job.done.is_set() and not wait:
            return  # the commands behind it keep their order
        job.done.wait()
        trainer._surgery_job = None
        _apply_and_record(trainer, job.cmd, job.cid, epoch, batch, prepared=job)
    if not trainer.commands.pending():
        return
    for cmd, cid, error in trainer.commands.pop(epoch, batch):
        if trainer.__dict__.get("_surgery_job") is not None:
            break  # taken but not acknowledged: still queued, taken again once the surgery is applied
        if cmd is None:
            trainer.writer.write_event(
                event_id=cid, epoch=epoch, batch=batch, kind="malformed", args={}, status="rejected",
                message=error or "malformed command",
            )
            trainer.commands.ack(cid)
            continue
        if _in_background(trainer, cmd):
            try:
                job = PreparedSurgery.start(trainer, cmd, cid)
            except Exception as exc:  # refused by the checks or the plan: rejected now, as before
                if not isinstance(exc, RevacnnError):
                    log.exception("steering op %s failed", cmd.op)
                message = str(exc) if isinstance(exc, RevacnnError) else f"internal error: {type(exc).__name__}: {exc}"
                trainer.writer.write_event(
                    event_id=cmd.command_id, epoch=epoch, batch=batch, kind=cmd.op, args=cmd.args,
                    status="rejected", message=message, sent_at=cmd.sent_at,
                )
                trainer.commands.ack(cid)
                continue
            if not wait:
                trainer._surgery_job = job
                continue
            job.done.wait()
            _apply_and_record(trainer, cmd, cid, epoch, batch, prepared=job)
            continue
        _apply_and_record(trainer, cmd, cid, epoch, batch)


def _apply_and_record(trainer: Trainer, cmd: Command, cid: str, epoch: int, batch: int,
                      prepared: PreparedSurgery | None = None) -> None:
    status, message, args = _apply_one(trainer, cmd, prepared=prepared)
    kill_point("command_popped")
    trainer.writer.write_event(
        event_id=cmd.command_id, epoch=epoch, batch=batch, kind=cmd.op, args=args,
        status=status, message=message, sent_at=cmd.sent_at,
    )
    kill_point("event_written")
    trainer.commands.ack(cid)


def _in_background(trainer: Trainer, cmd: Command) -> bool:
    """Whether ``cmd`` is a surgery that `PreparedSurgery` can prepare while the old model trains.

    Not for: a command with ``apply_at`` (a resume re-applies it at exactly that batch), runs with
    single frozen filters (their step is not cached), data other than arrays (the step is traced
    on its first batch), several workers, and a trainer with ``background_surgery`` off.
    """
    from .sources import ArraySource

    return (
        cmd.op in ("add-filters", "delete-filters")
        and bool(getattr(trainer, "background_surgery", False))
        and getattr(trainer, "strategy", None) is None
        and cmd.apply_at is None
        and getattr(trainer, "supports_surgery", True)
        and not any(trainer.state.frozen_filters.values())
        and isinstance(getattr(getattr(trainer, "data", None), "train", None), ArraySource)
    )


class PreparedSurgery:
    """An add/delete-filters command whose new model is built and traced in a background thread.

    The thread applies the surgery to the model as it is when the command is taken, compiles the
    new model, traces its train, eval and probe steps and calls each once (the first call is where
    TensorFlow optimises the graph), all while the old model keeps training on the trainer's
    thread. The values it trained on there are thrown away: at the swap (`Trainer.adopt`) every
    variable of the new model and optimizer is overwritten with a fresh surgery of the model as
    it is at that batch, so the result equals the synchronous surgery at the swap batch.

    Attributes:
        cmd: The command; ``cid`` its queue id.
        frozen: The frozen layers when it was taken (the new step's frozen set).
        result: The prepared `GraphSurgeryResult` (None until ``done``, or on an error).
        cache: The new model's `StepCache`, holding the traced steps.
        error: What went wrong in the thread (the swap then falls back to the synchronous path).
        done: Set when the thread has finished.
    """

    def __init__(self, cmd: Command, cid: str, command: dict[str, Any], frozen: list[str]) -> None:
        self.cmd, self.cid, self.command, self.frozen = cmd, cid, command, frozen
        self.result: Any = None
        self.cache: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread: threading.Thread | None = None

    @classmethod
    def start(cls, trainer: Trainer, cmd: Command, cid: str) -> PreparedSurgery:
        """Check ``cmd`` (its arguments and the plan: refusals raise here) and start the thread."""
        from ..steering import graph

        command, _ = surgery_request(trainer, cmd)
        frozen = list(trainer.state.frozen_layers)
        graph.plan(trainer.model, command, frozen=frozen)
        job = cls(cmd, cid, command, frozen)
        job.thread = threading.Thread(target=job._run, args=(trainer,), name="revacnn-surgery", daemon=True)
        job.thread.start()
        return job

    def _run(self, trainer: Trainer) -> None:
        try:
            self.result, self.cache = trainer.prepare_swap(self.command, self.frozen)
        except BaseException as exc:  # reported at the swap, which then applies synchronously
            self.error = exc
            log.warning("preparing %s in the background failed (%s: %s); it is applied synchronously",
                        self.cmd.op, type(exc).__name__, exc)
        finally:
            self.done.set()

    def ready(self) -> bool:
        return self.done.is_set() and self.error is None and self.result is not None


def finish_background(trainer: Trainer) -> None:
    """Wait for a surgery still in preparation (the run ends); its command stays queued, unapplied."""
    job = trainer.__dict__.pop("_surgery_job", None)
    if job is not None and job.thread is not None:
        job.thread.join()


def _apply_one(trainer: Trainer, cmd: Command, *, prepared: PreparedSurgery | None = None) -> tuple[str, str, dict[str, Any]]:
    """Apply one command: its status (``applied``/``rejected``), message and the event's args.

    A surgery's event args name every layer it changed (``touched``: the app marks them). A bug
    in an op is a rejection with the error, never the end of training.
    """
    touched: list[str] = []
    try:
        message = apply(trainer, cmd, touched=touched, prepared=prepared)
        status = "applied"
    except RevacnnError as exc:
        status, message = "rejected", str(exc)
    except Exception as exc:  # a bug in an op must not kill training
        log.exception("steering op %s failed", cmd.op)
        status, message = "rejected", f"internal error: {type(exc).__name__}: {exc}"
    args = {**cmd.args, "touched": touched} if touched and status == "applied" else cmd.args
    return status, message, args


def _apply_broadcast(trainer: Trainer, epoch: int, batch: int) -> None:
    """The chief pops the queue and broadcasts its commands; every worker applies them in order.

    Only the chief writes events and acknowledges; the others apply the same commands to their
    own replicas (the checks are deterministic, so a command rejected on one is rejected on all).
    """
    cids: dict[str, str] = {}
    mine: list[dict[str, Any]] | None = None
    if trainer.chief:
        mine = []
        if trainer.commands.pending():
            for cmd, cid, error in trainer.commands.pop(epoch, batch):
                if cmd is None:
                    trainer.writer.write_event(
                        event_id=cid, epoch=epoch, batch=batch, kind="malformed", args={}, status="rejected",
                        message=error or "malformed command",
                    )
                    trainer.commands.ack(cid)
                    continue
                cids[cmd.command_id] = cid
                mine.append(cmd.to_json())
    for d in trainer.sync.exchange(mine):
        cmd = Command(op=d["op"], args=d.get("args") or {}, command_id=d["command_id"], sent_at=d.get("sent_at", 0.0))
        status, message, args = _apply_one(trainer, cmd)
        if not trainer.chief:
            trainer.applied.append([cmd.command_id, cmd.op, epoch, batch, status])
        if trainer.chief:
            trainer.writer.write_event(
                event_id=cmd.command_id, epoch=epoch, batch=batch, kind=cmd.op, args=args,
                status=status, message=message, sent_at=cmd.sent_at,
            )
            trainer.commands.ack(cids.get(cmd.command_id, cmd.command_id))


def _layer_names(trainer: Trainer) -> list[str]:
    return list(trainer.state.uids)


def _check_layer(trainer: Trainer, args: dict[str, Any]) -> str:
    layer = args.get("layer")
    names = _layer_names(trainer)
    if not isinstance(layer, str) or layer not in names:
        raise SteeringError(f"Unknown layer. Received: layer={layer!r} (layers are {', '.join(names)})")
    return layer


def _check_indices(trainer: Trainer, layer: str, args: dict[str, Any]) -> list[int]:
    idx = args.get("indices")
    n = len(trainer.state.uids[layer])
    if not isinstance(idx, list) or not idx or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
        raise SteeringError(f"Received: indices={idx!r} (expected a non-empty list of filter indices)")
    bad = [i for i in idx if i < 0 or i >= n]
    if bad:
        raise SteeringError(
            f"Filter index out of range. Received: indices={bad} ({layer} has {n} filters: 0..{n - 1})"
        )
    if len(set(idx)) != len(idx):
        raise SteeringError(f"Duplicate filter indices. Received: indices={idx}")
    return sorted(idx)


def set_learning_rate(optimizer: Any, lr: float) -> None:
    """Set a constant learning rate; refuse (`SteeringError`) when the optimizer follows a schedule."""
    current = getattr(optimizer, "_learning_rate", None)
    if current is not None and hasattr(current, "get_config") and callable(current):
        raise SteeringError(
            f"Received: lr={lr!r} for an optimizer that follows a learning-rate schedule "
            f"({type(current).__name__}); the schedule sets the rate (fork the run with a new "
            "compiled schedule instead)"
        )
    optimizer.learning_rate = float(lr)


def apply(trainer: Trainer, cmd: Command, *, touched: list[str] | None = None,
          prepared: PreparedSurgery | None = None) -> str:
    """Apply one command to a live trainer; return a short message, raise `SteeringError` to reject.

    Args:
        trainer: The live trainer.
        cmd: The command.
        touched: When given, filter surgery appends the names of every layer it changed (its
            plan's layers, `revacnn.steering.graph.Plan.layers`); `apply_pending` records them in
            the event's args as ``touched``.
        prepared: For add/delete-filters, the new model prepared in the background
            (`PreparedSurgery`): the surgery is still done here, on the model as it is now, and
            its values are moved into the prepared model, whose steps are traced already.

    Example:
        >>> layers: list[str] = []
        >>> apply(trainer, parse("add-filters", ["conv1", "2"]), touched=layers)  # doctest: +SKIP
        'conv1: 2 filters added (18 now, init=zero)'
    """
    op, args = cmd.op, cmd.args
    st = trainer.state
    if op not in OPS:
        raise SteeringError(f"Unknown steering op. Received: op={op!r} (expected one of {', '.join(OPS)})")
    if op == "set-lr":
        lr = args.get("lr")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not np.isfinite(lr) or lr <= 0:
            raise SteeringError(f"Received: lr={lr!r} (expected a number > 0)")
        old = trainer.lr
        set_learning_rate(trainer.optimizer, float(lr))
        return f"learning rate {old:g} -> {float(lr):g}"
    if op == "pause":
        trainer.paused = True
        return "paused"
    if op == "resume":
        was = trainer.paused
        trainer.paused = False
        return "resumed" if was else "was not paused"
    if op == "stop":
        trainer.stop_requested = True
        return "stopping after this batch"
    layer = _check_layer(trainer, args)
    if op == "freeze":
        if layer in st.frozen_layers:
            return f"{layer} was already frozen"
        st.frozen_layers.append(layer)
        trainer.rebuild(carry=True)
        return f"{layer} frozen"
    if op == "unfreeze":
        if layer not in st.frozen_layers:
            return f"{layer} was not frozen"
        st.frozen_layers.remove(layer)
        trainer.rebuild(carry=True)
        return f"{layer} unfrozen"
    if op in ("freeze-filters", "unfreeze-filters"):
        idx = _check_indices(trainer, layer, args)
        uids = [st.uids[layer][i] for i in idx]
        cur = set(st.frozen_filters.get(layer, []))
        cur = cur | set(uids) if op == "freeze-filters" else cur - set(uids)
        st.frozen_filters[layer] = sorted(cur)
        if not st.frozen_filters[layer]:
            del st.frozen_filters[layer]
        trainer.rebuild(carry=True)
        verb = "frozen" if op == "freeze-filters" else "unfrozen"
        return f"{layer} filters {idx} {verb} ({len(cur)} frozen filters in the layer)"
    if op in ("add-filters", "delete-filters", "reinit-filters") and not getattr(trainer, "supports_surgery", True):
        raise SteeringError(
            f"{op} needs new variables, which a run recorded by RevacnnCallback inside the user's own "
            f"model.fit cannot take. Received: {op} {layer} (fork the run instead: revacnn fork "
            f"{trainer.run_id} --epoch K --{op} ..., which continues under revacnn.fit)"
        )
    from ..steering import graph

    # Group surgery (steering/graph.py): every layer tied to ``layer`` through Add, Concatenate,
    # depthwise convolutions and BatchNorm changes with it; on a chain it equals the chain surgery.
    frozen = set(st.frozen_layers)
    step = int(np.asarray(trainer.optimizer.iterations))
    if op in ("add-filters", "delete-filters"):
        gcmd, describe = surgery_request(trainer, cmd)
        with _scope(trainer):
            res = graph.apply(trainer.model, trainer.optimizer, gcmd, seed=_surgery_seed(trainer, op), frozen=frozen)
        if prepared is not None and prepared.ready():
            trainer.adopt(prepared.result, prepared.cache, res)
        else:
            trainer.swap(res)
        _touched(touched, res)
        return describe(res)
    if op == "reinit-filters":
        idx = _check_indices(trainer, layer, args)
        with _scope(trainer):
            res = graph.apply(trainer.model, trainer.optimizer,
                              {"op": op, "args": {"layer": layer, "indices": idx}},
                              seed=trainer.config.seed + 7919 * (1 + step), frozen=frozen)
        trainer.rebuild(carry=True)
        _touched(touched, res)
        return f"{layer}: filters {idx} re-initialised{_group(res)}"
    raise SteeringError(f"Unhandled op {op!r}")  # pragma: no cover


def surgery_request(trainer: Trainer, cmd: Command) -> tuple[dict[str, Any], Any]:
    """Check an add/delete-filters command against the run: ``(graph command, describe(result) -> message)``.

    Raises:
        SteeringError: the layer, ``n``, ``init`` or ``indices`` do not fit the run.
    """
    op, args = cmd.op, cmd.args
    st = trainer.state
    layer = _check_layer(trainer, args)
    if op == "add-filters":
        n = args.get("n")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise SteeringError(f"Received: n={n!r} (expected an integer >= 1)")
        init = args.get("init", "zero")
        if init not in ("zero", "random"):
            raise SteeringError(f"Received: init={init!r} (expected 'zero' or 'random')")

        def added(res: Any) -> str:
            return f"{layer}: {n} filters added ({len(st.uids[layer])} now, init={init}){_group(res)}"

        return {"op": op, "args": {"layer": layer, "n": n, "init": init}}, added
    if op != "delete-filters":
        raise SteeringError(f"Received: op={op!r} (expected add-filters or delete-filters)")
    idx = _check_indices(trainer, layer, args)
    if len(idx) >= len(st.uids[layer]):
        raise SteeringError(
            f"Cannot delete every filter of {layer}. Received: {len(idx)} indices "
            f"({layer} has {len(st.uids[layer])} filters; at least one must remain)"
        )

    def deleted(res: Any) -> str:
        return f"{layer}: filters {idx} deleted ({len(st.uids[layer])} left){_group(res)}"

    return {"op": op, "args": {"layer": layer, "indices": idx}}, deleted


def _surgery_seed(trainer: Trainer, op: str) -> int | None:
    """The seed of a surgery's random draws: the run's seed plus the optimizer step it is applied at."""
    if op != "add-filters":
        return None
    return int(trainer.config.seed) + int(np.asarray(trainer.optimizer.iterations))


def _scope(trainer: Trainer) -> Any:
    """The trainer's strategy scope (surgery's new variables are replicated under it)."""
    scope = getattr(trainer, "scope", None)
    if scope is None:
        from contextlib import nullcontext

        return nullcontext()
    return scope()


def _touched(touched: list[str] | None, res: Any) -> None:
    """Append the layers a surgery changed (its plan's) to ``touched``."""
    if touched is not None:
        touched.extend(c for c in res.plan.layers if c not in touched)


def _group(res: Any) -> str:
    """`` (group: a, b; 7 layers changed)`` when more than the target and its consumer changed."""
    plan = res.plan
    if len(plan.group) <= 1:
        return ""
    return f" (group: {', '.join(plan.group)}; {len(plan.changes)} layers changed)"
