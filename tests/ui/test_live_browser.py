"""End-to-end tests of the live app in headless Chromium: follow a real training, steer it with clicks.

One ``revacnn train`` process and one ``panel serve apps/live.py`` server are shared by the tests
of this module, which run in order: progress advances; a click freezes conv1 (both open pages see
the event, and the store confirms conv1's kernel stopped changing); clicking a tile and "Delete
filters" shows the new filter count; deleting every filter of a layer is refused on the page while
training continues; "Stop training" ends the run and the page offers replay.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

expect = pytest.importorskip("playwright.sync_api").expect

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_MS = 30_000
SHOTS = ROOT / "docs" / "screenshots"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def sync_playwright() -> Any:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed")
    pw = pytest.importorskip("playwright.sync_api")
    return pw.sync_playwright


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("live") / "store"


@pytest.fixture(scope="module")
def run_id(store_dir: Path, sync_playwright: Any) -> Iterator[str]:
    """A real training (convnetjs on shapes) that stays running for the whole module."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    log = open(store_dir.parent / "train.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "revacnn.cli", "train", "--store", str(store_dir), "--epochs", "500",
         "--train-size", "1200", "--val-size", "300", "--quiet", "--no-embeddings", "--seed", "0"],
        stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line.startswith("run-"), f"revacnn train printed {line!r}; see {log.name}"
    try:
        yield line
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(scope="module")
def app_url(store_dir: Path, run_id: str) -> Iterator[str]:
    """``panel serve apps/live.py`` on a free local port."""
    port = _free_port()
    env = dict(os.environ, REVACNN_STORE=str(store_dir))
    log = open(store_dir.parent / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "panel", "serve", str(ROOT / "apps" / "live.py"), "--address", "127.0.0.1",
         "--port", str(port), "--allow-websocket-origin", f"127.0.0.1:{port}", "--args", "--store",
         str(store_dir)],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}/live"
    try:
        deadline = time.time() + 60
        while True:  # up when it accepts connections (a GET would build a whole session)
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2):
                    break
            except OSError:
                pass
            assert proc.poll() is None, f"panel serve exited; see {log.name}"
            assert time.time() < deadline, "panel serve did not start in 60 s"
            time.sleep(0.3)
        yield f"{url}?run={run_id}"
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(scope="module")
def browser(sync_playwright: Any) -> Iterator[Any]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def pages(browser: Any, app_url: str) -> list[Any]:
    """Two pages (two sessions) on the same run."""
    out = []
    for _ in range(2):
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(app_url)
        page.locator(".rv-progress-text").wait_for(timeout=90_000)  # TensorFlow starts, epoch 0 is recorded
        out.append(page)
    return out


@pytest.fixture(scope="module")
def store(store_dir: Path) -> Any:
    import revacnn

    return revacnn.open_store(store_dir, mode="r")


def progress(page: Any) -> tuple[int, int]:
    """(epoch, batch) the page shows."""
    loc = page.locator(".rv-progress-text")
    return int(loc.get_attribute("data-epoch")), int(loc.get_attribute("data-batch"))


_PROGRESS_JS = """([e, b]) => {
  const find = (root) => {
    const hit = root.querySelector('.rv-progress-text');
    if (hit) return hit;
    for (const el of root.querySelectorAll('*')) {
      if (el.shadowRoot) { const h = find(el.shadowRoot); if (h) return h; }
    }
    return null;
  };
  const el = find(document);
  if (!el) return false;
  const pe = Number(el.dataset.epoch), pb = Number(el.dataset.batch);
  return pe > e || (pe === e && pb > b);
}"""


def wait_progress_after(page: Any, before: tuple[int, int], timeout_s: float = 60.0) -> tuple[int, int]:
    """Wait (in the browser, on the condition itself) until the page's progress passes ``before``."""
    page.wait_for_function(_PROGRESS_JS, arg=list(before), timeout=timeout_s * 1000, polling=100)
    return progress(page)


def result_text(page: Any, pattern: str) -> None:
    """Wait until the steering result on ``page`` matches ``pattern``."""
    page.locator(".rv-steer-result").get_by_text(re.compile(pattern)).first.wait_for()


def wait_store(pred: Any, timeout_s: float = 60.0) -> Any:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError("the store never reached the expected state")


