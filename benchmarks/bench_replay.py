"""Replay app speed: server-side epoch switch (read arrays + rebuild every view) and slider-to-tiles in Chromium.

Records small stores with `revacnn.fit` — the ``convnetjs`` model (16/20/20 filters) with 16 probes,
then tiny 3-layer models with 64 and 256 filters per layer — and measures, per store:

* ``server_cold_ms``: median time to show another epoch with empty caches (read the epoch's arrays
  through Zarr, rebuild every view: network, probes, embedding, curves, patterns, events,
  compare, filter detail, header);
* ``server_warm_ms``: the same when the epoch's arrays are cached (what scrubbing back shows);
* ``browser_ms``: median time in headless Chromium from a click on the player's "next" button until
  the network view shows the new epoch and every tile sprite has decoded (skip with ``--no-browser``);
* ``first_load_ms`` (``--load-epochs``, default 1,300 epochs of 3 x 256 filters, written without a
  trainer): a fresh server (empty caches) -> the page shows the network view of the last epoch, in
  Chromium; and ``first_load_server_ms``, the server's share (build the page and its document).
  The lazy first page (the default) and the eager one (``lazy=False``: every table read before the
  first paint) alternate in one run (``first_load_{lazy,eager}_ms``, their ratio), and
  ``first_load_complete_ms`` is when the lazy page has its measures too.

Every figure is a median with its spread (``*_p10``/``*_p90``, and ``n``).

Usage: ``python benchmarks/bench_replay.py [--quick] [--no-browser] [--epochs N]``. Prints a table and,
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
from _common import table  # noqa: E402

CHROMIUM = os.environ.get("REVACNN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
CLASSES = ["red circle", "yellow circle", "yellow square", "green square", "green triangle",
           "blue triangle", "blue cross", "purple cross", "purple ring", "red ring"]


def record(path: Path, filters: int | None, epochs: int, train_size: int) -> str:
    """Record one run into ``path``: convnetjs (``filters=None``) or 3 conv layers of ``filters``."""
    import keras

    import revacnn
    from revacnn.data.shapes import load_shapes
    from revacnn.models import build_model

    x, y, xv, yv = load_shapes(train_size, 128, seed=0)
    if filters is None:
        model = build_model("convnetjs", (32, 32, 3), 10)
    else:
        L = keras.layers
        model = keras.Sequential([
            keras.Input((32, 32, 3)),
            L.Conv2D(filters, 3, padding="same", activation="relu", name="conv1"), L.MaxPooling2D(2),
            L.Conv2D(filters, 3, padding="same", activation="relu", name="conv2"), L.MaxPooling2D(2),
            L.Conv2D(filters, 3, padding="same", activation="relu", name="conv3"), L.MaxPooling2D(2),
            L.Flatten(), L.Dense(10, activation="softmax", name="dense1"),
        ])
    run = revacnn.fit(model, (x, y), validation_data=(xv, yv), epochs=epochs, batch_size=64,
                      store=str(path), probes=16, class_names=CLASSES, progress=False, name=f"bench-{filters}")
    return run.run_id


def server_side(path: Path, run_id: str, repeats: int) -> dict[str, float]:
    """Median epoch-switch time with cold and warm caches, every view built."""
    from revacnn.ui.apps import ReplayApp

    app = ReplayApp(str(path))
    app.build_all()
    app._views["Compare"].active = True  # the compare view redraws too
    epochs = app.bundle.epochs
    app.show_sync(run_id, epochs[0])
    cold, warm = [], []
    for _ in range(repeats):
        for e in epochs[1:] + epochs[:1]:
            app.data._arrays.clear()
            app.data._frames.clear()
            app.data._pool.submit(lambda: None).result()  # no prefetch running
            cold.append(app.show_sync(run_id, e))
    for _ in range(repeats):
        for e in epochs[1:] + epochs[:1]:
            warm.append(app.show_sync(run_id, e))
    return {"server_cold_ms": 1000 * statistics.median(cold), "server_warm_ms": 1000 * statistics.median(warm),
            "n_switches": len(cold)}


#: JavaScript (inside an async function with `root` and `t0`): wait until every activation grid
#: shows the picture asked for (on its canvas, or its CSS sprite decoded), then one frame.
_WAIT_FOR_TILES = """
  const grids = [...root.querySelectorAll('.rv-grid-acts')];
  await Promise.all(grids.map(async (g) => {
    if (g.querySelector('canvas.rv-canvas')) {  // tiles on a canvas: wait until it shows the asked picture
      while (g.dataset.drawn !== g.dataset.sprite && performance.now() - t0 < 20000) {
        await new Promise(requestAnimationFrame);
      }
      return null;
    }
    const m = (g.getAttribute('style') || '').match(/url\\('([^']+)'\\)/);  // tiles as CSS backgrounds
    if (!m) return null;
    const img = new Image(); img.src = m[1]; return img.decode();
  }));
  await new Promise(requestAnimationFrame);
