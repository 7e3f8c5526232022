"""Recording overhead under tf.distribute: MirroredStrategy on two logical CPU devices, recording on vs off.

One trainer under ``MirroredStrategy`` over two logical CPU devices (``--devices``) trains the
convnetjs model on a subset of the offline ``shapes`` set; two variants alternate epoch by epoch:

* ``recorded``: the revacnn step (gradients, loss and hit counts all-reduced in one collective,
  per-filter gradient L1 of the global-batch gradient) and the epoch record (probes, checkpoint,
  arrays, tables; t-SNE with ``--embeddings``), timed until the recording worker has committed it.
* ``off``: the same strategy with recording off: Keras' own replicated update (the optimizer
  all-reduces the gradients; no in-step sums), no epoch record. Validation runs in both.

Reported: median epoch seconds and spread (min-max) over ``--samples`` alternated samples, and
the ratio recorded/off (target <= 1.10). ``loop_ratio`` leaves out the wait for the worker's
commit (what the training loop pays when the worker keeps up: it writes while the next epoch
trains); ``step_ratio`` is the train step alone (recorded step vs plain step over one epoch's
batches, no record), to separate the step's cost from the record's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, table  # noqa: E402

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def _bench(samples: int, batch_size: int, n_train: int, n_val: int, devices: int, embeddings: bool) -> dict:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
    tf.config.experimental.enable_op_determinism()
    import keras

    import revacnn
    from revacnn.config import TrainConfig
    from revacnn.data import load_dataset, select_probes
    from revacnn.models import build_model
    from revacnn.storage import RunWriter, create_session
    from revacnn.trainer.distribute import build_distributed_step
    from revacnn.trainer.trainer import TrainData, Trainer

    strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    ds = load_dataset("shapes", train_size=n_train, val_size=n_val, seed=0)
    x, y, xv, yv = ds.x_train, ds.y_train, ds.x_val, ds.y_val
    tmp = Path(tempfile.mkdtemp(prefix="revacnn-bench-dist-"))
    store = revacnn.open_store(tmp / "store")
    cfg = TrainConfig(model="convnetjs", epochs=10**6, batch_size=batch_size, train_size=n_train, val_size=n_val,
                      probes=16, embeddings=embeddings)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_model("convnetjs", ds.input_shape, ds.num_classes)
        opt = keras.optimizers.Adam(1e-3)
        model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
        opt.build(model.trainable_variables)
    pidx = select_probes(yv, 16, seed=0)
    sid = create_session(store, dataset="shapes", model="convnetjs", probe_images=xv[pidx], probe_labels=yv[pidx],
                         probe_indices=pidx, class_names=ds.class_names, config=cfg.to_dict())
    writer = RunWriter.create(store, session_id=sid, config=cfg.to_dict(), name="bench-dist")
    trainer = Trainer(model=model, optimizer=opt, data=TrainData.arrays(x, y, xv, yv), probe_images=xv[pidx],
                      probe_labels=yv[pidx], writer=writer, config=cfg, progress=False, strategy=strategy)
    snapshot, submit = trainer.snapshot, trainer.recorder.submit
    rec_step = trainer._step
    plain_step = build_distributed_step(strategy, trainer.model, trainer.optimizer, trainer.specs, None)

    def recording(on: bool) -> None:
        trainer._step = rec_step if on else plain_step
        trainer.snapshot = snapshot if on else (lambda *a, **k: None)
        trainer.recorder.submit = submit if on else (lambda s: None)
        trainer.config.live_every_s = 1.0 if on else 0.0

    def wait_commit(epoch: int) -> None:
        while epoch not in trainer.recorder.committed:
            if trainer.recorder.errors:
                raise RuntimeError(trainer.recorder.errors[-1])
            time.sleep(0.002)

    def steps_only(step) -> float:
        order = trainer.order(1)
        t0 = time.perf_counter()
        for b in range(0, len(x), batch_size):
            idx = order[b : b + batch_size]
            step(x[idx], y[idx])
        return time.perf_counter() - t0

    trainer.record(0, train_loss=None, train_acc=None, duration=0.0, n_batches=0)
    epoch = 0
    for on in (True, False):  # warm-up: trace both steps, start the worker
        recording(on)
        epoch += 1
        trainer._train_epoch(epoch)
        if on:
            wait_commit(epoch)
    t: dict[str, list[float]] = {"recorded": [], "off": []}
    s: dict[str, list[float]] = {"recorded": [], "off": []}
    loop: dict[str, list[float]] = {"recorded": [], "off": []}
    for i in range(samples):
        print(f"sample {i + 1}/{samples}", file=sys.stderr, flush=True)
        for on in ((True, False) if i % 2 == 0 else (False, True)):
            recording(on)
            epoch += 1
            t0 = time.perf_counter()
            trainer._train_epoch(epoch)
            loop["recorded" if on else "off"].append(time.perf_counter() - t0)
            if on:
                wait_commit(epoch)
            t["recorded" if on else "off"].append(time.perf_counter() - t0)
        for on in ((True, False) if i % 2 == 0 else (False, True)):
            s["recorded" if on else "off"].append(steps_only(rec_step if on else plain_step))
    trainer.recorder.close()
    writer.set_status("finished")
    med = {k: median(v) for k, v in t.items()}
    pair = [a / b for a, b in zip(t["recorded"], t["off"], strict=True)]
    return {
        "model": "convnetjs",
        "replicas": strategy.num_replicas_in_sync,
        "train_size": n_train,
        "global_batch": batch_size,
        "samples": samples,
        "embeddings": embeddings,
        **{f"{k}_epoch_s": med[k] for k in t},
        **{f"{k}_spread_s": f"{min(v):.2f}-{max(v):.2f}" for k, v in t.items()},
        "ratio": med["recorded"] / med["off"],
        "ratio_spread": f"{min(pair):.2f}-{max(pair):.2f}",
        "loop_ratio": median(loop["recorded"]) / median(loop["off"]),
        "step_ratio": median(s["recorded"]) / median(s["off"]),
        "step_s": f"{median(s['recorded']):.3f} vs {median(s['off']):.3f}",
        "worker_errors": len(trainer.recorder.errors),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="the global batch")
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--val-size", type=int, default=500)
    p.add_argument("--devices", type=int, default=2, help="logical CPU devices (replicas)")
    p.add_argument("--embeddings", action="store_true", help="t-SNE embeddings in the record too")
    args = p.parse_args(argv)
    rows = [_bench(args.samples, args.batch_size, args.train_size, args.val_size, args.devices, args.embeddings)]
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(table(rows))
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