def test_page_shows_batch_progress_advancing(pages: list[Any]) -> None:
    page = pages[0]
    first = progress(page)
    second = wait_progress_after(page, first)
    assert second > first
    assert page.locator(".rv-run-status[data-status=running]").count() == 1
    # the replay page's template and views: same header, network view, batch curves
    assert page.locator(".rv-net[data-epoch]").count() >= 1
    page.locator(".rv-batch-curves canvas").first.wait_for()
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "live.png"))


def test_click_freezes_conv1_and_both_pages_see_it(pages: list[Any], store: Any, run_id: str) -> None:
    page, other = pages
    page.locator(".rv-layer-select select").select_option("conv1")
    page.get_by_role("button", name="Freeze layer", exact=True).click()
    result_text(page, r"applied.*conv1 frozen")
    page.locator('.rv-layer[data-layer="conv1"] .rv-layer-frozen').wait_for()
    # the other session sees the event and the badge too
    other.locator(".rv-event-log").get_by_text("conv1 frozen").wait_for()
    other.locator('.rv-layer[data-layer="conv1"] .rv-layer-frozen').wait_for()
    expect(other.get_by_role("button", name="Freeze layer", exact=True)).to_be_disabled(timeout=TIMEOUT_MS)
    # the store: conv1's kernel stays identical in every epoch recorded after the freeze
    ev = store.run(run_id).events()
    ev = ev[(ev["kind"] == "freeze") & (ev["status"] == "applied")]
    assert len(ev) == 1
    e0 = int(ev["epoch"].iloc[0])
    run = store.run(run_id)
    wait_store(lambda: max(run.epochs()) >= e0 + 1)
    k0 = run.epoch(e0).layer("conv1").kernel
    k1 = run.epoch(e0 + 1).layer("conv1").kernel
    assert np.array_equal(k0, k1)
    change = store.sql(
        f"SELECT max(weight_change_l1) AS m, count(*) AS n FROM filters WHERE run_id = '{run_id}' "
        f"AND layer = 'conv1' AND epoch > {e0}"
    )
    assert int(change["n"].iloc[0]) >= 16 and float(change["m"].iloc[0]) == 0.0
    layers = store.sql(f"SELECT bool_and(frozen) AS f FROM layers WHERE run_id = '{run_id}' "
                       f"AND layer = 'conv1' AND epoch >= {e0}")
    assert bool(layers["f"].iloc[0])


def test_click_a_tile_then_delete_it_shows_the_new_count(pages: list[Any], store: Any, run_id: str) -> None:
    page, other = pages
    page.locator('.rv-grid-acts .rv-tile[data-click="conv2:3"]').click()
    indices = page.locator(".rv-filter-indices input").element_handle()
    page.wait_for_function("el => el.value === '3'", arg=indices)
    assert page.locator(".rv-layer-select select").input_value() == "conv2"
    page.locator('.rv-grid-acts .rv-tile.rv-selected[data-click="conv2:3"]').wait_for()
    page.get_by_role("button", name="Delete filters", exact=True).click()
    # the plan first (`revacnn steer … --dry-run`, which starts TensorFlow): every layer it touches,
    # and nothing is sent before "Apply"
    plan = page.locator(".rv-plan-text")
    plan.wait_for(timeout=180_000)
    text = plan.inner_text()
    assert "plan: delete-filters conv2" in text and "conv3 (Conv2D, consumer)" in text, text
    assert "delete 3" in text, text
    ev = store.run(run_id).events()
    assert not (ev["kind"] == "delete-filters").any()  # not sent yet
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.locator(".rv-plan-box").screenshot(path=str(SHOTS / "live-plan.png"))
    page.locator(".rv-plan-apply button").click()
    result_text(page, r"applied.*deleted")
    # the event names the layers the surgery changed, and both pages mark them
    ev = store.run(run_id).events()
    row = ev[ev["kind"] == "delete-filters"].iloc[-1]
    touched = json.loads(row["args"])["touched"]
    assert touched[0] == "conv2" and "conv3" in touched, touched
    for p in (page, other):
        try:
            p.locator('.rv-layer.rv-touched[data-layer="conv2"]').wait_for()
        except Exception:
            net = p.locator(".rv-net").first
            raise AssertionError(f"no mark: page at epoch {net.get_attribute('data-epoch')}, event "
                                 f"at {row['epoch']}/{row['batch']}: {progress(p)}") from None
        p.locator('.rv-layer.rv-touched[data-layer="conv3"]').wait_for()
        assert p.locator('.rv-layer.rv-touched[data-layer="conv1"]').count() == 0
    for p in (page, other):  # the next snapshot: the trainer retraces its step after the surgery
        p.locator('.rv-layer[data-layer="conv2"]').get_by_text("19 filters").first.wait_for(timeout=120_000)
    run = store.run(run_id)
    last = wait_store(lambda: [e for e in run.epochs()
                               if len(run.epoch(e).layer("conv2").filter_uids) == 19])
    assert 3 not in run.epoch(last[0]).layer("conv2").filter_uids.tolist()


