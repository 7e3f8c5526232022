"""Latency of the live app, measured in headless Chromium on a real training: epoch commit -> page,
live snapshot period, and click -> event applied -> shown in the page (target for the click: <= 0.5 s;
medians with the 10th/90th percentiles).

Starts ``revacnn train`` (convnetjs on shapes, embeddings on) and ``panel serve apps/live.py`` on a
free local port, opens the app, then

1. for every epoch committed while watching: ``committed_at`` (the epochs row) -> the time the page
   shows "recorded: epoch k";
2. the period of the live snapshot: differences of consecutive ``published_at`` values;
3. for alternating clicks on "Freeze layer" / "Unfreeze layer" (conv1): click -> the trainer's
   event (``at``), and the event -> the page showing "applied" for that command.

Example:
    $ .venv/bin/python benchmarks/bench_live.py --watch-epochs 5 --clicks 8
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _spread(xs: list[float]) -> tuple[float, float]:
    """The 10th and 90th percentiles of ``xs`` (NaN when empty)."""
    if not xs:
        return float("nan"), float("nan")
    if len(xs) == 1:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=10)
    return q[0], q[-1]


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a table of medians (and JSON with ``--json``).

    Example:
        >>> main(["--epochs", "8", "--clicks", "4"])
        0
    """
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=None, help="store folder (default: a temporary one)")
    ap.add_argument("--epochs", type=int, default=60, help="long enough to outlast the measurements")
    ap.add_argument("--train-size", type=int, default=2000)
    ap.add_argument("--watch-epochs", type=int, default=4, help="epoch commits to time")
    ap.add_argument("--clicks", type=int, default=8, help="steering clicks to time")
    ap.add_argument("--json", default=None, help="also write the raw numbers here")
    args = ap.parse_args(argv)

    from playwright.sync_api import expect, sync_playwright

    import revacnn
    from revacnn.storage.live import read_live_snapshot

    tmp = tempfile.TemporaryDirectory(prefix="bench-live-")
    store_dir = Path(args.store or Path(tmp.name) / "store")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    train_log = open(Path(tmp.name) / "train.log", "w")  # noqa: SIM115
    trainer = subprocess.Popen(
        [sys.executable, "-m", "revacnn.cli", "train", "--store", str(store_dir), "--epochs", str(args.epochs),
         "--train-size", str(args.train_size), "--val-size", "500", "--quiet"],
        stdout=subprocess.PIPE, stderr=train_log, text=True, env=env, cwd=ROOT,
    )
    assert trainer.stdout is not None
    run_id = trainer.stdout.readline().strip()
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "panel", "serve", str(ROOT / "apps" / "live.py"), "--address", "127.0.0.1",
         "--port", str(port), "--allow-websocket-origin", f"127.0.0.1:{port}", "--args", "--store",
         str(store_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT,
    )
    out: dict[str, Any] = {"run_id": run_id, "commit_to_page_s": [], "snapshot_period_s": [],
                           "click_to_queued_s": [], "click_to_applied_s": [], "applied_to_page_s": [], "click_to_page_s": []}
    try:
        store = revacnn.open_store(store_dir, mode="r")
        run = store.run(run_id)
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("panel serve did not start") from None
                time.sleep(0.3)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.set_default_timeout(120_000)
            page.goto(f"http://127.0.0.1:{port}/live?run={run_id}")
            page.locator(".rv-progress-text").wait_for()
            status = page.locator(".rv-status").element_handle()
            result = page.locator(".rv-steer-result").element_handle()

            # 1 + 2: epoch commits and the snapshot period, watched together
            published: list[float] = []
            first = max(run.epochs()) + 1
            for k in range(first, min(first + args.watch_epochs, args.epochs + 1)):
                t_end = time.time() + 120
                while True:  # poll the snapshot while waiting for the page (both cheap)
                    snap = read_live_snapshot(store, run_id)
                    if snap is not None and (not published or snap["meta"]["published_at"] != published[-1]):
                        published.append(float(snap["meta"]["published_at"]))
                    seen = page.evaluate(
                        "([el, k]) => { const s = el.shadowRoot && el.shadowRoot.querySelector('.rv-last-epoch');"
                        " return !!(s && +s.dataset.epoch >= k); }", [status, k])
                    if seen:
                        t_seen = time.time()
                        break
                    if time.time() > t_end:
                        raise RuntimeError(f"epoch {k} never showed up in the page")
                    time.sleep(0.05)
                row = store.sql(f"SELECT committed_at FROM epochs WHERE run_id = '{run_id}' AND epoch = {k}")
                committed = row["committed_at"].iloc[0].timestamp()
                out["commit_to_page_s"].append(t_seen - committed)
            periods = [b - a for a, b in zip(published, published[1:], strict=False)]
            out["snapshot_period_s"] = periods

            # 3: clicks
            for i in range(args.clicks):
                name = "Freeze layer" if i % 2 == 0 else "Unfreeze layer"
                btn = page.get_by_role("button", name=name, exact=True)
                try:
                    expect(btn).to_be_enabled(timeout=120_000)
                except AssertionError:
                    print(f"click {i}: {name!r} stayed disabled; status: "
                          f"{status.evaluate('e => e.shadowRoot.textContent')}", file=sys.stderr)
                    raise
                time.sleep(2.0)  # let the trainer finish re-tracing after the previous command
                before = result.evaluate("e => e.shadowRoot.textContent")
                t_click = time.time()
                btn.click()
                page.wait_for_function(
                    "([e, before]) => { const t = e.shadowRoot.textContent;"
                    " return t !== before && t.includes('applied'); }",
                    arg=[result, before], polling="raf")
                t_shown = time.time()
                ev = run.events()
                ev = ev[ev["kind"].isin(["freeze", "unfreeze"])].iloc[-1]
                at = ev["at"].timestamp()
                out["click_to_queued_s"].append(ev["sent_at"].timestamp() - t_click)
                out["click_to_applied_s"].append(at - t_click)
                out["applied_to_page_s"].append(t_shown - at)
                out["click_to_page_s"].append(t_shown - t_click)
            browser.close()
    finally:
        _stop(server)
        _stop(trainer)
        train_log.close()
    rows = [
        ("epoch commit -> visible in the page", out["commit_to_page_s"]),
        ("live snapshot period", out["snapshot_period_s"]),
        ("click -> command queued (server)", out["click_to_queued_s"]),
        ("click -> event applied (trainer)", out["click_to_applied_s"]),
        ("event applied -> shown in the page", out["applied_to_page_s"]),
        ("click -> applied event shown in the page", out["click_to_page_s"]),
    ]
    print(f"live app latency, convnetjs on shapes (train size {args.train_size}), {os.cpu_count()} CPUs")
    print("| measure | median s | p10 s | p90 s | max s | n |\n|---|---|---|---|---|---|")
    for label, xs in rows:
        lo, hi = _spread(xs)
        print(f"| {label} | {_median(xs):.3f} | {lo:.3f} | {hi:.3f} | "
              f"{max(xs) if xs else float('nan'):.3f} | {len(xs)} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
