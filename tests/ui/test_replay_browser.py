"""The replay app in headless Chromium: player, probes, compare, SQL, special stores; saves docs/screenshots."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("REVACNN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
VIEWPORT = {"width": 1600, "height": 1000}


def _require_browser() -> None:
    pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (set REVACNN_CHROMIUM)")


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Record a tiny session once: a root run (3 epochs) and a fork at epoch 1 (conv1 frozen, conv2 +2)."""
    _require_browser()
    import keras

    import revacnn
    from revacnn.data.shapes import load_shapes
    from revacnn.steering import parse
    from revacnn.trainer import fork

    root = tmp_path_factory.mktemp("replay-browser") / "store"
    x, y, xv, yv = load_shapes(384, 96, seed=0)
    names = ["red circle", "yellow circle", "yellow square", "green square", "green triangle",
             "blue triangle", "blue cross", "purple cross", "purple ring", "red ring"]
    L = keras.layers
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        L.Conv2D(8, 3, padding="same", activation="relu", name="conv1"), L.MaxPooling2D(2),
        L.Conv2D(10, 3, padding="same", activation="relu", name="conv2"), L.MaxPooling2D(2),
        L.Flatten(), L.Dense(10, activation="softmax", name="dense1"),
    ])
    store = revacnn.open_store(root)
    run = revacnn.fit(model, (x, y), validation_data=(xv, yv), epochs=3, batch_size=64, store=store,
                      probes=10, name="root", class_names=names, progress=False)
    child = fork(store, run.run_id, 1, changes=[parse("freeze", ["conv1"]), parse("add-filters", ["conv2", "2"])],
                 name="conv1-frozen", progress=False, data=((x, y), (xv, yv)))
    return {"store": root, "root": run.run_id, "fork": child.run_id}


