"""Freezing: step time, and epoch time and accuracy of forks, with layers frozen vs none; steering command latency."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, table  # noqa: E402

CHAIN_VARIANTS = {"none": [], "conv1": ["conv1"], "conv1+conv2": ["conv1", "conv2"]}
#: resnet20: the stem and stage 1 (three basic blocks at 16 filters) are conv1..conv7
RESNET_VARIANTS = {"none": [], "stage 1": [f"conv{i}" for i in range(1, 8)]}


def variants_of(model: str) -> dict[str, list[str]]:
    return RESNET_VARIANTS if model == "resnet20" else CHAIN_VARIANTS


def freeze_experiment(store, model: str, train_size: int, fork_epoch: int, epochs: int, rounds: int,
                      val_size: int = 1000) -> list[dict]:
    """Whole recorded epochs of forks, frozen vs not, alternated; recording as a user gets it.

    The root and the forks record everything a default run records: the default probe count
    (`TrainConfig.probes`, 16), the validation pass over ``val_size`` images, t-SNE embeddings on.
    Two figures per epoch: ``duration_s`` (the epochs table's: the training batches, with the
    recorder's worker running beside them) and the wall time from the previous epoch's commit to
    this one's (training, validation, probes, snapshot and the record: what a user waits for).
    """
    import pandas as pd

    from revacnn.config import TrainConfig
    from revacnn.steering import parse
    from revacnn.trainer import fork, train

    cfg = TrainConfig(model=model, epochs=fork_epoch, train_size=train_size, val_size=val_size, seed=0,
                      name=f"{model}-root-{train_size}", embeddings=True)
    root = train(cfg, store, progress=False)
    variants = variants_of(model)
    times: dict[str, list[float]] = {v: [] for v in variants}
    ratios: dict[str, list[float]] = {v: [] for v in variants}
    walls: dict[str, list[float]] = {v: [] for v in variants}
    wall_ratios: dict[str, list[float]] = {v: [] for v in variants}
    acc: dict[str, list[float]] = {v: [] for v in variants}
    order = list(variants)
    for r in range(rounds):  # A B C, then C B A: side by side, drift cancels
        this_round: dict[str, float] = {}
        this_wall: dict[str, float] = {}
        for variant in order if r % 2 == 0 else order[::-1]:
            changes = [parse("freeze", [layer]) for layer in variants[variant]]
            child = fork(store, root.run_id, fork_epoch, changes=changes, epochs=fork_epoch + epochs,
                         name=f"{model}-{variant}-{train_size}-r{r}", progress=False)
            m = store.sql(f"SELECT epoch, duration_s, val_accuracy, committed_at FROM epochs "
                          f"WHERE run_id='{child.run_id}' AND epoch >= {fork_epoch} ORDER BY epoch")
            # the first epoch after the fork includes tracing the step: time the later ones
            wall = pd.to_datetime(m.committed_at).diff().dt.total_seconds().tolist()[2:]
            m = m[m.epoch > fork_epoch]
            timed = m.duration_s.tolist()[1:] or m.duration_s.tolist()
            times[variant].extend(timed)
            walls[variant].extend(wall)
            this_round[variant] = median(timed)
            this_wall[variant] = median(wall) if wall else float("nan")
            acc[variant].append(float(m.val_accuracy.iloc[-1]))
        for v in variants:  # the ratio within a round: both arms ran side by side
            ratios[v].append(this_round[v] / this_round["none"])
            wall_ratios[v].append(this_wall[v] / this_wall["none"])
    return [
        {"model": model, "train:val": f"{train_size}:{val_size}", "frozen": v, "epoch_s": median(times[v]),
         "ratio": median(ratios[v]), "ratio_min": min(ratios[v]), "ratio_max": max(ratios[v]),
         "wall_s": median(walls[v]), "wall_ratio": median(wall_ratios[v]),
         "wall_ratio_min": min(wall_ratios[v]), "wall_ratio_max": max(wall_ratios[v]),
         "samples": len(ratios[v]), "final_val_acc": median(acc[v])}
        for v in variants
    ]


def step_experiment(model_name: str, rounds: int, batch: int = 64, steps: int = 10) -> list[dict]:
    """The trainer's own train step alone (no recording, no data loading), frozen vs unfrozen, alternated.

    Both arms' steps are traced first (`revacnn.trainer.step.StepCache`), then each round times
    ``steps`` steps of every arm (A B, then B A); the ratio is taken within the round.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    from revacnn.models import build_model
    from revacnn.models.graph import recorded_layers
    from revacnn.trainer.step import LayerSpec, StepCache

    keras.utils.set_random_seed(0)
    model = build_model(model_name, (32, 32, 3), 4)
    opt = keras.optimizers.Adam(1e-3)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy())
    opt.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    n = batch * steps
    x_all = tf.constant(rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8))
    y_all = tf.constant(rng.integers(0, 4, n))
    cache = StepCache()
    variants = variants_of(model_name)
    fns = {}
    for v, frozen in variants.items():
        specs = [LayerSpec(r, r.name in frozen, None) for r in recorded_layers(model)]
        fns[v] = cache.steps(model, opt, specs, x_all=x_all, y_all=y_all)[0].step_idx
        fns[v](tf.range(batch, dtype=tf.int32))  # trace
    idx = [tf.range(b * batch, (b + 1) * batch, dtype=tf.int32) for b in range(steps)]
    times: dict[str, list[float]] = {v: [] for v in variants}
    order = list(variants)
    for r in range(rounds):
        for v in order if r % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            for i in idx:
                float(fns[v](i))
            times[v].append((time.perf_counter() - t) / steps)
    ratios = {v: [a / b for a, b in zip(times[v], times["none"], strict=True)] for v in variants}
    return [
        {"model": model_name, "frozen": v, "step_ms": 1e3 * median(times[v]), "ratio": median(ratios[v]),
         "ratio_min": min(ratios[v]), "ratio_max": max(ratios[v]),
         # the fastest samples are the least disturbed by other load on a shared machine
         "fastest_ratio": min(times[v]) / min(times["none"]), "samples": rounds}
        for v in variants
    ]


