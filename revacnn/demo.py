"""The demo: record a session on `shapes` (a root run and a conv1-frozen fork), start a live run, serve both pages."""

from __future__ import annotations

import sys
import time

from .config import TrainConfig
from .storage import open_store

DEMO_CONFIG = TrainConfig(
    dataset="shapes", model="convnetjs", epochs=6, batch_size=64, lr=1e-3, train_size=8000,
    val_size=1000, probes=16, seed=0, name="demo-root",
)
FORK_EPOCH = 2
#: The run the live page follows (and can steer) while the demo serves: long enough to play with.
LIVE_EPOCHS = 300
LIVE_TRAIN_SIZE = 4000


def run_demo(store_path: str, *, epochs: int = 6, serve_app: bool = True, port: int = 5006) -> int:
    """Record the demo session into ``store_path``, start a live run, and serve both apps on 127.0.0.1.

    The replay page shows the recorded root run and its conv1-frozen fork; the live page follows a
    third run that trains while the demo serves (``revacnn train`` in its own process), and can
    steer it. Both URLs are printed.

    Example:
        >>> run_demo("store/demo", serve_app=False)
    """
    from .steering import parse
    from .trainer import fork, train

    store = open_store(store_path)
    t0 = time.perf_counter()
    cfg = DEMO_CONFIG.replace(epochs=epochs)
    print(f"Recording the demo session into {store.root} (shapes, convnetjs, {epochs} epochs) …", flush=True)
    root = train(cfg, store, on_start=lambda rid: print(f"root run {rid}", flush=True))
    k = min(FORK_EPOCH, epochs)
    print(f"Forking {root.run_id} at epoch {k} with conv1 frozen …", flush=True)
    child = fork(store, root.run_id, k, changes=[parse("freeze", ["conv1"])], name="demo-conv1-frozen",
                 on_start=lambda rid: print(f"fork run {rid}", flush=True))
    print(f"Training part took {time.perf_counter() - t0:.0f} s.\n")
    print("Query it:")
    print(f"  revacnn runs --store {store_path}")
    print(f"  revacnn compare --store {store_path} {root.run_id} {child.run_id}")
    print(f"  revacnn sql --store {store_path} \"SELECT run_id, epoch, val_accuracy, cumulative_time_s "
          "FROM timeline ORDER BY run_id, epoch\"")
    if not serve_app:
        return 0
    from .ui.launcher import launch_train
    from .ui.serve import free_port, serve

    port = port or free_port()
    job = launch_train(store.root, epochs=LIVE_EPOCHS, train_size=LIVE_TRAIN_SIZE, val_size=500,
                       name="demo-live", seed=1)
    live_id = job.wait_run_id(timeout_s=300)
    print(f"\nServing on http://127.0.0.1:{port}  (Ctrl-C to stop)", flush=True)
    print(f"  replay (the root run and its fork): http://127.0.0.1:{port}/replay?run={child.run_id}")
    if live_id:
        print(f"  live (a run training now, {LIVE_EPOCHS} epochs; steer it there): "
              f"http://127.0.0.1:{port}/live?run={live_id}", flush=True)
    else:
        print(f"  live: the demo run did not start ({job.log_tail(300)}); http://127.0.0.1:{port}/live",
              flush=True)
    sys.stdout.flush()
    try:
        return serve("replay", store=store_path, port=port, address="127.0.0.1", show=False)
    finally:
        job.terminate()  # the live run ends with the demo (its status reads stopped/interrupted)
