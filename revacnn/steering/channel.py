"""The command channel: a per-run queue of steering commands in the store, and waiting for their events.

Durability: a command file is *accepted* once `send` has renamed it into ``runs/<run>/commands/``.
It leaves the queue (moved to ``commands/done/``) only after its event is written, and events are
keyed by command id: a trainer that finds a queued command whose event already exists (a crash
between the event and the move) moves it without applying it again, and one that died between
applying a command and writing its event finds it still queued. `requeue_discarded` puts back the
commands whose events belong to epochs a resume discards, to be applied at the same batch again.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ..storage import EVENTS_SCHEMA, Store, atomic_write_json, event_files, fsync_dir, read_tables
from .commands import CONTROL_OPS, Command


def send(store: Store, run_id: str, command: Command) -> Command:
    """Queue ``command`` for the trainer of ``run_id`` (atomic file write, safe from any process)."""
    d = store.layout.commands_dir(run_id)
    name = f"{time.time_ns():020d}-{command.command_id}.json"
    atomic_write_json(d / name, command.to_json(), durable=getattr(store, "durable", True))
    publish = getattr(store, "_publish", None)
    if publish is not None:  # a store at a URL: the command is accepted once its object is put
        publish(d / name)
    return command


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:40]


def _parse(path: Path, raw: Any, fallback_id: str) -> Command:
    if not isinstance(raw, dict) or not isinstance(raw.get("op"), str):
        raise ValueError("expected a JSON object with a string 'op'")
    args = raw.get("args") or {}
    if not isinstance(args, dict):
        raise ValueError("'args' must be a JSON object")
    at = raw.get("apply_at")
    apply_at = None
    if at is not None:
        if not (isinstance(at, list) and len(at) == 2):
            raise ValueError("'apply_at' must be [epoch, batch]")
        apply_at = (int(at[0]), int(at[1]))
    return Command(
        op=raw["op"],
        args=args,
        command_id=str(raw.get("command_id") or fallback_id),
        sent_at=float(raw.get("sent_at") or time.time()),
        apply_at=apply_at,
    )


class CommandQueue:
    """The trainer's side of the channel: pops pending command files in the order they were sent."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.dir = store.layout.commands_dir(run_id)
        self.done = self.dir / "done"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.done.mkdir(exist_ok=True)
        self._taken: dict[str, Path] = {}

    def pending(self) -> list[Path]:
        """Files waiting, oldest first (cheap: one directory scan)."""
        try:
            with os.scandir(self.dir) as it:
                names = [e.name for e in it if e.name.endswith(".json") and not e.name.startswith(".")]
        except FileNotFoundError:
            return []
        return [self.dir / n for n in sorted(names)]

    def _answered(self) -> set[str]:
        """Command ids (file-name safe) that already have an event."""
        d = self.dir.parent / "tables" / "events"
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return set()
        # event files are named <time>-<seq>-<safe command id>.parquet
        return {parts[2] for n in names if n.endswith(".parquet") and len(parts := n[:-8].split("-", 2)) == 3}

    def pop(self, epoch: int | None = None, batch: int | None = None) -> list[tuple[Command | None, str, str | None]]:
        """Take the pending commands due at ``(epoch, batch)``: ``(command or None, id, parse error or None)``.

        A taken command stays in the queue until `ack` (after its event is written). A queued
        command that already has an event is moved out without being returned.
        """
        out: list[tuple[Command | None, str, str | None]] = []
        answered = self._answered()
        for path in self.pending():
            fallback_id = path.stem.split("-", 1)[-1] or path.stem
            try:
                cmd: Command | None = _parse(path, json.loads(path.read_text()), fallback_id)
                cid, error = cmd.command_id, None
            except FileNotFoundError:
                continue
            except (OSError, ValueError, TypeError) as exc:
                cmd, cid, error = None, fallback_id, f"malformed command file {path.name}: {exc}"
            if _safe(cid) in answered:
                self._move(path)  # its event exists: a crash came between the event and the move
                continue
            if cmd is not None and cmd.apply_at is not None and epoch is not None and batch is not None:
                if (epoch, batch) < cmd.apply_at:
                    continue
            self._taken[cid] = path
            out.append((cmd, cid, error))
        return out

    def ack(self, command_id: str) -> None:
        """The command's event is written: move its file out of the queue."""
        path = self._taken.pop(command_id, None)
        if path is not None:
            self._move(path)

    def _move(self, path: Path) -> None:
        try:
            os.replace(path, self.done / path.name)
        except FileNotFoundError:
            return
        except OSError:
            path.unlink(missing_ok=True)
        fsync_dir(self.dir)


def requeue_discarded(store: Store, run_id: str, last_epoch: int) -> list[str]:
    """Put back the commands applied in epochs after ``last_epoch`` (which a resume discards).

    Each goes back into the queue with ``apply_at`` = the batch where it was applied, and its event
    is removed: the resumed trainer applies it at the same point again and writes its event then.
    Control commands (pause, resume, stop) are history, not state, and stay as they are.

    Returns:
        The ids of the commands put back.
    """

    qdir = store.layout.commands_dir(run_id)
    done = qdir / "done"
    out = []
    for path in event_files(store.layout, run_id):
        try:
            rows = read_tables([path], EVENTS_SCHEMA).to_pylist()
        except Exception:  # a corrupt event file is not ours to judge here
            continue
        for row in rows:
            if row["epoch"] is None or int(row["epoch"]) <= last_epoch or row["kind"] in CONTROL_OPS:
                continue
            cid = str(row["event_id"])
            # in done/, or still queued (a crash between the event and the move out of the queue)
            found = [*sorted(done.glob(f"*-{cid}.json")), *sorted(qdir.glob(f"*-{cid}.json"))]
            src = found[0] if found else None
            if src is None:
                continue
            try:
                raw = json.loads(src.read_text())
            except (OSError, ValueError):
                continue
            raw["apply_at"] = [int(row["epoch"]), int(row["batch"])]
            # queue first, then drop the event, then the done copy: a crash between steps is
            # repaired by the next resume doing the same again
            atomic_write_json(qdir / src.name, raw, durable=True)
            path.unlink(missing_ok=True)
            fsync_dir(path.parent)
            if src.parent != qdir:
                src.unlink(missing_ok=True)
            out.append(cid)
    return out


def wait_for_event(store: Store, run_id: str, command_id: str, *, timeout_s: float = 30.0) -> dict[str, Any] | None:
    """Poll the run's events until the one for ``command_id`` appears; None on timeout."""
    deadline = time.time() + timeout_s
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in command_id)[:40]
    pull = getattr(store, "_pull_prefix", None)
    while True:
        if pull is not None:  # a store at a URL: fetch the run's new events
            pull(f"runs/{run_id}/tables/events/")
        files = [p for p in event_files(store.layout, run_id) if p.name.endswith(f"-{safe}.parquet")]
        if files:
            rows = read_tables(files, EVENTS_SCHEMA).to_pylist()
            for row in rows:
                if row["event_id"] == command_id:
                    return row
        if time.time() > deadline:
            return None
        time.sleep(0.05)
