"""Where a replay slider move goes: server phases, websocket bytes, BokehJS/draw and decode time in Chromium.

Records (or reuses, ``--store``) a 3 x ``--filters`` run, serves the replay page, clicks the player's
"next"/"prev" buttons and prints per-switch medians of: the server's frame read, sprite render and
model update (`_apply_frame`, which serialises and sends the change), the bytes that arrive on the
websocket, the time from the click to the first and last websocket message, the network view's
draw (`rv-draw NetworkCanvas`), and the click -> tiles decoded time (as `bench_replay.py`).

Usage: ``python benchmarks/profile_replay.py [--filters 256] [--rounds 2] [--store PATH]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_replay import _WAIT_FOR_TILES, CHROMIUM, CHROMIUM_ARGS, record  # noqa: E402

_WS_HOOK = """
window.__ws = [];
const _WS = window.WebSocket;
window.WebSocket = function (...a) {
  const ws = new _WS(...a);
  ws.addEventListener('message', (ev) => {
    const n = typeof ev.data === 'string' ? ev.data.length : (ev.data.byteLength ?? ev.data.size ?? 0);
    window.__ws.push([performance.now(), n]);
  });
  return ws;
};
window.WebSocket.prototype = _WS.prototype;
Object.assign(window.WebSocket, {CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3});
"""

_CLICK = """
async ([btn, root, target]) => {
  window.__ws.length = 0;
  performance.clearMeasures();
  const t0 = performance.now();
  btn.click();
  while (true) {
    const net = root.querySelector('.rv-net');
    if (net && net.dataset.epoch === String(target)) break;
    if (performance.now() - t0 > 20000) return null;
    await new Promise(requestAnimationFrame);
  }
  const tShown = performance.now() - t0;
""" + _WAIT_FOR_TILES + """  const total = performance.now() - t0;
  const ws = window.__ws.filter(([t]) => t >= t0);
  const draws = performance.getEntriesByType('measure').filter((m) => m.name.startsWith('rv-draw'));
  const net = draws.filter((m) => m.name === 'rv-draw NetworkCanvas');
  return {total, shown: tShown, ws_bytes: ws.reduce((s, [, n]) => s + n, 0), ws_msgs: ws.length,
          ws_first: ws.length ? ws[0][0] - t0 : null, ws_last: ws.length ? ws[ws.length - 1][0] - t0 : null,
          net_draw: net.reduce((s, m) => s + m.duration, 0), net_draws: net.length,
          net_draw_start: net.length ? net[net.length - 1].startTime - t0 : null,
          other_draws: draws.filter((m) => m.name !== 'rv-draw NetworkCanvas').reduce((s, m) => s + m.duration, 0)};
}
"""


def summarise_trace(path: str) -> None:
    """Print the renderer main thread's top-level events by total duration (ms)."""
    events = json.loads(Path(path).read_text())
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    main = {(e["pid"], e["tid"]) for e in events if e.get("name") == "thread_name"
            and e.get("args", {}).get("name") == "CrRendererMain"}
    tot: dict[str, float] = {}
    for e in events:
        if (e.get("pid"), e.get("tid")) in main and e.get("ph") == "X" and "dur" in e:
            tot[e["name"]] = tot.get(e["name"], 0.0) + e["dur"] / 1000
    for name, ms in sorted(tot.items(), key=lambda kv: -kv[1])[:25]:
        print(f"{ms:9.1f} ms  {name}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--filters", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--store", default="")
    ap.add_argument("--trace", default="", help="write a Chrome performance trace of the clicks to this file")
    ap.add_argument("--cprofile", action="store_true", help="print a cProfile of the server's model updates")
    args = ap.parse_args()
    import os

    import panel as pn
    from playwright.sync_api import sync_playwright

    from revacnn.ui import apps
    from revacnn.ui.apps import create_replay_app
    from revacnn.ui.serve import free_port

    server: dict[str, list[float]] = {"frame": [], "prerender": [], "apply": []}

    def timed(name: str, fn: Any) -> Any:
        def wrap(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                server[name].append(1000 * (time.perf_counter() - t))
        return wrap

    apps._prerender = timed("prerender", apps._prerender)
    apps.ReplayApp._apply_frame = timed("apply", apps.ReplayApp._apply_frame)
    prof = None
    if args.cprofile:
        import cProfile

        prof = cProfile.Profile()
        inner = apps.ReplayApp._apply_frame

        def profiled(*a: Any, **k: Any) -> Any:
            prof.enable()
            try:
                return inner(*a, **k)
            finally:
                prof.disable()

        apps.ReplayApp._apply_frame = profiled
    orig_aframe = apps.ReplayData.aframe if hasattr(apps, "ReplayData") else None
    from revacnn.ui.data import ReplayData

    orig_aframe = ReplayData.aframe

    async def aframe(self: Any, bundle: Any, epoch: int) -> Any:
        t = time.perf_counter()
        try:
            return await orig_aframe(self, bundle, epoch)
        finally:
            server["frame"].append(1000 * (time.perf_counter() - t))

    ReplayData.aframe = aframe
    tmp = tempfile.TemporaryDirectory(prefix="revacnn-prof-replay-")
    path = Path(args.store) if args.store else Path(tmp.name) / "store"
    if not args.store or not path.exists():
        record(path, args.filters, args.epochs, 128)
    port = free_port()
    srv = pn.serve({"replay": lambda: create_replay_app(str(path))}, port=port, address="127.0.0.1",
                   show=False, threaded=True, verbose=False, websocket_origin=[f"127.0.0.1:{port}"])
    rows: list[dict[str, Any]] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.add_init_script(_WS_HOOK)
            page.set_default_timeout(60_000)
            for _ in range(100):
                try:
                    page.goto(f"http://127.0.0.1:{port}/replay?epoch=0")
                    break
                except Exception:  # noqa: BLE001 - the server is starting
                    time.sleep(0.3)
            page.wait_for_selector(".rv-tab-network .rv-net[data-epoch='0']")
            page.wait_for_selector(".rv-tab-network .rv-net[data-complete='1']")
            root = page.locator(".rv-tab-network .rv-net").first.evaluate_handle("e => e.parentElement")
            nxt = page.locator(".rv-epoch-player .rv-next").first.element_handle()
            prv = page.locator(".rv-epoch-player .rv-prev").first.element_handle()
            n = int(page.locator(".rv-epoch-player .rv-range").first.get_attribute("max")) + 1
            for k in server.values():
                k.clear()
            if prof is not None:
                prof.enable()
                prof.disable()
                prof.clear() if hasattr(prof, "clear") else None
            if args.trace:
                browser.start_tracing(page=page, path=args.trace, categories=[
                    "devtools.timeline", "blink", "v8.execute", "disabled-by-default-devtools.timeline"])
            for _ in range(args.rounds):
                for target in range(1, n):
                    rows.append(page.evaluate(_CLICK, [nxt, root, target]))
                for target in range(n - 2, -1, -1):
                    rows.append(page.evaluate(_CLICK, [prv, root, target]))
            if args.trace:
                browser.stop_tracing()
                summarise_trace(args.trace)
            browser.close()
    finally:
        srv.stop()
    rows = [r for r in rows if r]
    out: dict[str, Any] = {"filters": args.filters, "n": len(rows), "load": os.getloadavg()[0]}
    for key in rows[0]:
        vals = [r[key] for r in rows if r[key] is not None]
        if vals:
            out[f"{key}_med"] = round(statistics.median(vals), 1)
            out[f"{key}_min"] = round(min(vals), 1)
            out[f"{key}_max"] = round(max(vals), 1)
    for name, vals in server.items():
        if vals:
            out[f"server_{name}_med"] = round(statistics.median(vals), 1)
    print(json.dumps(out, indent=1))
    if prof is not None:
        import pstats

        pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
