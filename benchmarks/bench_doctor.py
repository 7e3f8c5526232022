"""The filter doctor: auto-freeze against no freezing (time saved, accuracy), and detection precision/recall.

Part 1 warms the process up with a throwaway epoch, then trains each model from the same seed twice, with and without ``--auto-freeze``, alternating
the order per seed (A B, then B A) so drift on a shared machine cancels, and reports the training
time saved (the sum of the epochs' ``duration_s``; wall time including the recording worker; and
the process's CPU time, which other jobs on a shared machine disturb far less than wall time)
and the difference in final validation accuracy. Target: >= 30 % saved, <= 1 point lost (FreezeOut
reports about 20 % on CIFAR). Both arms train as a careful user would (``--lr-schedule cosine``, the
default): `revacnn.fit` of the model compiled with Adam on a cosine-decayed learning rate
(``keras.optimizers.schedules.CosineDecay`` from 1e-3 to 0 over the planned steps); the arms differ in
``auto_freeze`` only. ``--lr-schedule constant`` trains with ``revacnn train``'s constant Adam 1e-3.

Part 2 plants dead filters (a large negative bias) and duplicated filters into a trained network's
conv layers and asks the doctor to find them: precision and recall over every planted and every
reported filter (target >= 0.9 each).

    python benchmarks/bench_doctor.py [--models convnetjs resnet20] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, table  # noqa: E402

SIZES = {  # model -> (train_size, epochs): long enough for layers to converge, short enough for 2 cores
    "convnetjs": (10000, 20),  # ~2 s an epoch on 2 idle cores
    "resnet20": (1000, 24),  # ~3 s an epoch (idle); 10 epochs: no layer read converged yet
}
VAL_SIZE = 2000  # 1 point = 20 images


def warm_up(store, model: str) -> None:
    """One throwaway epoch, so that the first measured arm does not pay the process's warm-up
    (TensorFlow's and oneDNN's first calls: measured 2.1 s against 0.8 s for convnetjs' epoch 1)."""
    from revacnn.config import TrainConfig
    from revacnn.trainer import train

    train(TrainConfig(model=model, epochs=1, train_size=500, val_size=100, seed=99, embeddings=False,
                      live_every_s=0, name=f"{model}-warm-up"), store, progress=False)


def train_arm(store, model: str, seed: int, auto: bool, schedule: str):
    """One arm: the same model, data and seed; ``auto`` only decides ``auto_freeze``."""
    from revacnn.config import TrainConfig
    from revacnn.trainer import train

    train_size, epochs = SIZES[model]
    name = f"{model}-s{seed}-{'auto' if auto else 'plain'}"
    if schedule == "constant":
        cfg = TrainConfig(model=model, epochs=epochs, train_size=train_size, val_size=VAL_SIZE, seed=seed,
                          embeddings=False, auto_freeze=auto, live_every_s=0, name=name)
        return train(cfg, store, progress=False)
    import keras

    import revacnn
    from revacnn.data import load_dataset
    from revacnn.models import build_model

    ds = load_dataset("shapes", train_size=train_size, val_size=VAL_SIZE, seed=seed)
    keras.utils.set_random_seed(seed)
    net = build_model(model, ds.input_shape, ds.num_classes)
    steps = epochs * -(-len(ds.x_train) // 64)
    net.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-3, steps)),
                loss=keras.losses.SparseCategoricalCrossentropy())
    return revacnn.fit(net, (ds.x_train, ds.y_train), validation_data=(ds.x_val, ds.y_val), epochs=epochs,
                       batch_size=64, store=store, name=name, seed=seed, progress=False, embeddings=False,
                       auto_freeze=auto)


def auto_freeze_pair(store, model: str, seed: int, first_auto: bool, schedule: str = "cosine") -> dict:
    out: dict = {"model": model, "seed": seed}
    for auto in ((True, False) if first_auto else (False, True)):
        t, c = time.perf_counter(), time.process_time()
        run = train_arm(store, model, seed, auto, schedule)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        m = run.metrics()
        key = "auto" if auto else "plain"
        out[f"{key}_train_s"] = float(m.duration_s.sum())
        out[f"{key}_wall_s"] = wall
        out[f"{key}_cpu_s"] = cpu  # this process's CPU seconds: far less sensitive to other jobs' load
        out[f"{key}_val_acc"] = float(m.val_accuracy.iloc[-1])
        out[f"{key}_epoch_s"] = [round(float(v), 2) for v in m.duration_s]
        if auto:
            ev = run.events()
            fz, an = ev[ev.kind == "freeze"], ev[ev.kind == "anneal"]
            out["frozen"] = ", ".join(f"{json.loads(a)['layer']}@{e}" for a, e in zip(fz.args, fz.epoch, strict=True))
            out["annealed_from"] = ", ".join(f"{json.loads(a)['layer']}@{e}"
                                             for a, e in zip(an.args, an.epoch, strict=True))
    out["saved"] = 1.0 - out["auto_train_s"] / out["plain_train_s"]
    out["saved_wall"] = 1.0 - out["auto_wall_s"] / out["plain_wall_s"]
    out["saved_cpu"] = 1.0 - out["auto_cpu_s"] / out["plain_cpu_s"]
    out["acc_diff_pts"] = 100.0 * (out["auto_val_acc"] - out["plain_val_acc"])
    return out


