"""Where a recorded epoch's time goes: the training thread's and the recording worker's parts, per epoch.

Builds the trainer of ``bench_recording.py`` (``shapes`` subset, batch 64, 16 probes, live
snapshots every second), trains a few recorded epochs, and times each part of the recording with
wrappers: on the training thread the validation pass, the probe forward passes, the gradient-sum
read, the kernel copies and the checkpoint capture; on the worker the live snapshot writes, the
per-layer measures, the doctor, the t-SNE embeddings (per layer and the layer-level one), the
checkpoint, the Zarr arrays, the Parquet rows and the commit. Both wall and thread CPU seconds
are given (CPU is what the worker takes from training on 2 cores), as medians over the epochs
after the first two (the first ones trace and run cold t-SNE).

Usage: ``python benchmarks/profile_recording.py --models convnetjs,resnet20 --epochs 6``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, table  # noqa: E402
from bench_recording import SIZES, build_trainer  # noqa: E402

_acc: dict[str, list[float]] = defaultdict(list)
_lock = threading.Lock()


def _wrap(obj: Any, attr: str, label: str | Any) -> None:
    fn = getattr(obj, attr)

    def timed(*a: Any, **k: Any) -> Any:
        t, c = time.perf_counter(), time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            name = label(a, k) if callable(label) else label
            with _lock:
                _acc[name + " wall"].append(time.perf_counter() - t)
                _acc[name + " cpu"].append(time.thread_time() - c)

    setattr(obj, attr, timed)


def _instrument(trainer: Any) -> None:
    from revacnn import analysis
    from revacnn.analysis.embedding import EmbeddingTracker
    from revacnn.storage import live as live_mod
    from revacnn.trainer import recorder as rec_mod
    from revacnn.trainer import trainer as tr_mod

    w = trainer.writer
    _wrap(trainer, "evaluate", "train: validation pass")
    _wrap(trainer, "probe", "train: probe forward (live + record)")
    _wrap(trainer.step_state, "take_grad_l1", "train: read grad sums")
    _wrap(tr_mod, "capture", "train: checkpoint capture")
    _wrap(trainer, "snapshot", "train: snapshot total")
    _wrap(trainer, "_publish_live", "train: live publish total")
    _wrap(live_mod, "write_live_snapshot", "worker: live snapshot write")
    _wrap(rec_mod.Recorder, "_write_epoch", "worker: epoch total")
    _wrap(rec_mod.Recorder, "_diagnose", "worker: doctor")
    _wrap(EmbeddingTracker, "embed_many",
          lambda a, k: "worker: t-SNE layer-level" if a[1][0][0] == "__all__" else "worker: t-SNE per layer")
    for f in ("cluster_score", "activation_signature", "filter_features", "rgb_shares"):
        _wrap(analysis, f, "worker: patterns")
    _wrap(w, "write_checkpoint", "worker: checkpoint write")
    _wrap(w, "write_arrays", "worker: zarr arrays")
    _wrap(w, "write_rows", "worker: parquet rows")
    _wrap(w, "commit", "worker: commit (sync + marker)")
    _wrap(rec_mod, "to_bytes", "worker: checkpoint to_bytes")
    _wrap(trainer.recorder, "tracker_state", "worker: tracker/doctor state")
    _wrap(trainer.recorder, "doctor_state", "worker: tracker/doctor state")
    # the live snapshot is queued with the function object taken at call time: patched above


def _child_cpu() -> float:
    """CPU seconds (user + system) of the t-SNE child process so far; 0 when it does not run."""
    import os

    from revacnn.analysis.tsne_process import shared_process

    pid = shared_process().pid
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def profile(name: str, epochs: int, batch_size: int) -> list[dict[str, Any]]:
    from revacnn.data import load_dataset

    n_train, n_val = SIZES[name]
    ds = load_dataset("shapes", train_size=n_train, val_size=n_val, seed=0)
    trainer = build_trainer(name, ds, batch_size)
    trainer.config.live_every_s = 1.0
    _acc.clear()
    _instrument(trainer)
    per_epoch: list[dict[str, float]] = []
    child_cpu = _child_cpu()
    trainer.record(0, train_loss=None, train_acc=None, duration=0.0, n_batches=0)
    for epoch in range(1, epochs + 1):
        before = {k: len(v) for k, v in _acc.items()}
        t0 = time.perf_counter()
        trainer._train_epoch(epoch)
        t_train = time.perf_counter() - t0
        while epoch not in trainer.recorder.committed:
            if trainer.recorder.errors:
                raise RuntimeError(trainer.recorder.errors[-1])
            time.sleep(0.002)
        sums = {k: sum(v[before.get(k, 0):]) for k, v in list(_acc.items())}
        child_now = _child_cpu()
        sums["worker: t-SNE child process cpu"] = child_now - child_cpu
        child_cpu = child_now
        sums["epoch until committed wall"] = time.perf_counter() - t0
        sums["train thread epoch wall"] = t_train
        per_epoch.append(sums)
        print(f"{name} epoch {epoch}: {sums['epoch until committed wall']:.2f}s", file=sys.stderr, flush=True)
    trainer.recorder.close()
    trainer.writer.set_status("finished")
    keep = per_epoch[2:] or per_epoch
    labels = sorted({k.rsplit(" ", 1)[0] for e in keep for k in e})
    rows = []
    for lab in labels:
        rows.append({
            "model": name,
            "part": lab,
            "wall_s": median(e.get(lab + " wall", 0.0) for e in keep),
            "cpu_s": median(e.get(lab + " cpu", 0.0) for e in keep) if any(lab + " cpu" in e for e in keep) else None,
        })
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="convnetjs,resnet20")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    rows: list[dict[str, Any]] = []
    for m in args.models.split(","):
        rows += profile(m, args.epochs, args.batch_size)
    print(table(rows, ["model", "part", "wall_s", "cpu_s"]))
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
