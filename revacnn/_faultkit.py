"""Fault-test kit shared by tests and ``benchmarks/bench_faults.py``: a child trainer, store checks, run equality.

The child (``python -m revacnn._faultkit train STORE ...``) trains a small built-in run on the
offline ``shapes`` data and queues one steering command with ``apply_at`` before training starts, so
every run with the same arguments, killed or not, is the same trajectory. It prints the run id
first. Set ``REVACNN_FAULT`` (see `revacnn._faults`) in its environment to kill it at a point.

Example:
    >>> proc = start_child(tmp / "store", epochs=3, env={"REVACNN_FAULT": "before_commit@2"})
    >>> run_id = proc.stdout.readline().strip(); proc.wait()
    >>> check_store(tmp / "store", run_id, expected=ref_counts)["half_epochs"]
    []
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: The command every child queues: freeze conv1 at epoch 2, batch 3 (a change resume must replay).
COMMAND = ("freeze", ["conv1"])
COMMAND_AT = (2, 3)
COMMAND_ID = "cmd-faultkit0001"


def child_args(*, epochs: int = 3, train_size: int = 256, val_size: int = 64, batch_size: int = 32,
               probes: int = 4, seed: int = 5, checkpoint_every: int = 1) -> list[str]:
    """The child's command-line arguments for a config."""
    return ["--epochs", str(epochs), "--train-size", str(train_size), "--val-size", str(val_size),
            "--batch-size", str(batch_size), "--probes", str(probes), "--seed", str(seed),
            "--checkpoint-every", str(checkpoint_every)]


def config(*, epochs: int = 3, train_size: int = 256, val_size: int = 64, batch_size: int = 32,
           probes: int = 4, seed: int = 5, checkpoint_every: int = 1) -> Any:
    """The `TrainConfig` the child trains (same defaults as `child_args`)."""
    from .config import TrainConfig

    return TrainConfig(dataset="shapes", model="convnetjs", epochs=epochs, train_size=train_size,
                       val_size=val_size, batch_size=batch_size, probes=probes, seed=seed, embeddings=False,
                       checkpoint_every=checkpoint_every)


def queue_command(store: Any, run_id: str) -> None:
    """Queue the kit's steering command for ``run_id`` (due at `COMMAND_AT`)."""
    from .steering import parse, send

    cmd = parse(COMMAND[0], COMMAND[1])
    cmd.command_id = COMMAND_ID
    cmd.apply_at = COMMAND_AT
    send(store, run_id, cmd)


def train_reference(path: str | os.PathLike[str], **kw: Any) -> tuple[Any, str]:
    """Train the uninterrupted reference run in this process; returns ``(store, run_id)``."""
    import revacnn

    from .trainer import train

    store = revacnn.open_store(path, durable=False)
    run = train(config(**kw), store, progress=False, on_start=lambda rid: queue_command(store, rid))
    return store, run.run_id


