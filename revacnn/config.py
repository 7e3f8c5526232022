"""Training configuration: one dataclass with commented defaults, saved with every run and checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

OPTIMIZERS = ("adam", "sgd")


@dataclass
class TrainConfig:
    """Everything needed to (re)create a run's training. Travels with the run and its checkpoints.

    Example:
        >>> cfg = TrainConfig(dataset="shapes", model="convnetjs", epochs=5, train_size=5000)
        >>> cfg.validate()
    """

    dataset: str = "shapes"  # shapes (offline, generated) | cifar10 | mnist | fashion_mnist | custom
    data_dir: str | None = None  # local copy of a dataset (cifar10: cifar-10-batches-py or the .tar.gz)
    model: str = "convnetjs"  # convnetjs (fast default) | revacnn | resnet20 | MODULE:FUNCTION | custom
    epochs: int = 10  # total epochs of the run's history (a fork continues up to this epoch)
    batch_size: int = 64  # examples per gradient step
    lr: float = 1e-3  # learning rate (steerable while running)
    optimizer: str = "adam"  # adam | sgd (with momentum below)
    momentum: float = 0.9  # SGD momentum
    train_size: int | None = 10000  # subsample of the training split (None: all of it)
    val_size: int | None = 2000  # subsample of the validation split (None: all of it)
    probes: int = 16  # probe images recorded every epoch, spread over the classes
    seed: int = 0  # weights, data order, dropout and probe choice all derive from it
    name: str | None = None  # a human name for the run (default: its id)
    deterministic: bool = True  # TF op determinism: forks and resumes replay bit-exactly
    embedding_features: str = "weights"  # node-level t-SNE features: weights | activations | gradients
    embeddings: bool = True  # compute t-SNE embeddings (in a worker, off the training hot path)
    live_every_s: float = 1.0  # period of the live snapshot for the live app (0 disables it)
    auto_freeze: bool = False  # freeze converged conv layers bottom-up, as events (docs/diagnoses.md)
    checkpoint_every: int = 1  # exact checkpoint every K epochs (and first, last, fork points); others replay
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, e.g. what a fork changed
    runtime: dict[str, Any] = field(default_factory=dict)  # threads and oneDNN setting it ran under

    def validate(self) -> TrainConfig:
        """Check every value; raise `ConfigError` naming the first bad one."""
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ConfigError(f"Received: epochs={self.epochs!r} (expected an integer >= 0)")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"Received: batch_size={self.batch_size!r} (expected an integer >= 1)")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"Received: lr={self.lr!r} (expected a number > 0)")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"Received: optimizer={self.optimizer!r} (expected one of {', '.join(OPTIMIZERS)})"
            )
        for key in ("train_size", "val_size"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"Received: {key}={v!r} (expected an integer >= 1, or all)")
        if not isinstance(self.probes, int) or self.probes < 1:
            raise ConfigError(f"Received: probes={self.probes!r} (expected an integer >= 1)")
        check_checkpoint_every(self.checkpoint_every)
        if self.embedding_features not in ("weights", "activations", "gradients"):
            raise ConfigError(
                f"Received: embedding_features={self.embedding_features!r} "
                "(expected weights, activations or gradients)"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def check_checkpoint_every(value: Any) -> int:
    """``value`` as a checkpoint retention K (an integer >= 1), else `ConfigError`.

    Example:
        >>> check_checkpoint_every(5)
        5
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"Received: checkpoint_every={value!r} (expected an integer >= 1: an exact checkpoint every K epochs)"
        )
    return value
