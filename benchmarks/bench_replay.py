"""Replay app speed: server-side epoch switch (read arrays + rebuild every view) and slider-to-tiles in Chromium.

Records small stores with `revacnn.fit` — the ``convnetjs`` model (16/20/20 filters) with 16 probes,
then tiny 3-layer models with 64 and 256 filters per layer — and measures, per store:

* ``server_cold_ms``: median time to show another epoch with empty caches (read the epoch's arrays
  through Zarr, rebuild every view: network, probes, embedding, curves, patterns, events,
  compare, filter detail, header);
* ``server_warm_ms``: the same when the epoch's arrays are cached (what scrubbing back shows);
* ``browser_ms``: median time in headless Chromium from a click on the player's "next" button until
  the network view shows the new epoch and every tile sprite has decoded (skip with ``--no-browser``).

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
  const grids = [...root.querySelectorAll('.rv-grid-acts')];
  await Promise.all(grids.map((g) => {
    const m = (g.getAttribute('style') || '').match(/url\\('([^']+)'\\)/);
    if (!m) return null;
    const img = new Image(); img.src = m[1]; return img.decode();
  }));
  await new Promise(requestAnimationFrame);
  return performance.now() - t0;
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
    return {"browser_ms": statistics.median(times) if times else float("nan"), "n_clicks": len(times)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, skip 256 filters")
    ap.add_argument("--no-browser", action="store_true", help="server-side numbers only")
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    use_browser = not args.no_browser and Path(CHROMIUM).exists()
    repeats = 2 if args.quick else 4
    cases: list[tuple[str, int | None, int]] = [("convnetjs (16/20/20)", None, 1024), ("3 x 64 filters", 64, 256)]
    if not args.quick:
        cases.append(("3 x 256 filters", 256, 128))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="revacnn-bench-replay-") as tmp:
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
        cols += ["browser_ms", "n_clicks"]
    print(table(rows, cols))
    print(f"(targets: server-side median <= 100 ms for convnetjs; browser median <= 500 ms; "
          f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")
    print(json.dumps(rows, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