def test_deleting_every_filter_is_refused_and_training_continues(pages: list[Any], store: Any,
                                                                 run_id: str) -> None:
    page = pages[0]
    page.locator(".rv-layer-select select").select_option("conv3")
    page.get_by_role("button", name="Select all", exact=True).click()
    page.locator(".rv-filter-hint").get_by_text("cannot apply").wait_for()
    before = progress(page)
    page.get_by_role("button", name="Delete filters", exact=True).click()
    page.locator(".rv-plan-box .rv-plan-text, .rv-plan-box .rv-plan-refused").first.wait_for(timeout=180_000)
    page.locator(".rv-plan-apply button").click()
    result_text(page, r"rejected.*Cannot delete every filter of conv3")
    wait_progress_after(page, progress(page))
    assert progress(page) > before
    assert store.run(run_id).status == "running"
    page.locator('.rv-layer[data-layer="conv3"]').get_by_text("20 filters").first.wait_for()


def test_pause_resume_and_learning_rate(pages: list[Any], store: Any, run_id: str) -> None:
    page, other = pages
    page.get_by_role("button", name="Pause", exact=True).click()
    result_text(page, r"applied.*paused")
    other.locator(".rv-run-status[data-status=paused]").wait_for()
    expect(page.get_by_role("button", name="Resume", exact=True)).to_be_enabled(timeout=TIMEOUT_MS)
    page.get_by_role("button", name="Resume", exact=True).click()
    result_text(page, r"applied.*resumed")
    page.locator(".rv-run-status[data-status=running]").wait_for()
    field = page.locator(".rv-lr input")
    field.fill("0.0005")
    field.press("Enter")
    page.get_by_role("button", name="Set learning rate", exact=True).click()
    result_text(page, r"applied.*learning rate 0.001 -> 0.0005")
    page.locator(".rv-status").get_by_text("lr 0.0005").first.wait_for()


def test_stop_from_the_page_then_replay_is_offered(pages: list[Any], store: Any, run_id: str) -> None:
    page, other = pages
    page.get_by_role("button", name="Stop training", exact=True).click()
    for p in (page, other):
        banner = p.locator(".rv-run-ended")
        banner.get_by_text("stopped").first.wait_for(timeout=120_000)  # slow under load
        assert f"replay?run={run_id}" in banner.locator("a").first.get_attribute("href")
        expect(p.get_by_role("button", name="Pause", exact=True)).to_be_disabled(timeout=TIMEOUT_MS)
    assert store.run(run_id).status == "stopped"


def test_start_a_run_from_the_form(pages: list[Any], store: Any, run_id: str) -> None:
    page = pages[1]
    page.locator(".rv-start-card").get_by_text("Start a new run").first.click()
    for cls, value in (("epochs", "1"), ("train-size", "256"), ("val-size", "100"), ("name", "from-the-form")):
        field = page.locator(f".rv-form-{cls} input")
        field.fill(value)
        field.press("Enter")
    page.get_by_role("button", name="Start training", exact=True).click()
    page.locator(".rv-launch-status").get_by_text("Started").first.wait_for(timeout=120_000)
    new = wait_store(lambda: [r for r in store.run_ids() if r != run_id], timeout_s=10)[0]
    page.locator(".rv-status").get_by_text("from-the-form").first.wait_for(timeout=60_000)
    assert new in page.locator(".rv-run-select select").input_value()  # the option label names the run
    cfg = store.run(new).config
    assert (cfg["epochs"], cfg["train_size"], cfg["val_size"]) == (1, 256, 100)
    page.locator(".rv-run-ended").get_by_text("finished").first.wait_for(timeout=120_000)


def test_the_server_logged_no_errors(app_url: str, store_dir: Path) -> None:
    log = (store_dir.parent / "serve.log").read_text()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