def start_child(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None,
                **kw: Any) -> subprocess.Popen[str]:
    """Start the child trainer (stdout: the run id, then nothing; stderr: discarded)."""
    full = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    full.setdefault("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
    return subprocess.Popen(
        [sys.executable, "-m", "revacnn._faultkit", "train", str(path), *child_args(**kw)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=full,
    )


def start_resume(path: str | os.PathLike[str], run_id: str, *, env: Mapping[str, str] | None = None,
                 ) -> subprocess.Popen[str]:
    """``revacnn resume RUN --quiet`` in a child process (stderr captured)."""
    full = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    full.setdefault("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
    return subprocess.Popen(
        [sys.executable, "-m", "revacnn.cli", "resume", "--store", str(path), run_id, "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full,
    )


# ---------------------------------------------------------------------------------------- checks
COUNTS_SQL = """
SELECT e.epoch,
  (SELECT count(*) FROM layers l WHERE l.run_id = e.run_id AND l.epoch = e.epoch) AS n_layers,
  (SELECT count(*) FROM filters f WHERE f.run_id = e.run_id AND f.epoch = e.epoch) AS n_filters,
  (SELECT count(*) FROM predictions p WHERE p.run_id = e.run_id AND p.epoch = e.epoch) AS n_predictions
FROM epochs e WHERE e.run_id = '{run_id}' ORDER BY e.epoch
"""


def row_counts(store: Any, run_id: str) -> dict[int, tuple[int, int, int]]:
    """Per visible epoch: its number of layers, filters and predictions rows (one SQL snapshot)."""
    df = store.sql(COUNTS_SQL.format(run_id=run_id))
    return {int(r.epoch): (int(r.n_layers), int(r.n_filters), int(r.n_predictions)) for r in df.itertuples()}


def half_epochs(counts: Mapping[int, tuple[int, int, int]], expected: Mapping[int, tuple[int, int, int]]) -> list[int]:
    """Epochs visible with other row counts than the reference's (an ``epochs`` row without the rest)."""
    return [e for e, c in counts.items() if expected.get(e) != c]


def check_store(path: str | os.PathLike[str], run_id: str, *, expected: Mapping[int, tuple[int, int, int]],
                seen: Sequence[int] = ()) -> dict[str, Any]:
    """What a kill left: does the store open, which epochs, lost ones, half ones, the run's status."""
    import revacnn

    store = revacnn.open_store(path, mode="r")
    run = store.run(run_id)
    epochs = run.epochs()
    counts = row_counts(store, run_id)
    if epochs:  # the last record's arrays read
        rec = run.epoch(epochs[-1])
        for name in rec.layer_names:
            layer = rec.layer(name)
            for key in ("kernel", "bias", "filter_uids"):
                if layer.has(key):
                    layer._get(key)
    return {
        "opens": True,
        "epochs": epochs,
        "lost": sorted(set(seen) - set(epochs)),
        "half_epochs": half_epochs(counts, expected),
        "contiguous": epochs == list(range(epochs[0], epochs[0] + len(epochs))) if epochs else True,
        "status": run.status,
    }


def run_differences(store_a: Any, run_a: str, store_b: Any, run_b: str) -> list[str]:
    """How two runs differ: epochs, per-epoch metrics, every layer's kernel and bias, the command's event.

    Returns:
        ``[]`` when they are the same run, bit for bit.
    """
    ra, rb = store_a.run(run_a), store_b.run(run_b)
    if ra.epochs() != rb.epochs():
        return [f"epochs {ra.epochs()} != {rb.epochs()}"]
    out = []
    cols = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "n_batches", "step"]
    ma = ra.table("epochs").sort_values("epoch")[cols].reset_index(drop=True)
    mb = rb.table("epochs").sort_values("epoch")[cols].reset_index(drop=True)
    if not ma.equals(mb):
        out.append(f"metrics differ:\n{ma}\n{mb}")
    for e in ra.epochs():
        a, b = ra.epoch(e), rb.epoch(e)
        if a.layer_names != b.layer_names:
            out.append(f"epoch {e}: layers {a.layer_names} != {b.layer_names}")
            continue
        for name in a.layer_names:
            la, lb = a.layer(name), b.layer(name)
            for key in ("kernel", "bias", "filter_uids", "frozen"):
                if la.has(key) and not np.array_equal(la._get(key), lb._get(key)):
                    out.append(f"epoch {e} {name}.{key} differs")
    ev = [_event_key(store_a, run_a), _event_key(store_b, run_b)]
    if ev[0] != ev[1]:
        out.append(f"command events differ: {ev[0]} != {ev[1]}")
    return out


def _event_key(store: Any, run_id: str) -> list[tuple[Any, ...]]:
    df = store.run(run_id).events()
    return sorted((r.event_id, r.kind, int(r.epoch), int(r.batch), r.status) for r in df.itertuples())


# ---------------------------------------------------------------------------------------- child
def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m revacnn._faultkit")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("store")
    for name in ("epochs", "train-size", "val-size", "batch-size", "probes", "seed", "checkpoint-every"):
        t.add_argument(f"--{name}", type=int)
    args = p.parse_args(argv)
    import revacnn

    from .trainer import train

    store = revacnn.open_store(args.store)

    def started(run_id: str) -> None:
        queue_command(store, run_id)
        print(run_id, flush=True)

    kw = {k: v for k, v in vars(args).items() if k not in ("cmd", "store") and v is not None}
    run = train(config(**kw), store, progress=False, on_start=started)
    return 0 if run.status == "finished" else 1


if __name__ == "__main__":
    sys.exit(_main())
