"""Steering: commands sent through the store to a live trainer, and the exact model surgery behind them."""

from __future__ import annotations

from .channel import Command, CommandQueue, send, wait_for_event
from .ops import OPS, apply, parse

__all__ = ["OPS", "Command", "CommandQueue", "apply", "parse", "send", "wait_for_event"]