def detection(store, n_plant: int = 3, seed: int = 0) -> dict:
    """Plant dead and duplicate filters in a trained convnetjs; precision/recall of the doctor."""
    import keras
    import numpy as np
    import tensorflow as tf

    from revacnn.analysis.doctor import LayerArrays, diagnose_layer
    from revacnn.config import TrainConfig
    from revacnn.data import load_dataset
    from revacnn.trainer import train

    cfg = TrainConfig(epochs=3, train_size=2000, val_size=500, seed=seed, embeddings=False, live_every_s=0)
    run = train(cfg, store, progress=False)
    model = run.load_model(3)
    ds = load_dataset("shapes", train_size=2000, val_size=500, seed=seed)
    x = tf.constant(ds.x_train[:256])
    y = tf.constant(ds.y_train[:256])
    probes, _ = store.probes(run.session_id)
    convs = [la for la in model.layers if isinstance(la, keras.layers.Conv2D)]
    probe_model = keras.Model(model.inputs, [la.output for la in convs])
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    def report() -> set[tuple[str, int, str]]:
        acts = [np.asarray(a) for a in probe_model(tf.constant(probes), training=False)]
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=False))
        grads = tape.gradient(loss, [la.kernel for la in convs])
        out = set()
        for layer, a, g in zip(convs, acts, grads, strict=True):
            k = np.moveaxis(layer.kernel.numpy(), -1, 0)
            gl1 = np.abs(np.moveaxis(g.numpy(), -1, 0)).reshape(k.shape[0], -1).sum(1)
            arrays = LayerArrays(layer.name, k, layer.bias.numpy(), np.moveaxis(a, -1, 1), gl1,
                                 list(range(k.shape[0])))
            out |= {(layer.name, int(d.filter), d.kind) for d in diagnose_layer(arrays)
                    if d.kind in ("dead", "redundant")}
        return out

    before = report()  # what the trained network already has (real findings, not planted ones)
    rng = np.random.default_rng(seed)
    planted: set[tuple[str, int, str]] = set()
    for layer in convs:
        k, b = layer.kernel.numpy(), layer.bias.numpy()
        healthy = [i for i in range(k.shape[-1]) if not any((layer.name, i, kd) in before
                                                          for kd in ("dead", "redundant"))]
        picks = rng.choice(healthy, size=3 * n_plant, replace=False)
        dead, src, dup = picks[:n_plant], picks[n_plant:2 * n_plant], picks[2 * n_plant:]
        b[dead] = -1e4
        for s, d in zip(src, dup, strict=True):
            k[..., d] = k[..., s]
            b[d] = b[s]
        layer.kernel.assign(k)
        layer.bias.assign(b)
        planted |= {(layer.name, int(i), "dead") for i in dead}
        planted |= {(layer.name, int(max(s, d)), "redundant") for s, d in zip(src, dup, strict=True)}
    found = report() - before
    tp = len(found & planted)
    return {"planted": len(planted), "reported": len(found), "true_positives": tp,
            "pre_existing": len(before),
            "precision": tp / len(found) if found else float("nan"),
            "recall": tp / len(planted) if planted else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--seeds", type=int, default=3, help="seeds per model (default 3)")
    ap.add_argument("--change", type=float, default=None, help="CONVERGED_CHANGE to try (default: the module's)")
    ap.add_argument("--cka", type=float, default=None, help="CONVERGED_CKA to try")
    ap.add_argument("--patience", type=int, default=None, help="AUTO_FREEZE_PATIENCE to try")
    ap.add_argument("--min-fraction", type=float, default=None, help="AUTO_FREEZE_MIN_FRACTION to try")
    ap.add_argument("--anneal", type=float, default=None, help="AUTO_FREEZE_ANNEAL_FRACTION to try (0: none)")
    ap.add_argument("--no-schedule", action="store_true", help="AUTO_FREEZE_SCHEDULE off: `converged` alone")
    ap.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                    help="both arms' learning rate: cosine-decayed (default) or constant")
    ap.add_argument("--epochs", nargs="+", default=None, metavar="MODEL=N", help="override SIZES' epochs")
    ap.add_argument("--train-size", nargs="+", default=None, metavar="MODEL=N", help="override SIZES' images")
    ap.add_argument("--no-detection", action="store_true", help="skip part 2")
    args = ap.parse_args()
    from revacnn import open_store
    from revacnn.analysis import doctor
    from revacnn.trainer import autofreeze

    for mod, name, value in ((doctor, "CONVERGED_CHANGE", args.change), (doctor, "CONVERGED_CKA", args.cka),
                             (autofreeze, "AUTO_FREEZE_PATIENCE", args.patience),
                             (autofreeze, "AUTO_FREEZE_MIN_FRACTION", args.min_fraction),
                             (autofreeze, "AUTO_FREEZE_ANNEAL_FRACTION", args.anneal),
                             (autofreeze, "AUTO_FREEZE_SCHEDULE", False if args.no_schedule else None)):
        if value is not None:
            setattr(mod, name, value)
    for opt, pos in ((args.train_size, 0), (args.epochs, 1)):
        for item in opt or []:
            m, _, n = item.partition("=")
            sizes = list(SIZES[m])
            sizes[pos] = int(n)
            SIZES[m] = tuple(sizes)
    rule = {"CONVERGED_CHANGE": doctor.CONVERGED_CHANGE, "CONVERGED_CKA": doctor.CONVERGED_CKA,
            "AUTO_FREEZE_PATIENCE": autofreeze.AUTO_FREEZE_PATIENCE,
            "AUTO_FREEZE_MIN_FRACTION": autofreeze.AUTO_FREEZE_MIN_FRACTION,
            "AUTO_FREEZE_SCHEDULE": autofreeze.AUTO_FREEZE_SCHEDULE,
            "AUTO_FREEZE_ANNEAL_FRACTION": autofreeze.AUTO_FREEZE_ANNEAL_FRACTION, "lr": args.lr_schedule}
    print("rule:", rule, "sizes:", {m: SIZES[m] for m in args.models}, "val:", VAL_SIZE, flush=True)
    print("uptime:", os.popen("uptime").read().strip(), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(Path(tmp) / "store")
        rows = []
        for model in args.models:
            warm_up(store, model)
            for seed in range(args.seeds):
                rows.append(auto_freeze_pair(store, model, seed, first_auto=seed % 2 == 0,
                                             schedule=args.lr_schedule))
                rows[-1]["uptime"] = os.popen("uptime").read().strip().split("load average:")[-1].strip()
                print(table([rows[-1]], ["model", "seed", "annealed_from", "frozen", "saved", "saved_wall", "saved_cpu",
                                         "plain_val_acc", "auto_val_acc", "acc_diff_pts", "uptime"]), flush=True)
                print("  epoch s, plain:", rows[-1]["plain_epoch_s"], "\n  epoch s, auto: ",
                      rows[-1]["auto_epoch_s"], flush=True)
        summary = []
        for model in args.models:
            r = [x for x in rows if x["model"] == model]
            summary.append({
                "model": model, "seeds": len(r),
                "saved_median": median(x["saved"] for x in r),
                "saved_min": min(x["saved"] for x in r), "saved_max": max(x["saved"] for x in r),
                "saved_wall_median": median(x["saved_wall"] for x in r),
                "saved_cpu_median": median(x["saved_cpu"] for x in r),
                "saved_cpu_min": min(x["saved_cpu"] for x in r), "saved_cpu_max": max(x["saved_cpu"] for x in r),
                "acc_diff_pts_median": median(x["acc_diff_pts"] for x in r),
                "acc_diff_pts_worst": min(x["acc_diff_pts"] for x in r),
            })
        print("\nAuto-freeze against no freezing (training time = sum of epoch durations):")
        print(table(summary))
        if args.no_detection:
            print(json.dumps({"rule": rule, "auto_freeze": summary, "pairs": rows}))
            return
        det = detection(store)
        print("\nDetection of planted dead and duplicate filters (convnetjs, 3 of each per conv layer):")
        print(table([det]))
        print(json.dumps({"rule": rule, "auto_freeze": summary, "pairs": rows, "detection": det,
                          "spread_saved": {m["model"]: statistics.pstdev([x["saved"] for x in rows
                                                                          if x["model"] == m["model"]])
                                           for m in summary}}))


if __name__ == "__main__":
    main()
