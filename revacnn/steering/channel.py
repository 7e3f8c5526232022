"""The command channel: a per-run queue of steering commands in the store, and waiting for their events."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ..storage import EVENTS_SCHEMA, Store, atomic_write_json, event_files, read_tables
from .commands import Command


def send(store: Store, run_id: str, command: Command) -> Command:
    """Queue ``command`` for the trainer of ``run_id`` (atomic file write, safe from any process)."""
    d = store.layout.commands_dir(run_id)
    name = f"{time.time_ns():020d}-{command.command_id}.json"
    atomic_write_json(d / name, command.to_json())
    return command


class CommandQueue:
    """The trainer's side of the channel: pops pending command files in the order they were sent."""

    def __init__(self, store: Store, run_id: str) -> None:
        self.dir = store.layout.commands_dir(run_id)
        self.done = self.dir / "done"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.done.mkdir(exist_ok=True)

    def pending(self) -> list[Path]:
        """Files waiting, oldest first (cheap: one directory scan)."""
        try:
            with os.scandir(self.dir) as it:
                names = [e.name for e in it if e.name.endswith(".json") and not e.name.startswith(".")]
        except FileNotFoundError:
            return []
        return [self.dir / n for n in sorted(names)]

    def pop(self) -> list[tuple[Command | None, str, str | None]]:
        """Take every pending command: ``(command or None, id, parse error or None)``."""
        out: list[tuple[Command | None, str, str | None]] = []
        for path in self.pending():
            fallback_id = path.stem.split("-", 1)[-1] or path.stem
            try:
                raw = json.loads(path.read_text())
                if not isinstance(raw, dict) or not isinstance(raw.get("op"), str):
                    raise ValueError("expected a JSON object with a string 'op'")
                args = raw.get("args") or {}
                if not isinstance(args, dict):
                    raise ValueError("'args' must be a JSON object")
                cmd = Command(
                    op=raw["op"],
                    args=args,
                    command_id=str(raw.get("command_id") or fallback_id),
                    sent_at=float(raw.get("sent_at") or time.time()),
                )
                out.append((cmd, cmd.command_id, None))
            except (OSError, ValueError, TypeError) as exc:
                out.append((None, fallback_id, f"malformed command file {path.name}: {exc}"))
            try:
                os.replace(path, self.done / path.name)
            except OSError:
                path.unlink(missing_ok=True)
        return out


def wait_for_event(store: Store, run_id: str, command_id: str, *, timeout_s: float = 30.0) -> dict[str, Any] | None:
    """Poll the run's events until the one for ``command_id`` appears; None on timeout."""
    deadline = time.time() + timeout_s
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in command_id)[:40]
    while True:
        files = [p for p in event_files(store.layout, run_id) if p.name.endswith(f"-{safe}.parquet")]
        if files:
            rows = read_tables(files, EVENTS_SCHEMA).to_pylist()
            for row in rows:
                if row["event_id"] == command_id:
                    return row
        if time.time() > deadline:
            return None
        time.sleep(0.05)
