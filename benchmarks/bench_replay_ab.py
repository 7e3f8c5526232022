"""Slider -> tiles in Chromium for two code trees side by side: each served by its own process, alternated.

Serves the same store from ``--old`` and ``--new`` (repository roots put first on PYTHONPATH), opens
the replay page of each in turn (ABBA order per round) and clicks the player's next/prev buttons
through every epoch, timing click -> network view of the new epoch shown with its tiles drawn
(`bench_replay._CLICK_AND_WAIT`, which waits for either the CSS-sprite or the canvas tiles).
Prints per arm the median, min-max and n of the clicks, the ratio new/old and the load average.

Usage: ``python benchmarks/bench_replay_ab.py --store PATH [--old /work/main] [--new .] [--rounds 5]``
(record a store first, e.g. with ``profile_replay.py --store PATH``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_replay import _CLICK_AND_WAIT, CHROMIUM, CHROMIUM_ARGS  # noqa: E402

_SERVE = """
import sys, panel as pn
from revacnn.ui.apps import create_replay_app
store, port = sys.argv[1], int(sys.argv[2])
pn.serve({"replay": lambda: create_replay_app(store)}, port=port, address="127.0.0.1", show=False,
         verbose=False, websocket_origin=[f"127.0.0.1:{port}"])
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--old", default="/work/main")
    ap.add_argument("--new", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from revacnn.ui.serve import free_port

    arms = {"old": args.old, "new": args.new}
    procs, ports = {}, {}
    for arm, root in arms.items():
        ports[arm] = free_port()
        env = {**os.environ, "PYTHONPATH": root}
        procs[arm] = subprocess.Popen([sys.executable, "-c", _SERVE, args.store, str(ports[arm])], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    times: dict[str, list[float]] = {a: [] for a in arms}
    loads: list[float] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for r in range(args.rounds):
                for arm in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    page = browser.new_page(viewport={"width": 1600, "height": 1000})
                    page.set_default_timeout(120_000)
                    url = f"http://127.0.0.1:{ports[arm]}/replay?epoch=0"
                    for _ in range(200):
                        try:
                            page.goto(url)
                            break
                        except Exception:  # noqa: BLE001 - the server is starting
                            time.sleep(0.3)
                    page.wait_for_selector(".rv-tab-network .rv-net[data-complete='1']")
                    root = page.locator(".rv-tab-network .rv-net").first.evaluate_handle("e => e.parentElement")
                    nxt = page.locator(".rv-epoch-player .rv-next").first.element_handle()
                    prv = page.locator(".rv-epoch-player .rv-prev").first.element_handle()
                    n = int(page.locator(".rv-epoch-player .rv-range").first.get_attribute("max")) + 1
                    clicks = [(nxt, t) for t in range(1, n)] + [(prv, t) for t in range(n - 2, -1, -1)]
                    for btn, target in clicks:
                        ms = page.evaluate(_CLICK_AND_WAIT, [btn, root, target])
                        if ms >= 0:
                            times[arm].append(ms)
                    loads.append(os.getloadavg()[0])
                    page.close()
                    print(f"round {r} {arm}: median {statistics.median(times[arm]):.0f} ms so far, "
                          f"load {loads[-1]:.2f}", file=sys.stderr, flush=True)
            browser.close()
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(timeout=30)
    out = {"store": args.store, "load_min": min(loads), "load_max": max(loads)}
    for arm, xs in times.items():
        out[arm] = {"median_ms": round(statistics.median(xs), 1), "min_ms": round(min(xs), 1),
                    "max_ms": round(max(xs), 1), "n": len(xs)}
    out["ratio_new_old"] = round(out["new"]["median_ms"] / out["old"]["median_ms"], 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