def _special_stores(base: Path, recorded: dict[str, Any]) -> dict[str, Path]:
    """Empty store, a single-epoch run, a run still being written, and a corrupt epoch array."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from test_data import synthetic_store
    finally:
        sys.path.pop(0)
    import revacnn

    out = {"empty": base / "empty", "single": base / "single", "running": base / "running",
           "corrupt": base / "corrupt", "doctor": base / "doctor"}
    revacnn.open_store(out["empty"])
    synthetic_store(out["single"], epochs=0, fork=False)
    # a run whose doctor findings change from epoch to epoch: conv2 filter e "dead" at epoch e
    from revacnn.storage import RunWriter

    ids = synthetic_store(out["doctor"], epochs=3, fork=False)
    w = RunWriter(revacnn.open_store(out["doctor"]), ids["root"])
    for e in range(4):
        w.write_rows("diagnoses", e, [{"run_id": ids["root"], "epoch": e, "layer": "conv2", "filter_uid": e,
                                       "kind": "dead", "score": 1.0, "suggestion": None, "message": "dead",
                                       "filter": e}])
    synthetic_store(out["running"], epochs=1, fork=False, root_status="running")
    shutil.copytree(recorded["store"], out["corrupt"])
    store = revacnn.open_store(out["corrupt"], mode="r")
    act = store.layout.epoch_arrays(recorded["root"], 2) / "conv2" / "activations"
    for p in act.rglob("*"):
        if p.is_file() and p.name != "zarr.json":
            p.write_bytes(b"garbage, not a chunk")
    return out


@pytest.fixture(scope="session")
def special(recorded: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _special_stores(tmp_path_factory.mktemp("special"), recorded)


@pytest.fixture(scope="session")
def server(recorded: dict[str, Any], special: dict[str, Path]) -> Iterator[str]:
    """One Panel server in a thread with a route per store: main, empty, single, running, corrupt."""
    import panel as pn

    from revacnn.ui.apps import create_replay_app
    from revacnn.ui.serve import free_port

    stores = {"main": recorded["store"], **special}
    routes = {name: (lambda p=str(path): create_replay_app(p)) for name, path in stores.items()}
    port = free_port()
    srv = pn.serve(routes, port=port, address="127.0.0.1", show=False, threaded=True, start=True,
                   verbose=False, websocket_origin=[f"127.0.0.1:{port}"])
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/empty", timeout=5)
            break
        except OSError:
            time.sleep(0.2)
    yield url
    srv.stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def console_log() -> list[tuple[str, str]]:
    return []


@pytest.fixture()
def page(browser: Any, console_log: list[tuple[str, str]]) -> Iterator[Any]:
    ctx = browser.new_context(viewport=VIEWPORT)
    pg = ctx.new_page()
    pg.on("console", lambda m: console_log.append((m.type, m.text)))
    pg.on("pageerror", lambda e: console_log.append(("pageerror", str(e))))
    pg.set_default_timeout(30_000)
    yield pg
    ctx.close()


def _open(page: Any, url: str, ready: str = ".rv-net[data-epoch]") -> None:
    page.goto(url)
    page.wait_for_selector(ready)


def _tab(page: Any, name: str) -> None:
    page.locator(".bk-tab", has_text=name).first.click()


def _shot(locator: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    locator.screenshot(path=str(SHOTS / f"{name}.png"))


_DEEP_TEXT = """(el) => {
  const walk = (n) => {
    let t = '';
    if (n.shadowRoot) t += walk(n.shadowRoot);
    for (const c of n.childNodes) t += c.nodeType === 3 ? c.textContent : walk(c);
    return t;
  };
  return walk(el);
}"""


def _settled(page: Any, selector: str) -> None:
    """Wait for ``selector`` to be there, then for two rendered frames (before a screenshot; no sleep)."""
    page.locator(selector).first.wait_for()
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def _text(locator: Any) -> str:
    """All text under an element, through the shadow roots Panel renders into."""
    return locator.first.evaluate(_DEEP_TEXT)


def _sigs(page: Any) -> list[str]:
    return page.eval_on_selector_all(
        ".rv-main .rv-tab-network .rv-grid-acts", "els => els.map(e => e.getAttribute('data-sig'))")


# ------------------------------------------------------------------------------ tests
def test_player_changes_epoch_and_tiles(page: Any, server: str, recorded: dict[str, Any]) -> None:
    _open(page, f"{server}/main?run={recorded['root']}&epoch=0")
    net = page.locator(".rv-tab-network .rv-net").first
    assert net.get_attribute("data-epoch") == "0"
    before = _sigs(page)
    assert len(before) == 2 and all(before)
    _shot(page, "overview")
    _shot(page, "replay")  # the whole page (docs/screenshots/replay.png, beside live.png)
    page.locator(".rv-epoch-player .rv-next").click()
    page.wait_for_selector(".rv-tab-network .rv-net[data-epoch='1']")
    after = _sigs(page)
    assert after[0] != before[0] and after[1] != before[1]
    assert "epoch 1" in _text(page.locator(".rv-epoch-value"))
    assert page.locator(".rv-run-header .rv-title-bar[data-epoch='1']").count() == 1
    # the keyboard moves the slider too
    page.locator(".rv-epoch-player .rv-range").focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_selector(".rv-tab-network .rv-net[data-epoch='2']")
    _shot(page.locator(".rv-tab-network .rv-net").first, "network")
    _shot(page.locator(".rv-run-picker"), "run_picker")
    _shot(page.locator(".rv-patterns"), "patterns")


def test_doctor_dots_follow_the_player(page: Any, server: str, special: dict[str, Path]) -> None:
    """The player swaps the tiles in place; the doctor's dots are then those of the new epoch."""
    import revacnn

    run = revacnn.open_store(special["doctor"], mode="r").run(revacnn.open_store(special["doctor"]).run_ids()[0])
    diag = run.table("diagnoses")
    diag = diag[diag["filter_uid"].notna()]
    expected = {e: {(r.layer, int(r.filter_uid)) for r in diag[diag["epoch"] == e].itertuples()} for e in range(4)}
    assert len({frozenset(v) for v in expected.values()}) == 4, expected  # the findings change with the epoch
    _open(page, f"{server}/doctor?epoch=0", ".rv-tab-network .rv-net[data-complete='1']")
    for e in range(4):
        if e:
            page.locator(".rv-epoch-player .rv-next").click()
            page.wait_for_selector(f".rv-tab-network .rv-net[data-epoch='{e}']")
        shown = page.eval_on_selector_all(
            ".rv-tab-network .rv-grid-acts .rv-tile:has(.rv-doc-dot)",
            "els => els.map(t => [t.closest('.rv-layer').dataset.layer, +t.dataset.click.split(':').pop()])")
        assert {(layer, uid) for layer, uid in shown} == expected[e], e