"""

_CLICK_AND_WAIT = """
async ([btn, root, target]) => {
  const t0 = performance.now();
  btn.click();
  while (true) {
    const net = root.querySelector('.rv-net');
    if (net && net.dataset.epoch === String(target)) break;
    if (performance.now() - t0 > 20000) return -1;
    await new Promise(requestAnimationFrame);
  }
""" + _WAIT_FOR_TILES + """  return performance.now() - t0;
}
"""


def browser_side(path: Path, repeats: int) -> dict[str, float]:
    """Median click-on-next to tiles-drawn time in headless Chromium."""
    import panel as pn
    from playwright.sync_api import sync_playwright

    from revacnn.ui.apps import create_replay_app
    from revacnn.ui.serve import free_port

    port = free_port()
    srv = pn.serve({"replay": lambda: create_replay_app(str(path))}, port=port, address="127.0.0.1",
                   show=False, threaded=True, verbose=False, websocket_origin=[f"127.0.0.1:{port}"])
    times: list[float] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(60_000)
            for _ in range(100):
                try:
                    page.goto(f"http://127.0.0.1:{port}/replay?epoch=0")
                    break
                except Exception:  # noqa: BLE001 - the server is starting
                    time.sleep(0.3)
            page.wait_for_selector(".rv-tab-network .rv-net[data-epoch='0']")
            root = page.locator(".rv-tab-network .rv-net").first.evaluate_handle("e => e.parentElement")
            nxt = page.locator(".rv-epoch-player .rv-next").first.element_handle()
            prv = page.locator(".rv-epoch-player .rv-prev").first.element_handle()
            first = page.locator(".rv-epoch-player .rv-first").first.element_handle()
            n_epochs = int(page.locator(".rv-epoch-player .rv-range").first.get_attribute("max")) + 1
            for _ in range(repeats):
                for target in range(1, n_epochs):
                    ms = page.evaluate(_CLICK_AND_WAIT, [nxt, root, target])
                    if ms >= 0:
                        times.append(ms)
                for target in range(n_epochs - 2, -1, -1):
                    ms = page.evaluate(_CLICK_AND_WAIT, [prv, root, target])
                    if ms >= 0:
                        times.append(ms)
            first.click()
            browser.close()
    finally:
        srv.stop()
    return {**spread("browser_ms", times), "n_clicks": len(times)}


def spread(name: str, xs: list[float]) -> dict[str, float]:
    """``name`` (median), ``name_p10``, ``name_p90`` and ``name_n`` of the samples ``xs``."""
    if not xs:
        return {name: float("nan")}
    q = statistics.quantiles(xs, n=10) if len(xs) >= 2 else [xs[0]] * 9
    return {name: statistics.median(xs), f"{name}_p10": q[0], f"{name}_p90": q[-1], f"{name}_n": len(xs)}


def long_store(path: Path, epochs: int, filters: int, layers: int = 3, probes: int = 16,
               all_arrays: bool = False) -> str:
    """A run of ``epochs`` epoch records of ``layers`` x ``filters`` filters, written without a trainer.

    Every epoch has its table rows (epochs, layers, filters); only the last has arrays (the page
    shows the last epoch first), which keeps the store small. The tables are compacted at the end,
    as the trainer does when a run ends.
    """
    import numpy as np

    from revacnn.storage import RunWriter, create_session, open_store

    rng = np.random.default_rng(0)
    store = open_store(path)
    sid = create_session(store, dataset="synthetic", model="bench", probe_images=rng.integers(
        0, 255, (probes, 32, 32, 3), dtype=np.uint8), probe_labels=np.arange(probes) % 10,
        probe_indices=list(range(probes)), class_names=CLASSES, config={})
    w = RunWriter.create(store, session_id=sid, config={"epochs": epochs}, name=f"long-{epochs}")
    names = [f"conv{i + 1}" for i in range(layers)]
    n = layers * filters
    for e in range(epochs):
        if all_arrays or e == epochs - 1:
            arrays = {}
            for i, name in enumerate(names):
                hw = 32 >> i
                arrays[name] = {"kernel": rng.normal(size=(filters, 3, 3, 3 if i == 0 else filters)).astype(np.float32),
                                "activations": rng.random((probes, filters, hw, hw)).astype(np.float16),
                                "filter_uids": np.arange(filters), "_attrs": {"kind": "conv"}}
            w.write_arrays(e, arrays, {"metrics": {}}, extra={"predictions": np.full((probes, 10), 0.1, np.float32)})
        w.write_rows("layers", e, [{"run_id": w.run_id, "epoch": e, "layer": name, "kind": "conv",
                                    "layer_index": i, "n_filters": filters, "frozen": False,
                                    "n_frozen_filters": 0} for i, name in enumerate(names)])
        w.write_rows("filters", e, {
            "run_id": [w.run_id] * n, "epoch": [e] * n, "layer": [nm for nm in names for _ in range(filters)],
            "filter": list(range(filters)) * layers, "filter_uid": list(range(filters)) * layers,
            "frozen": [False] * n, "grad_l1": rng.random(n), "act_mean": rng.random(n),
            "tsne_x": rng.normal(size=n), "tsne_y": rng.normal(size=n)})
        w.commit(e, {"loss": 1.0 / (e + 1), "accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5,
                     "cumulative_time_s": float(e)})
    w.compact()  # as the trainer does when a run ends
    w.set_status("finished")
    return w.run_id


def first_load(path: Path, repeats: int, use_browser: bool) -> dict[str, float]:
    """First page load with empty caches, lazy (the default) and eager, alternated in one run.

    ``lazy``: the page is built from the run's light bundle (metrics, layers, events; the shown
    epoch's arrays) and reads the ``filters`` rows of every epoch afterwards, in a thread.
    ``eager``: the page reads everything before it is shown (what it did before).
    Server share in-process (build the page and its document), and the whole load in Chromium
    (navigation -> the network view of the last epoch is shown); the lazy arm's completion (the
    measures arrive) is reported as ``first_load_complete_ms``.
    """
    import panel as pn
    from bokeh.document import Document

    from revacnn.ui import data as uidata
    from revacnn.ui.apps import create_replay_app
    from revacnn.ui.serve import free_port

    def fresh() -> None:
        uidata.ReplayData._instances.clear()
        for w in list(uidata.StoreWatcher._instances.values()):
            w.stop()
        uidata.StoreWatcher._instances.clear()

    arms = {"lazy": True, "eager": False}
    server: dict[str, list[float]] = {a: [] for a in arms}
    for _ in range(repeats):
        for arm, lazy in arms.items():
            fresh()
            t = time.perf_counter()
            tpl = create_replay_app(str(path), lazy=lazy)
            tpl.server_doc(Document())
            server[arm].append(1000 * (time.perf_counter() - t))
    out: dict[str, float] = {}
    for arm in arms:
        out.update(spread(f"first_load_server_{arm}_ms", server[arm]))
    out["first_load_server_ms"] = out["first_load_server_lazy_ms"]
    out["server_ratio_lazy_eager"] = out["first_load_server_lazy_ms"] / out["first_load_server_eager_ms"]
    if not use_browser:
        return out
    from playwright.sync_api import sync_playwright

    port = free_port()
    srv = pn.serve({"replay": lambda: create_replay_app(str(path)),
                    "eager": lambda: create_replay_app(str(path), lazy=False)},
                   port=port, address="127.0.0.1", show=False, threaded=True, verbose=False,
                   websocket_origin=[f"127.0.0.1:{port}"])
    times: dict[str, list[float]] = {a: [] for a in arms}
    complete: list[float] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(120_000)
            for route in ("replay", "eager"):  # warm-up: imports, Bokeh/Panel JS cached
                page.goto(f"http://127.0.0.1:{port}/{route}")
                page.wait_for_selector(".rv-tab-network .rv-net[data-epoch]")
            for _ in range(repeats):
                for arm in arms:
                    fresh()
                    t = time.perf_counter()
                    page.goto(f"http://127.0.0.1:{port}/{'replay' if arm == 'lazy' else 'eager'}")
                    page.wait_for_selector(".rv-tab-network .rv-net[data-epoch]")
                    times[arm].append(1000 * (time.perf_counter() - t))
                    if arm == "lazy":  # the rest arrives: the network view shows measures
                        page.wait_for_selector(".rv-tab-network .rv-net[data-complete='1']")
                        complete.append(1000 * (time.perf_counter() - t))
            browser.close()
    finally:
        srv.stop()
    for arm in arms:
        out.update(spread(f"first_load_{arm}_ms", times[arm]))
    out["first_load_ms"] = out["first_load_lazy_ms"]
    out.update(spread("first_load_complete_ms", complete))
    out["browser_ratio_lazy_eager"] = out["first_load_lazy_ms"] / out["first_load_eager_ms"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, skip 256 filters")
    ap.add_argument("--no-browser", action="store_true", help="server-side numbers only")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--load-epochs", type=int, default=1300, help="epochs of the first-load store (0: skip)")
    ap.add_argument("--load-filters", type=int, default=256, help="filters per layer (3 layers)")
    ap.add_argument("--load-only", action="store_true", help="only the first-load measurement")
    args = ap.parse_args()
    use_browser = not args.no_browser and Path(CHROMIUM).exists()
    repeats = 2 if args.quick else 4
    cases: list[tuple[str, int | None, int]] = [("convnetjs (16/20/20)", None, 1024), ("3 x 64 filters", 64, 256)]
    if not args.quick:
        cases.append(("3 x 256 filters", 256, 128))
    if args.load_only:
        cases = []
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="revacnn-bench-replay-") as tmp:
        if args.load_epochs:
            path = Path(tmp) / "store-long"
            t = time.perf_counter()
            long_store(path, args.load_epochs, args.load_filters)
            row = {"model": f"{args.load_epochs} epochs x 3 x {args.load_filters} (first load)",
                   "record_s": time.perf_counter() - t}
            row.update(first_load(path, 3 if args.quick else 5, use_browser))
            rows.append(row)
            print(f"first load: {json.dumps(row, default=float)}", file=sys.stderr, flush=True)
        for label, filters, train_size in cases:
            path = Path(tmp) / f"store-{filters or 'convnetjs'}"
            t = time.perf_counter()
            run_id = record(path, filters, args.epochs, train_size)
            rec_s = time.perf_counter() - t
            row: dict[str, Any] = {"model": label, "probes": 16, "record_s": rec_s}
            row.update(server_side(path, run_id, repeats))
            if use_browser:
                row.update(browser_side(path, max(1, repeats // 2)))
            rows.append(row)
            print(f"{label}: {json.dumps(row, default=float)}", file=sys.stderr, flush=True)
    cols = ["model", "probes", "server_cold_ms", "server_warm_ms", "n_switches"]
    if use_browser:
        cols += ["browser_ms", "browser_ms_p10", "browser_ms_p90", "n_clicks"]
    if args.load_epochs:
        cols += ["first_load_server_lazy_ms", "first_load_server_eager_ms", "first_load_lazy_ms",
                 "first_load_lazy_ms_p10", "first_load_lazy_ms_p90", "first_load_eager_ms",
                 "first_load_eager_ms_p10", "first_load_eager_ms_p90", "first_load_complete_ms",
                 "browser_ratio_lazy_eager"]
    print(table(rows, cols))
    print(f"(targets: server-side median <= 100 ms for convnetjs; browser median <= 300 ms at 3 x 256; "
          f"first load <= 1500 ms; "
          f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")
    print(json.dumps(rows, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
