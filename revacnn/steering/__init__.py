"""Steering: commands as plain data (`commands`), sent through the store (`channel`); model surgery.

Applying a command to a live trainer lives with the trainer (`revacnn.trainer.steer`).
"""

from __future__ import annotations

from .channel import CommandQueue, send, wait_for_event
from .commands import OPS, Command, parse

__all__ = ["OPS", "Command", "CommandQueue", "parse", "send", "wait_for_event"]