def test_the_fork_marks_the_layers_its_surgery_touched(page: Any, server: str, recorded: dict[str, Any]) -> None:
    import json

    import revacnn

    # the fork's add-filters event names every layer the surgery changed (the trainer's plan)
    ev = revacnn.open_store(recorded["store"], mode="r").run(recorded["fork"]).events()
    touched = json.loads(ev[ev["kind"] == "add-filters"].iloc[0]["args"])["touched"]
    assert touched[0] == "conv2" and "dense1" in touched and "conv1" not in touched, touched
    _open(page, f"{server}/main?run={recorded['fork']}&epoch=1", ".rv-tab-network .rv-net[data-epoch='1']")
    page.locator('.rv-tab-network .rv-layer.rv-touched[data-layer="conv2"]').first.wait_for()
    assert page.locator('.rv-tab-network .rv-layer.rv-touched[data-layer="conv1"]').count() == 0
    assert "dense1" in _text(page.locator(".rv-tab-network .rv-touched-other"))
    assert "add-filters conv2" in _text(page.locator(".rv-tab-network .rv-layer-touched"))
    # the first paint is lazy (no filters rows); the rest arrives by itself
    page.wait_for_selector(".rv-tab-network .rv-net[data-complete='1']")
    _shot(page.locator(".rv-tab-network .rv-network").first, "replay-touched")
    # the next epoch: no surgery there
    page.locator(".rv-epoch-player .rv-next").click()
    page.wait_for_selector(".rv-tab-network .rv-net[data-epoch='2']")
    assert page.locator(".rv-tab-network .rv-layer.rv-touched").count() == 0


def test_class_probabilities_fit_at_1500_px(browser: Any, server: str, recorded: dict[str, Any]) -> None:
    """At 1,500 px the probability column is inside the page (it wraps below the layers if need be)."""
    ctx = browser.new_context(viewport={"width": 1500, "height": 1000})
    try:
        pg = ctx.new_page()
        pg.set_default_timeout(30_000)
        _open(pg, f"{server}/main?run={recorded['fork']}&epoch=2")
        probs = pg.locator(".rv-tab-network .rv-probs").first
        probs.wait_for()
        net = pg.locator(".rv-tab-network .rv-net").first.bounding_box()
        box = probs.bounding_box()
        assert box["width"] > 100
        assert box["x"] + box["width"] <= min(net["x"] + net["width"], 1500) + 1, (box, net)
        assert pg.locator(".rv-tab-network .rv-prob").count() == 10
    finally:
        ctx.close()


def test_probe_choice_changes_the_network_view(page: Any, server: str, recorded: dict[str, Any]) -> None:
    _open(page, f"{server}/main?run={recorded['root']}&epoch=2")
    img = page.locator(".rv-tab-network .rv-probe-img").first
    src0, key0 = img.get_attribute("src"), page.locator(".rv-tab-network .rv-net").first.get_attribute("data-key")
    page.locator(".rv-probe-chooser .rv-thumb[data-probe='3']").click()
    page.wait_for_selector(".rv-tab-network .rv-net[data-probe='3']")
    assert img.get_attribute("src") != src0
    assert page.locator(".rv-tab-network .rv-net").first.get_attribute("data-key") != key0
    assert page.locator(".rv-probe-chooser .rv-thumb.rv-active[data-probe='3']").count() == 1
    _shot(page.locator(".rv-probe-chooser"), "probes")
    # a click on a tile opens the filter detail
    page.locator(".rv-tab-network .rv-layer[data-layer='conv2'] .rv-grid-acts .rv-tile").nth(1).click()
    page.wait_for_selector(".rv-filter-detail .rv-fd[data-filter]")
    assert page.locator(".rv-filter-detail .rv-fd-acts .rv-fd-cell").count() == 10
    _settled(page, ".rv-filter-detail-view canvas")
    _shot(page.locator(".rv-filter-detail-view"), "filter_detail")


def test_compare_shows_two_runs(page: Any, server: str, recorded: dict[str, Any]) -> None:
    _open(page, f"{server}/main?run={recorded['fork']}&epoch=2")
    _shot(page.locator(".rv-epoch-player"), "player")  # a fork: hatched inherited epochs, fork and event marks
    _tab(page, "Compare")
    page.wait_for_selector(".rv-compare-side-a .rv-net[data-epoch='2']")
    page.wait_for_selector(".rv-compare-side-b .rv-net[data-epoch='2']")
    text = _text(page.locator(".rv-compare"))
    assert "root" in text and "conv1-frozen" in text and "B − A" in text
    # the fork added two conv2 filters: 12 tiles against 10
    assert page.locator(".rv-compare-side-a .rv-layer[data-layer='conv2'] .rv-tile").count() == 10
    assert page.locator(".rv-compare-side-b .rv-layer[data-layer='conv2'] .rv-tile").count() == 12
    _settled(page, ".rv-compare canvas")
    _shot(page.locator(".rv-compare"), "compare")


