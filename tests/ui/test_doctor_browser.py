"""End-to-end: a dead filter in the doctor panel, fixed with one click, live and in replay.

Live: a small script (a subprocess) trains a tiny Sequential CNN with `revacnn.fit` whose conv2
filter 3 has bias -1e4, so it is dead from epoch 0; ``panel serve apps/live.py`` shows the run. The
test sees the finding both as recorded and as a provisional live finding between epochs, clicks
the fix (``reinit-filters conv2 3``), sees the applied event on the page, and checks the store's
events table holds that applied reinit.

Replay: a finished run of the same kind (a ``MODULE:FUNCTION`` model on ``shapes``, so that the
``revacnn fork`` command line can rebuild its data); a click on the fix starts the fork, the page
shows the new run id and the command line, and marks the finding handled; the fork's record has
filter 3 re-initialised and every other filter as the parent left it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .test_live_browser import CHROMIUM, CHROMIUM_ARGS, ROOT, SHOTS, TIMEOUT_MS, _free_port, _stop

pytestmark = pytest.mark.browser

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import keras
    import revacnn

    keras.utils.set_random_seed(4)
    L = keras.layers
    model = keras.Sequential([keras.Input((12, 12, 3)),
        L.Conv2D(4, 3, padding="same", activation="relu", name="conv1"), L.MaxPooling2D(2, name="pool1"),
        L.Conv2D(6, 3, padding="same", activation="relu", name="conv2"), L.Flatten(name="flatten"),
        L.Dense(4, activation="softmax", name="dense1")], name="tiny")
    conv2 = model.get_layer("conv2")
    b = conv2.bias.numpy(); b[3] = -1e4; conv2.bias.assign(b)   # filter 3: dead from the start
    rng = np.random.default_rng(0)
    def make(n):
        y = rng.integers(0, 4, n); x = rng.integers(0, 120, (n, 12, 12, 3))
        for c in range(3):
            x[y == c, :, :, c] += 120
        x[y == 3] += 60
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)
    revacnn.fit(model, make(512), validation_data=make(64), epochs=2000, batch_size=32,
                store=sys.argv[1], probes=8, seed=1, progress=False, embeddings=False, name="doctor")
""")


def _wait(pred: Any, timeout: float = 180.0) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.3)  # polling a condition, not synchronising on time
    raise AssertionError("condition not reached")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, str]]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed")
    import revacnn

    store_dir = tmp_path_factory.mktemp("doctor") / "store"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT))
    tlog = open(store_dir.parent / "train.log", "w")  # noqa: SIM115 - closed below
    trainer = subprocess.Popen([sys.executable, "-c", SCRIPT, str(store_dir)], stdout=tlog,
                               stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    server = None
    slog = open(store_dir.parent / "serve.log", "w")  # noqa: SIM115 - closed below
    try:
        def first_commit() -> str | None:
            assert trainer.poll() is None, f"the training exited; see {tlog.name}"
            if not (store_dir / "runs").exists() and not store_dir.exists():
                return None
            try:
                store = revacnn.open_store(store_dir, mode="r")
                runs = store.runs()
                if len(runs) and store.run(runs["run_id"].iloc[0]).epochs():
                    return str(runs["run_id"].iloc[0])
            except Exception:  # noqa: BLE001 - not written yet
                return None
            return None

        run_id = _wait(first_commit, 300)
        port = _free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "panel", "serve", str(ROOT / "apps" / "live.py"), "--address", "127.0.0.1",
             "--port", str(port), "--allow-websocket-origin", f"127.0.0.1:{port}", "--args", "--store",
             str(store_dir)], stdout=slog, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        yield store_dir, run_id, f"http://127.0.0.1:{port}/live?run={run_id}"
    finally:
        if server is not None:
            _stop(server)
        _stop(trainer)
        tlog.close()
        slog.close()


def test_click_on_the_dead_filters_fix_reinitialises_it(setup: tuple[Path, str, str]) -> None:
    from playwright.sync_api import sync_playwright

    import revacnn

    store_dir, run_id, url = setup
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1400})
            page.set_default_timeout(TIMEOUT_MS)
            _wait(lambda: _goto(page, url), 120)
            fix = page.locator("tr.rv-finding:not(.rv-live-finding) button.rv-fix",
                               has_text="reinit-filters conv2 3")
            fix.wait_for(timeout=120_000)
            # between epochs, the same filter as a provisional finding of the live snapshot
            page.locator('tr.rv-live-finding[data-kind="dead"][data-layer="conv2"][data-uid="3"]'
                         ).first.wait_for(timeout=120_000)
            page.locator('.rv-layer[data-layer="conv2"] .rv-doc-dot[data-kind="dead"]').first.wait_for()
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.locator(".rv-doctor-panel").first.scroll_into_view_if_needed()
            page.screenshot(path=str(SHOTS / "doctor.png"), full_page=True)
            fix.click()
            page.locator(".rv-event-status", has_text="applied").wait_for(timeout=120_000)
            page.locator(".rv-event-log").get_by_text("reinit-filters").first.wait_for(timeout=120_000)
        finally:
            browser.close()
    store = revacnn.open_store(store_dir, mode="r")
    ev = store.run(run_id).events()
    ev = ev[(ev["kind"] == "reinit-filters") & (ev["status"] == "applied")]
    assert len(ev) == 1
    assert '"conv2"' in ev["args"].iloc[0] and "3" in ev["args"].iloc[0]


