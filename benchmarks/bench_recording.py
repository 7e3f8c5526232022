"""Recording overhead: a recorded epoch (worker included, until committed) vs a tuned model.fit and vs recording off.

For each model (convnetjs, resnet20) on a subset of the offline ``shapes`` set sized for epochs
of about 5-10 s on the 2-core machine (``SIZES``: convnetjs 8,000 / 1,000 images, resnet20
2,000 / 500; ``--train-size`` to change), four arms train the same architecture, alternated in
one process (ABCD, DCBA, ... so that the load of other jobs hits every arm):

* ``fit``: the user's own ``model.fit`` on a prefetched ``tf.data`` pipeline (shuffled, batched,
  ``prefetch(AUTOTUNE)``), with ``steps_per_execution`` tuned (the fastest of a few values) and
  the same validation data every epoch. The epoch is timed inside ``fit`` (``on_epoch_begin`` to
  ``on_epoch_end``, validation included, per-call set-up excluded).
* ``recorded``: the revacnn trainer on the same data, one recorded epoch, timed from the epoch's
  start until the recording worker has committed it (probes, t-SNE embeddings, doctor,
  checkpoint, arrays, tables), with live snapshots every second as in a real run. The worker
  starts at the epoch's end, so this is training plus the whole worker, one after the other.
* ``off``: the same trainer with recording off (validation still evaluated; no probes, snapshot,
  worker or live snapshots; the in-step gradient sums stay, they are part of the step).
* ``pipelined``: two recorded epochs back to back until the second is committed, per epoch: as a
  run goes, the worker writes epoch k while epoch k+1 trains.

Reported: median epoch seconds and spread (min-max) over ``--samples`` alternated samples, the
ratios recorded/fit and recorded/off (target <= 1.10), the same for pipelined, and the load
average before and after. Recording costs a fixed amount per epoch (probes, t-SNE, writes:
independent of the training-set size), so the ratios fall as epochs grow. ``--durable`` also
times durable vs non-durable commits. ``profile_recording.py`` breaks the worker's time down.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, table  # noqa: E402

#: training / validation images per model: epochs of about 5-10 s on the 2-core machine
SIZES = {"convnetjs": (8000, 1000), "resnet20": (2000, 500)}


def build_trainer(name: str, ds: Any, batch_size: int, probes: int = 16) -> Any:
    """A recording `Trainer` of model ``name`` on dataset ``ds`` in a fresh temporary store."""
    import keras

    import revacnn
    from revacnn.config import TrainConfig
    from revacnn.data import select_probes
    from revacnn.models import build_model
    from revacnn.storage import RunWriter, create_session
    from revacnn.trainer.trainer import TrainData, Trainer

    x, y, xv, yv = ds.x_train, ds.y_train, ds.x_val, ds.y_val
    tmp = Path(tempfile.mkdtemp(prefix="revacnn-bench-"))
    store = revacnn.open_store(tmp / "store")
    cfg = TrainConfig(model=name, epochs=10**6, batch_size=batch_size, train_size=len(x), val_size=len(xv),
                      probes=probes)
    keras.utils.set_random_seed(0)
    model = build_model(name, ds.input_shape, ds.num_classes)
    opt = keras.optimizers.Adam(1e-3)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    opt.build(model.trainable_variables)
    pidx = select_probes(yv, probes, seed=0)
    sid = create_session(store, dataset="shapes", model=name, probe_images=xv[pidx], probe_labels=yv[pidx],
                         probe_indices=pidx, class_names=ds.class_names, config=cfg.to_dict())
    writer = RunWriter.create(store, session_id=sid, config=cfg.to_dict(), name="bench")
    return Trainer(model=model, optimizer=opt, data=TrainData.arrays(x, y, xv, yv), probe_images=xv[pidx],
                   probe_labels=yv[pidx], writer=writer, config=cfg, progress=False)


def _bench_model(name: str, samples: int, batch_size: int, spe_choices: list[int],
                 sizes: tuple[int, int] | None = None, durable_samples: bool = False,
                 arm_names: tuple[str, ...] = ("fit", "recorded", "off", "pipelined")) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from revacnn.data import load_dataset
    from revacnn.models import build_model

    n_train, n_val = sizes or SIZES[name]
    ds = load_dataset("shapes", train_size=n_train, val_size=n_val, seed=0)
    x, y, xv, yv = ds.x_train, ds.y_train, ds.x_val, ds.y_val  # uint8 as given; the models rescale

    def pipeline() -> tuple[tf.data.Dataset, tf.data.Dataset]:
        train = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0).batch(batch_size)
                 .prefetch(tf.data.AUTOTUNE))
        val = tf.data.Dataset.from_tensor_slices((xv, yv)).batch(500).prefetch(tf.data.AUTOTUNE)
        return train, val

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.times: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self._t)

    # (a) the user's model.fit, steps_per_execution tuned on two epochs each
    train_ds, val_ds = pipeline()
    best = None
    for spe in spe_choices:
        keras.utils.set_random_seed(0)
        m = build_model(name, ds.input_shape, ds.num_classes)
        m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], steps_per_execution=spe)
        cb = EpochTimer()
        m.fit(train_ds, validation_data=val_ds, epochs=2, verbose=0, callbacks=[cb])
        if best is None or cb.times[-1] < best[1]:
            best = (spe, cb.times[-1], m)
    spe, _, plain = best
    fit_timer = EpochTimer()

    # (b)/(c) the recording trainer (recording on, then the same trainer with it off)
    trainer = build_trainer(name, ds, batch_size)
    writer = trainer.writer
    snapshot, submit = trainer.snapshot, trainer.recorder.submit

    from revacnn.analysis import embedding

    tracker = trainer.recorder.tracker
    runner = tracker.runner if tracker is not None else None
    exact_max = embedding.EXACT_MAX

    def recording(on: bool, old: bool = False) -> None:
        """Recording on or off; ``old``: t-SNE as before issue 11's child process (in-thread, openTSNE only)."""
        if tracker is not None:
            tracker.runner = None if old else runner
        embedding.EXACT_MAX = 0 if old else exact_max
        trainer.snapshot = snapshot if on else (lambda *a, **k: None)
        trainer.recorder.submit = submit if on else (lambda s: None)
        trainer.config.live_every_s = 1.0 if on else 0.0

    def wait_commit(epoch: int) -> None:
        while epoch not in trainer.recorder.committed:
            if trainer.recorder.errors:
                raise RuntimeError(trainer.recorder.errors[-1])
            time.sleep(0.002)

    trainer.record(0, train_loss=None, train_acc=None, duration=0.0, n_batches=0)
    epoch = 0
    for on in (True, False):  # warm-up: trace the steps, start the worker
        recording(on)
        epoch += 1
        trainer._train_epoch(epoch)
        if on:
            wait_commit(epoch)

    def run_fit() -> float:
        plain.fit(train_ds, validation_data=val_ds, epochs=1, verbose=0, callbacks=[fit_timer])
        return fit_timer.times[-1]

    def run_trainer(on: bool, n: int = 1, old: bool = False) -> float:
        """``n`` epochs back to back, until the last one is committed (recording on), per epoch."""
        nonlocal epoch
        recording(on, old)
        t0 = time.perf_counter()
        for _ in range(n):
            epoch += 1
            trainer._train_epoch(epoch)
        if on:
            wait_commit(epoch)
        return (time.perf_counter() - t0) / n

    all_arms = {
        "fit": run_fit,
        "recorded": lambda: run_trainer(True),
        "off": lambda: run_trainer(False),
        "pipelined": lambda: run_trainer(True, 2),
        "old": lambda: run_trainer(True, old=True),
    }
    arms = {k: all_arms[k] for k in arm_names}
    t: dict[str, list[float]] = {k: [] for k in arms}
    load = [os.getloadavg()[0]]
    for i in range(samples):
        print(f"{name}: sample {i + 1}/{samples}", file=sys.stderr, flush=True)
        for k in (list(arms) if i % 2 == 0 else list(arms)[::-1]):  # ABCD, DCBA, ...
            t[k].append(arms[k]())
    load.append(os.getloadavg()[0])
    # the cost of durable commits (opt-in): each epoch's writes (checkpoint, arrays, rows, marker)
    # with the fsyncs before the marker on and off, alternated epoch by epoch
    recording(True)
    t_dur: dict[bool, list[float]] = {True: [], False: []}
    for i in range(samples if durable_samples else 0):
        for durable in ((False, True) if i % 2 == 0 else (True, False)):
            writer.durable = durable
            epoch += 1
            trainer._train_epoch(epoch)
            wait_commit(epoch)
            t_dur[durable].append(trainer.recorder.write_s[-1])
    writer.durable = True
    pair = [d / n for d, n in zip(t_dur[True], t_dur[False], strict=True)] or [float("nan")]
    trainer.recorder.close()
    writer.set_status("finished")
    med = {k: median(v) for k, v in t.items()}
    res = {
        "model": name,
        "train_size": n_train,
        "val_size": n_val,
        "steps_per_execution": spe,
        "samples": samples,
        **{f"{k}_epoch_s": med[k] for k in t},
        **{f"{k}_spread_s": f"{min(v):.2f}-{max(v):.2f}" for k, v in t.items()},
        **{f"{k}_vs_{ref}": med[k] / med[ref] for k in ("recorded", "pipelined", "old") for ref in ("fit", "off")
           if k in med and ref in med},
        "loadavg": f"{load[0]:.1f}-{load[1]:.1f}",
        "worker_errors": len(trainer.recorder.errors),
    }
    if durable_samples:
        res.update({
            "durable_commit_s": median(t_dur[True]),
            "non_durable_commit_s": median(t_dur[False]),
            "durable_commit_ratio": median(t_dur[True]) / median(t_dur[False]),
            "durable_ratio_spread": f"{min(pair):.2f}-{max(pair):.2f}",
        })
    _ = np
    return res


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="convnetjs,resnet20")
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--spe", default="1,16", help="steps_per_execution values to tune fit over")
    p.add_argument("--train-size", type=int, default=None, help="override the per-model training subset")
    p.add_argument("--val-size", type=int, default=None, help="override the per-model validation subset")
    p.add_argument("--arms", default="fit,recorded,off,pipelined",
                   help="arms to alternate; 'old' is recorded with t-SNE in-thread and openTSNE only (before issue 11)")
    p.add_argument("--durable", action="store_true", help="also time durable vs non-durable commits")
    args = p.parse_args(argv)
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()  # as revacnn runs by default, for every variant
    rows = []
    for m in args.models.split(","):
        sizes = None
        if args.train_size:
            sizes = (args.train_size, args.val_size or SIZES[m][1])
        rows.append(_bench_model(m, args.samples, args.batch_size, [int(s) for s in args.spe.split(",")], sizes,
                                 durable_samples=args.durable, arm_names=tuple(args.arms.split(","))))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(table(rows))
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