def test_other_views_render(page: Any, server: str, recorded: dict[str, Any]) -> None:
    _open(page, f"{server}/main?run={recorded['fork']}&epoch=3")
    _tab(page, "Curves")
    _settled(page, ".rv-curves canvas")
    _shot(page.locator(".rv-curves"), "curves")
    _tab(page, "Events")
    page.wait_for_selector(".rv-event-log .rv-table")
    assert "freeze" in _text(page.locator(".rv-event-log"))
    _shot(page.locator(".rv-event-log"), "events")
    # another run from the picker; its embedding (conv1 still learns there)
    page.locator(f".rv-run-picker .rv-run[data-run='{recorded['root']}']").click()
    page.wait_for_selector(f".rv-run-header .rv-title-bar[data-run='{recorded['root']}']")
    _tab(page, "Embedding")
    page.wait_for_selector(".rv-embedding-title b")
    _settled(page, ".rv-embedding canvas")
    _shot(page.locator(".rv-embedding"), "embedding")
    page.locator(".rv-embedding-mode button", has_text="all layers").click()
    page.get_by_text("all conv layers").first.wait_for()
    _settled(page, ".rv-embedding canvas")
    _shot(page.locator(".rv-embedding"), "embedding_layers")


def test_sql_console(page: Any, server: str) -> None:
    _open(page, f"{server}/main")
    _tab(page, "SQL")
    page.wait_for_selector(".rv-sql-ok")  # the first example runs when the tab opens
    box = page.locator(".rv-sql-input textarea")
    box.fill("SELECT run_id, epoch, val_accuracy FROM epochs ORDER BY run_id, epoch")
    page.locator(".rv-sql-run button").click()
    page.get_by_text("7 rows").first.wait_for()
    # the table renders its rows on its own schedule: wait until the previous result's are gone
    from playwright.sync_api import expect

    expect(page.locator(".rv-sql-results .tabulator-row")).to_have_count(7)
    _settled(page, ".rv-sql-results .tabulator-row")
    _shot(page.locator(".rv-sql-console"), "sql")
    box.fill("SELECT * FROM read_csv('/etc/passwd')")
    page.locator(".rv-sql-run button").click()
    page.wait_for_selector(".rv-sql-error")
    assert "cannot read or write files" in _text(page.locator(".rv-sql-error"))
    assert "root:x:0:0" not in page.content()
    assert "root:x:0:0" not in _text(page.locator("body"))
    assert page.locator(".rv-sql-results .tabulator-row").count() == 0


@pytest.mark.parametrize("route, css, text", [
    ("empty", ".rv-empty-store", "no runs yet"),
    ("single", ".rv-single-epoch", "single recorded epoch"),
    ("running", ".rv-running", "still being written"),
])
def test_special_stores_show_a_message(page: Any, server: str, special: dict[str, Path], route: str, css: str,
                                      text: str) -> None:
    if route == "running":  # the synthetic trainer is this process: keep its heartbeat fresh
        import revacnn
        from revacnn.storage import RunWriter

        store = revacnn.open_store(special["running"], mode="r")
        RunWriter(store, store.run_ids()[0]).heartbeat(every_s=0)
    page.goto(f"{server}/{route}")
    page.wait_for_selector(css)
    assert text in _text(page.locator(css))
    if route != "empty":
        page.wait_for_selector(".rv-tab-network .rv-net[data-epoch]")
    if route == "single":
        _shot(page.locator(".rv-main"), "single_epoch")


def test_corrupt_epoch_shows_a_message(page: Any, server: str, recorded: dict[str, Any]) -> None:
    _open(page, f"{server}/corrupt?run={recorded['root']}&epoch=2")
    err = page.locator(".rv-tab-network .rv-layer[data-layer='conv2'] .rv-layer-error")
    assert "corrupt" in _text(err)
    assert page.locator(".rv-tab-network .rv-layer[data-layer='conv1'] .rv-grid-acts .rv-tile").count() == 8
    page.locator(".rv-epoch-player .rv-next").click()  # the next epoch is fine
    page.wait_for_selector(".rv-tab-network .rv-net[data-epoch='3']")
    assert page.locator(".rv-tab-network .rv-layer-error").count() == 0


