"""Epoch commit latency on an S3 server (moto on 127.0.0.1) as a ratio to a local folder.

One sample is one epoch written the way the trainer's recording worker writes it (the Zarr
record of a convnetjs-sized model with 16 probes, its table rows, a checkpoint, then the
``epochs`` marker), timed from the first write to the return of `RunWriter.commit`. On a URL that
includes the push of the epoch's objects to the bucket, marker last. Local and S3 samples
alternate (``--samples``, at least 5); medians, spread (min–max) and their ratio are printed.

Run: ``python benchmarks/bench_store_commit.py [--samples 7]`` (needs s3fs and moto[server]).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, table  # noqa: E402

# convnetjs on 32x32x3: conv 16@5x5x3 -> pool -> 20@5x5x16 -> pool -> 20@5x5x20 -> pool -> dense 10
LAYERS = {"conv1": (16, 3, 32), "conv2": (20, 16, 16), "conv3": (20, 20, 8)}
PROBES = 16


def _epoch_arrays(rng: np.random.Generator, epoch: int) -> tuple[dict, dict, dict]:
    layers = {}
    ckpt = {}
    for name, (f, cin, hw) in LAYERS.items():
        k = rng.standard_normal((f, 5, 5, cin)).astype(np.float32)
        layers[name] = {
            "kernel": k, "bias": rng.standard_normal(f).astype(np.float32),
            "grad_l1": rng.random(f).astype(np.float32), "weight_change_l1": rng.random(f).astype(np.float32),
            "act_mean": rng.random(f).astype(np.float32),
            "activations": rng.random((PROBES, f, hw, hw)).astype(np.float16),
            "filter_uids": np.arange(f), "frozen": np.zeros(f, np.uint8), "_attrs": {"kind": "conv"},
        }
        for slot in ("value", "m", "v"):  # the weights and two Adam slots
            ckpt[f"{name}/kernel/{slot}"] = k
    dense = rng.standard_normal((320, 10)).astype(np.float32)
    for slot in ("value", "m", "v"):
        ckpt[f"dense/kernel/{slot}"] = dense
    extra = {"predictions": rng.random((PROBES, 10)).astype(np.float32)}
    return layers, extra, ckpt


def _commit_one(writer, epoch: int, rng: np.random.Generator) -> float:
    layers, extra, ckpt = _epoch_arrays(rng, epoch)
    rid = writer.run_id
    t = time.perf_counter()
    writer.write_checkpoint(epoch, ckpt)
    writer.write_arrays(epoch, layers, {"metrics": {"loss": 1.0}}, extra=extra)
    writer.write_rows("layers", epoch, [{"run_id": rid, "epoch": epoch, "layer": n, "kind": "conv",
                                         "n_filters": v[0], "frozen": False, "n_frozen_filters": 0}
                                        for n, v in LAYERS.items()])
    n = sum(v[0] for v in LAYERS.values())
    writer.write_rows("filters", epoch, {"run_id": [rid] * n, "epoch": [epoch] * n,
                                         "layer": [ln for ln, v in LAYERS.items() for _ in range(v[0])],
                                         "filter": [i for v in LAYERS.values() for i in range(v[0])],
                                         "filter_uid": list(range(n))})
    writer.commit(epoch, {"loss": 1.0, "val_accuracy": 0.5})
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=7, help="alternated samples per side (>= 5)")
    args = ap.parse_args()
    n = max(5, args.samples)
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}", REVACNN_SYNC_INTERVAL_S="600")
    import s3fs

    s3fs.S3FileSystem().mkdir("revacnn-bench")
    import revacnn
    from revacnn.storage import RunWriter, create_session

    tmp = Path(tempfile.mkdtemp(prefix="bench-store-commit-"))
    stores = {"local": revacnn.open_store(tmp / "local"),
              "s3": revacnn.open_store("s3://revacnn-bench/b", cache=tmp / "cache")}
    writers = {}
    for key, st in stores.items():
        sid = create_session(st, dataset="bench", model="convnetjs", probe_images=np.zeros((PROBES, 32, 32, 3)),
                             probe_labels=np.zeros(PROBES, int), probe_indices=list(range(PROBES)),
                             class_names=[str(i) for i in range(10)], config={})
        writers[key] = RunWriter.create(st, session_id=sid, config={})
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {"local": [], "s3": []}
    for key in writers:  # warm-up epoch 0 (imports, connections)
        _commit_one(writers[key], 0, rng)
    for i in range(1, n + 1):
        order = ("local", "s3") if i % 2 else ("s3", "local")
        for key in order:
            times[key].append(_commit_one(writers[key], i, rng))
    for w in writers.values():
        w.set_status("finished")
    objects = len(stores["s3"]._mirror.backend.list(f"runs/{writers['s3'].run_id}/arrays.zarr/e00001/"))
    rows = []
    for key in ("local", "s3"):
        xs = times[key]
        rows.append({"store": key, "median_ms": median(xs) * 1e3, "min_ms": min(xs) * 1e3,
                     "max_ms": max(xs) * 1e3, "ratio_to_local": median(xs) / median(times["local"])})
    print(f"epoch commit latency, {n} alternated samples per side, durable local commits, "
          f"{objects + 4} objects per epoch on S3 (moto server on 127.0.0.1)")
    print(table(rows))
    print(f"ratio s3/local (medians): {median(times['s3']) / median(times['local']):.2f}")
    server.stop()


if __name__ == "__main__":
    main()