def _goto(page: Any, url: str) -> bool:
    try:
        page.goto(url)
        return True
    except Exception:  # noqa: BLE001 - the server is still starting
        return False


MODEL_MODULE = textwrap.dedent("""
    import keras

    def build(input_shape, num_classes):
        L = keras.layers
        model = keras.Sequential([keras.Input(input_shape),
            L.Conv2D(4, 3, padding="same", activation="relu", name="conv1"), L.MaxPooling2D(4, name="pool1"),
            L.Conv2D(6, 3, padding="same", activation="relu", name="conv2"), L.Flatten(name="flatten"),
            L.Dense(num_classes, activation="softmax", name="dense1")], name="doctor_tiny")
        conv2 = model.get_layer("conv2")
        b = conv2.bias.numpy(); b[3] = -1e4; conv2.bias.assign(b)   # filter 3: dead from the start
        return model
""")


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, str]]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed")
    import panel as pn

    from revacnn import open_store
    from revacnn.config import TrainConfig
    from revacnn.trainer import train
    from revacnn.ui.apps import create_replay_app
    from revacnn.ui.serve import free_port

    base = tmp_path_factory.mktemp("doctor-replay")
    (base / "doctor_tiny_model.py").write_text(MODEL_MODULE)
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(base))
    # the fork runs as `python -m revacnn.cli fork …` in its own process: it must import the same code
    mp.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(base)]))
    store_dir = base / "store"
    cfg = TrainConfig(model="doctor_tiny_model:build", epochs=2, train_size=256, val_size=64, probes=8,
                      seed=1, embeddings=False, live_every_s=0, name="doctor-replay")
    run = train(cfg, open_store(store_dir), progress=False)
    port = free_port()
    srv = pn.serve({"replay": lambda: create_replay_app(str(store_dir))}, port=port, address="127.0.0.1",
                   show=False, threaded=True, start=True, verbose=False, websocket_origin=[f"127.0.0.1:{port}"])
    try:
        yield store_dir, run.run_id, f"http://127.0.0.1:{port}/replay?run={run.run_id}&epoch=2"
    finally:
        srv.stop()
        mp.undo()


def test_replay_click_on_a_fix_starts_the_fork_and_marks_the_finding_handled(
        replay: tuple[Path, str, str]) -> None:
    from playwright.sync_api import sync_playwright

    import revacnn

    store_dir, run_id, url = replay
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1400})
            page.set_default_timeout(TIMEOUT_MS)
            _wait(lambda: _goto(page, url), 120)
            page.wait_for_selector(".rv-net[data-epoch]")
            fix = page.locator('tr.rv-finding[data-kind="dead"][data-uid="3"] button.rv-fix',
                               has_text="reinit-filters conv2 3")
            fix.wait_for(timeout=60_000)
            fix.click()
            cmd = page.locator(".rv-fork-cmd").first
            cmd.wait_for(timeout=60_000)
            assert f"revacnn fork {run_id}" in cmd.inner_text()
            assert "--epoch 2 --reinit-filters conv2:3" in cmd.inner_text()
            new_id = page.locator(".rv-fork-run-id").first
            new_id.wait_for(timeout=240_000)  # the child loads TensorFlow first
            child_id = new_id.inner_text().strip()
            page.locator('tr.rv-finding.rv-is-handled[data-kind="dead"][data-uid="3"]').first.wait_for(
                timeout=60_000)
            assert child_id in page.locator("tr.rv-is-handled .rv-handled").first.inner_text()
        finally:
            browser.close()
    store = revacnn.open_store(store_dir, mode="r")
    kids = store.sql(f"SELECT run_id, fork_epoch FROM runs WHERE parent_run_id = '{run_id}'")
    assert kids.run_id.tolist() == [child_id] and kids.fork_epoch.tolist() == [2]
    # the reference: the fork's own record at the fork point against the parent's record there
    def child_record():  # the fork commits its fork-point record shortly after printing its id
        r = revacnn.open_store(store_dir, mode="r").run(child_id)
        return r if 2 in r.epochs() else None

    child = _wait(child_record, 240)
    before = store.run(run_id).epoch(2).layer("conv2").kernel
    after = child.epoch(2).layer("conv2").kernel
    others = [i for i in range(before.shape[0]) if i != 3]
    np.testing.assert_array_equal(after[others], before[others])
    assert not np.allclose(after[3], before[3])