def test_tile_images_are_real_pictures(page: Any, server: str, recorded: dict[str, Any]) -> None:
    """The sprite behind the tiles decodes to an image with one tile per filter."""
    _open(page, f"{server}/main?run={recorded['root']}&epoch=3")
    grid = page.locator(".rv-tab-network .rv-layer[data-layer='conv1'] .rv-grid-acts").first
    page.wait_for_function("g => g.dataset.drawn && g.dataset.drawn === g.dataset.sprite", arg=grid.element_handle())
    uri = grid.get_attribute("data-sprite")
    assert uri.startswith("blob:")  # the PNG sent as a data URI, handed over as a short blob: URL
    size, kind = page.evaluate(
        "async (src) => { const img = new Image(); img.src = src; await img.decode();"
        " const b = await (await fetch(src)).blob(); return [[img.naturalWidth, img.naturalHeight], b.type]; }", uri)
    assert kind == "image/png"
    assert size == [8 * (32 + 2), 32 + 2]  # eight 32x32 tiles, each with a 1-pixel edge


_TILE_VS_SPRITE = """
async (g) => {
  // tile i on the canvas, at the on-screen spot of tile element i, against tile i cut from the sprite
  const img = new Image(); img.src = g.dataset.sprite; await img.decode();
  const c = g.querySelector('canvas.rv-canvas'), ctx = c.getContext('2d'), gr = c.getBoundingClientRect();
  const dpr = c.width / gr.width, pad = 1, w = (img.naturalWidth / 8) - 2 * pad, h = img.naturalHeight - 2 * pad;
  const ref = document.createElement('canvas'); ref.width = w; ref.height = h;
  const rc = ref.getContext('2d');
  const out = [];
  [...g.querySelectorAll('.rv-tile .rv-img')].forEach((el, i) => {
    const r = el.getBoundingClientRect();
    rc.clearRect(0, 0, w, h); rc.drawImage(img, i * (w + 2 * pad) + pad, pad, w, h, 0, 0, w, h);
    for (const [u, v] of [[0.25, 0.25], [0.75, 0.5], [0.5, 0.9]]) {  // sample points inside the tile
      const px = ctx.getImageData(Math.floor((r.left - gr.left + u * r.width) * dpr),
                                  Math.floor((r.top - gr.top + v * r.height) * dpr), 1, 1).data;
      const want = rc.getImageData(Math.floor(u * w), Math.floor(v * h), 1, 1).data;
      out.push([i, [...px].slice(0, 3), [...want].slice(0, 3)]);
    }
  });
  return out;
}
"""


def test_canvas_tiles_match_the_sprite_after_a_slider_move(page: Any, server: str, recorded: dict[str, Any]) -> None:
    """The layer canvas shows tile i of the epoch's sprite under tile element i, also after a switch."""
    _open(page, f"{server}/main?run={recorded['root']}&epoch=2")
    page.locator(".rv-epoch-player .rv-next").click()
    page.wait_for_selector(".rv-tab-network .rv-net[data-epoch='3']")
    grid = page.locator(".rv-tab-network .rv-layer[data-layer='conv1'] .rv-grid-acts").first
    page.wait_for_function("g => g.dataset.drawn && g.dataset.drawn === g.dataset.sprite", arg=grid.element_handle())
    samples = page.evaluate(_TILE_VS_SPRITE, grid.element_handle())
    assert len(samples) == 8 * 3
    for i, got, want in samples:
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1, (i, got, want)
    # and back: the canvas follows the move to the earlier epoch
    page.locator(".rv-epoch-player .rv-prev").click()
    page.wait_for_selector(".rv-tab-network .rv-net[data-epoch='2']")
    page.wait_for_function("g => g.dataset.drawn && g.dataset.drawn === g.dataset.sprite", arg=grid.element_handle())
    before = page.evaluate(_TILE_VS_SPRITE, grid.element_handle())
    for i, got, want in before:
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1, (i, got, want)


def test_no_errors_in_the_browser_console(console_log: list[tuple[str, str]]) -> None:
    """Runs last in this file: nothing above logged an error or an uncaught exception."""
    errors = [(t, m) for t, m in console_log if t in ("error", "pageerror")]
    assert console_log, "no console messages were collected"
    assert not errors, errors
