"""Store bytes per epoch ÷ parameter bytes, with every epoch forkable: old .npz checkpoints vs compact ones and retention.

Records the same run on the offline ``shapes`` data (32×32×3, 10 classes) under three checkpoint
schemes, for each of two models: ``resnet20`` (272k parameters, BatchNorm) and ``cnn_1m`` below, a
plain functional CNN of 1.21M parameters (most of them in its first dense layer, the size of the
model issue 14's "4.5x" was measured on), and splits each run's bytes per recorded epoch into arrays (Zarr),
checkpoints and tables (Parquet):

* ``npz K=1``: the old scheme, an uncompressed ``.npz`` of every model and optimizer variable
  every epoch (the kernels repeat the arrays');
* ``ckpt K=1``: compact checkpoints every epoch (zstd + byte shuffle, conv kernels and biases
  left out and read back from the epoch record);
* ``ckpt K=10``: compact checkpoints every 10 epochs, at epoch 0 and the last epoch; every other
  epoch stays forkable by a bit-exact replay from the nearest earlier checkpoint.

Bytes are deterministic (one recording per scheme); the ratio's denominator is the model's
parameter bytes (every model variable, float32: 4 × ``model.count_params()`` plus BatchNorm
statistics). ``--probes`` sets the probe images recorded per epoch (their float16 activations
dominate the arrays). With ``--forks N`` it also times a fork from a checkpointed epoch and one
that replays 9 epochs (N alternated samples each, median and spread; off by default: slow).

Usage: ``python benchmarks/bench_store.py [--epochs 20] [--probes 4] [--forks 0]``. Prints a table and,
last, one JSON line (for ``benchmarks/run_all.py``).
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import dir_bytes, table  # noqa: E402

MODELS = {"resnet20": "resnet20", "cnn_1m": "bench_store:cnn_1m"}


def cnn_1m(input_shape: tuple[int, int, int], num_classes: int) -> Any:
    """A functional VGG-style CNN of 1.21M parameters on 32×32×3: three blocks of two 3×3 convs
    (32, 64, 128 filters) and a max-pool, then dense 448 and the softmax."""
    import keras

    L = keras.layers
    inp = keras.Input(input_shape)
    x = L.Rescaling(1.0 / 255.0, name="rescale")(inp)
    for i, f in enumerate((32, 64, 128), start=1):
        x = L.Conv2D(f, 3, padding="same", activation="relu", name=f"conv{i}a")(x)
        x = L.Conv2D(f, 3, padding="same", activation="relu", name=f"conv{i}b")(x)
        x = L.MaxPooling2D(2, name=f"pool{i}")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(448, activation="relu", name="dense1")(x)
    out = L.Dense(num_classes, activation="softmax", name="dense2")(x)
    return keras.Model(inp, out, name="cnn_1m")


def record(path: Path, *, scheme: str, every: int, epochs: int, probes: int, train_size: int,
           model: str = "resnet20") -> tuple[Any, str]:
    """Record one run of ``model`` with ``every`` and the ``npz`` or ``ckpt`` checkpoint format."""
    import revacnn
    from revacnn.config import TrainConfig
    from revacnn.trainer import recorder as rec_mod
    from revacnn.trainer import train
    from revacnn.trainer.checkpoint import to_arrays, to_bytes

    store = revacnn.open_store(path)
    cfg = TrainConfig(dataset="shapes", model=MODELS.get(model, model), epochs=epochs, train_size=train_size, val_size=64,
                      batch_size=64, probes=probes, seed=1, embeddings=False, live_every_s=0.0,
                      checkpoint_every=every)
    rec_mod.to_bytes = (lambda ckpt, record=None: to_arrays(ckpt)) if scheme == "npz" else to_bytes
    try:
        run = train(cfg, store, progress=False)
    finally:
        rec_mod.to_bytes = to_bytes
    return store, run.run_id


def param_bytes(store: Any, run_id: str) -> int:
    from revacnn.trainer.checkpoint import load_run_checkpoint

    ckpt = load_run_checkpoint(store.run(run_id), 0)
    return int(sum(v.nbytes for v in ckpt.model_vars if v.dtype.kind == "f"))


def split(store: Any, run_id: str) -> dict[str, float]:
    d = store.layout.run_dir(run_id)
    n = len(store.run(run_id).epochs())
    return {
        "arrays": dir_bytes(d / "arrays.zarr") / n,
        "checkpoints": dir_bytes(d / "checkpoints") / n,
        "tables": dir_bytes(d / "tables") / n,
        "n_checkpoints": len(list((d / "checkpoints").iterdir())),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--train-size", type=int, default=256)
    ap.add_argument("--forks", type=int, default=0, help="alternated fork timing samples (0: none)")
    ap.add_argument("--models", default="resnet20,cnn_1m", help=f"comma-separated, of {sorted(MODELS)}")
    args = ap.parse_args(argv)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    rows = []
    models = [m for m in args.models.split(",") if m]
    out: dict[str, Any] = {"models": models, "dataset": "shapes", "epochs": args.epochs, "probes": args.probes}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for model in models:
            for scheme, every in (("npz", 1), ("ckpt", 1), ("ckpt", 10)):
                name = f"{scheme} K={every}"
                store, rid = record(Path(tmp) / f"{model}_{name.replace(' ', '_')}", scheme=scheme, every=every,
                                    epochs=args.epochs, probes=args.probes, train_size=args.train_size, model=model)
                runs[(model, name)] = (store, rid)
                pb = param_bytes(store, rid)
                s = split(store, rid)
                total = s["arrays"] + s["checkpoints"] + s["tables"]
                rows.append({"model": model, "scheme": name, "param_MB": pb / 1e6, "arrays_MB": s["arrays"] / 1e6,
                             "checkpoints_MB": s["checkpoints"] / 1e6, "tables_MB": s["tables"] / 1e6,
                             "per_epoch_MB": total / 1e6, "ratio": total / pb,
                             "arrays_ratio": s["arrays"] / pb, "checkpoints_ratio": s["checkpoints"] / pb,
                             "n_checkpoints": s["n_checkpoints"]})
        out["bytes"] = rows
        print(f"{', '.join(models)} on shapes, {args.epochs + 1} recorded epochs, {args.probes} probes, "
              "every epoch forkable")
        print(table(rows, ["model", "scheme", "param_MB", "arrays_MB", "checkpoints_MB", "tables_MB", "per_epoch_MB",
                           "ratio", "arrays_ratio", "checkpoints_ratio", "n_checkpoints"]))
        if args.forks:
            from revacnn.trainer import fork

            store, rid = runs[(models[0], "ckpt K=10")]
            direct, replay = [], []
            for i in range(args.forks):  # alternated: a checkpointed epoch, then one 9 epochs past it
                for at, acc in ((10, direct), (9, replay)):
                    if i and at == 9:  # the replayed fork point was saved: drop it to replay again
                        p = store.run(rid).checkpoint_path(9)
                        p.unlink(missing_ok=True)
                    t = time.perf_counter()
                    fork(store, rid, at, epochs=at, progress=False)
                    acc.append(time.perf_counter() - t)
            fr = []
            for label, xs in (("fork at a checkpoint (epoch 10)", direct), ("fork replaying 9 epochs (epoch 9)", replay)):
                q = statistics.quantiles(xs, n=10) if len(xs) > 1 else [xs[0]] * 9
                fr.append({"fork": label, "median_s": statistics.median(xs), "p10_s": q[0], "p90_s": q[-1],
                           "n": len(xs)})
            fr.append({"fork": "ratio replay / direct", "median_s": statistics.median(replay) / statistics.median(direct)})
            out["forks"] = fr
            print(table(fr, ["fork", "median_s", "p10_s", "p90_s", "n"]))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
