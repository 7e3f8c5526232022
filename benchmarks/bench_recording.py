"""Recording overhead: epoch time of recorded training / plain `model.fit`, alternated in one run; bytes per epoch."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import dir_bytes, median, table  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--train-size", type=int, default=8000)
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="convnetjs")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)

    import keras
    import numpy as np
    import tensorflow as tf

    import revacnn
    from revacnn.config import TrainConfig
    from revacnn.data import load_dataset, select_probes
    from revacnn.models import build_model
    from revacnn.storage import RunWriter, create_session
    from revacnn.trainer.trainer import TrainData, Trainer

    tf.config.experimental.enable_op_determinism()
    ds = load_dataset("shapes", train_size=args.train_size, val_size=args.val_size, seed=0)
    x, xv = ds.x_train.astype("float32") / 255.0, ds.x_val.astype("float32") / 255.0

    keras.utils.set_random_seed(0)
    plain = build_model(args.model, ds.input_shape, ds.num_classes)
    plain.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])

    tmp = Path(tempfile.mkdtemp(prefix="revacnn-bench-"))
    store = revacnn.open_store(tmp / "store")
    cfg = TrainConfig(model=args.model, epochs=10**6, batch_size=args.batch_size, train_size=args.train_size,
                      val_size=args.val_size, probes=16)
    keras.utils.set_random_seed(0)
    model = build_model(args.model, ds.input_shape, ds.num_classes)
    opt = keras.optimizers.Adam(1e-3)
    opt.build(model.trainable_variables)
    pidx = select_probes(ds.y_val, 16, seed=0)
    sid = create_session(store, dataset="shapes", model=args.model, probe_images=ds.x_val[pidx],
                         probe_labels=ds.y_val[pidx], probe_indices=pidx, class_names=ds.class_names,
                         config=cfg.to_dict())
    writer = RunWriter.create(store, session_id=sid, config=cfg.to_dict(), name="bench")
    trainer = Trainer(model=model, optimizer=opt, loss_fn=keras.losses.SparseCategoricalCrossentropy(),
                      data=TrainData(ds.x_train, ds.y_train, ds.x_val, ds.y_val), probe_images=ds.x_val[pidx],
                      probe_labels=ds.y_val[pidx], writer=writer, config=cfg, progress=False)
    import time

    # warm-up: trace both
    plain.fit(x, ds.y_train, batch_size=args.batch_size, epochs=1, validation_data=(xv, ds.y_val), verbose=0)
    trainer.record(0, train_loss=None, train_acc=None, duration=0.0, n_batches=0)
    trainer._train_epoch(1)
    while trainer.recorder.committed[-1:] != [1]:
        time.sleep(0.01)

    t_plain: list[float] = []
    t_rec: list[float] = []
    t_rec_drained: list[float] = []
    epoch = 1
    for _ in range(args.rounds):
        for _ in range(2):
            t = time.perf_counter()
            plain.fit(x, ds.y_train, batch_size=args.batch_size, epochs=1, validation_data=(xv, ds.y_val),
                      verbose=0, shuffle=True)
            t_plain.append(time.perf_counter() - t)
        for i in range(2):
            epoch += 1
            t = time.perf_counter()
            trainer._train_epoch(epoch)
            t_rec.append(time.perf_counter() - t)
            if i == 1:  # wait for the worker so the next plain block is not slowed by our writes
                while trainer.recorder.pending() or (trainer.recorder.committed[-1:] != [epoch]):
                    time.sleep(0.005)
                t_rec_drained.append(time.perf_counter() - t + t_rec[-2])
    # the cost of exactness: the same recorded trainer with TF op determinism off, then on again
    t_det: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for det in (False, True):
            from tensorflow.python.framework import config as tf_config  # no public "disable"

            (tf_config.enable_op_determinism if det else tf_config.disable_op_determinism)()
            trainer.rebuild(carry=True)
            epoch += 1
            trainer._train_epoch(epoch)  # traces the new step
            epoch += 1
            t = time.perf_counter()
            trainer._train_epoch(epoch)
            t_det[det].append(time.perf_counter() - t)
    # the cost of durable commits: each epoch's writes (checkpoint, arrays, rows, marker) with the
    # fsyncs before the marker on and off, alternated epoch by epoch
    t_dur: dict[bool, list[float]] = {True: [], False: []}
    for i in range(max(5, args.rounds)):
        for durable in ((False, True) if i % 2 == 0 else (True, False)):
            writer.durable = durable
            epoch += 1
            trainer._train_epoch(epoch)
            while trainer.recorder.pending() or trainer.recorder.committed[-1:] != [epoch]:
                time.sleep(0.005)
            t_dur[durable].append(trainer.recorder.write_s[-1])
    writer.durable = True
    pair = [d / n for d, n in zip(t_dur[True], t_dur[False], strict=True)]
    trainer.recorder.close()
    writer.set_status("finished")
    run = store.run(writer.run_id)
    n_ep = len(run.epochs())
    arrays = dir_bytes(store.layout.arrays_dir(run.run_id)) / n_ep
    ckpt = dir_bytes(store.layout.run_dir(run.run_id) / "checkpoints") / n_ep
    tables = dir_bytes(store.layout.run_dir(run.run_id) / "tables") / n_ep
    res = {
        "model": args.model,
        "train_size": args.train_size,
        "plain_epoch_s": median(t_plain),
        "recorded_epoch_s": median(t_rec),
        "ratio": median(t_rec) / median(t_plain),
        "ratio_incl_worker_drain": median(t_rec_drained) / (2 * median(t_plain)),
        "bytes_per_epoch_arrays": arrays,
        "bytes_per_epoch_checkpoint": ckpt,
        "bytes_per_epoch_tables": tables,
        "worker_errors": len(trainer.recorder.errors),
        "determinism_cost_ratio": median(t_det[True]) / median(t_det[False]),
        "durable_commit_s": median(t_dur[True]),
        "non_durable_commit_s": median(t_dur[False]),
        "durable_commit_ratio": median(t_dur[True]) / median(t_dur[False]),
        "durable_ratio_spread": [min(pair), max(pair)],
    }
    print(table([res]))
    print(json.dumps(res))
    _ = np
    return res


if __name__ == "__main__":
    main()
