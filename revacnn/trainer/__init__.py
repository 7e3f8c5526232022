"""The recording trainer: compiled step, epoch recorder, checkpoints, and the fit/train/resume/fork entry points."""

from __future__ import annotations

from .fit import fit, fork, resume, train
from .trainer import TrainData, Trainer, TrainerState

__all__ = ["TrainData", "Trainer", "TrainerState", "fit", "fork", "resume", "train"]