def command_latency(store, n_commands: int = 12) -> dict:
    """Send `set-lr` from a thread while training; measure sent → applied in ms and in batches."""
    import keras

    from revacnn.config import TrainConfig
    from revacnn.data import load_dataset, select_probes
    from revacnn.models import build_model
    from revacnn.steering import parse, send
    from revacnn.storage import RunWriter, create_session
    from revacnn.trainer.trainer import TrainData, Trainer

    ds = load_dataset("shapes", train_size=4000, val_size=500, seed=0)
    cfg = TrainConfig(epochs=3, train_size=4000, val_size=500, embeddings=False)
    keras.utils.set_random_seed(0)
    model = build_model("convnetjs", ds.input_shape, ds.num_classes)
    opt = keras.optimizers.Adam(1e-3)
    opt.build(model.trainable_variables)
    pidx = select_probes(ds.y_val, 16)
    sid = create_session(store, dataset="shapes", model="convnetjs", probe_images=ds.x_val[pidx],
                         probe_labels=ds.y_val[pidx], probe_indices=pidx, class_names=ds.class_names, config={})
    writer = RunWriter.create(store, session_id=sid, config=cfg.to_dict(), name="latency")
    trainer = Trainer(model=model, optimizer=opt, loss_fn=keras.losses.SparseCategoricalCrossentropy(),
                      data=TrainData.arrays(ds.x_train, ds.y_train, ds.x_val, ds.y_val), probe_images=ds.x_val[pidx],
                      probe_labels=ds.y_val[pidx], writer=writer, config=cfg, progress=False)
    sent: dict[str, tuple[int, int]] = {}

    def sender() -> None:
        while not trainer.recorder.committed or getattr(trainer, "epoch_in_progress", 0) < 1:
            time.sleep(0.05)
        time.sleep(0.5)
        for i in range(n_commands):
            cmd = parse("set-lr", [str(1e-3 * (1 + i % 2))])
            sent[cmd.command_id] = (trainer.epoch_in_progress, trainer.batch)
            send(store, writer.run_id, cmd)
            time.sleep(0.37)

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    trainer.run(start_epoch=0, epochs=cfg.epochs)
    t.join(5)
    ev = store.run(writer.run_id).events()
    nb = trainer.n_batches
    batches = [
        (row.epoch * nb + row.batch) - (sent[row.event_id][0] * nb + sent[row.event_id][1])
        for row in ev.itertuples() if row.event_id in sent
    ]
    return {"commands": len(ev), "applied": int((ev.status == "applied").sum()),
            "median_ms": float(ev.latency_ms.median()), "max_ms": float(ev.latency_ms.max()),
            "median_batches": median(batches), "max_batches": max(batches) if batches else None}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=2, help="epochs per fork after the fork point")
    p.add_argument("--fork-epoch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5, help="alternated rounds (samples per arm)")
    p.add_argument("--models", default="convnetjs,revacnn,resnet20")
    p.add_argument("--resnet-sizes", default="5000:1000,1000:1000",
                   help="resnet20 train:val sizes of the whole-epoch arm, comma-separated: the first "
                        "keeps CIFAR-10's 5:1 proportion, the second is the small subset of earlier figures")
    p.add_argument("--val-size", type=int, default=1000, help="validation images of the chain models")
    p.add_argument("--no-epochs", action="store_true", help="the step-level comparison only")
    p.add_argument("--no-step", action="store_true", help="whole epochs only, without the step-level comparison")
    p.add_argument("--no-latency", action="store_true")
    args = p.parse_args(argv)
    import revacnn

    store = revacnn.open_store(Path(tempfile.mkdtemp(prefix="revacnn-freeze-")) / "store")
    step_rows = []
    for model in [] if args.no_step else args.models.split(","):  # the step alone: what freezing saves in compute
        step_rows += step_experiment(model, max(args.rounds, 5) * 2)
        print(table(step_rows[-len(variants_of(model)):]), f"load average {os.getloadavg()}", flush=True)
    rows = []
    for model in [] if args.no_epochs else args.models.split(","):  # whole epochs of forks, recording on
        sizes = ([tuple(int(n) for n in pair.split(":")) for pair in args.resnet_sizes.split(",")]
                 if model == "resnet20" else [(args.train_size, args.val_size)])
        for train_size, val_size in sizes:
            rows += freeze_experiment(store, model, train_size, args.fork_epoch, args.epochs, args.rounds,
                                      val_size=val_size)
            print(table(rows[-len(variants_of(model)):]), f"load average {os.getloadavg()}", flush=True)
    print(table(step_rows))
    print(table(rows))
    out = {"step": step_rows, "freeze": rows}
    if not args.no_latency:
        lat = command_latency(store)
        print(table([lat]))
        out["latency"] = lat
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
