"""Fast tests of the replay app's data layer and view logic on synthetic stores (no browser, no TensorFlow)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from revacnn.storage import RunWriter, create_session, open_store
from revacnn.ui.data import NetworkFrame, ReplayData, frame_from_live
from revacnn.ui.render import activation_rgb, kernel_channels_rgb, kernel_rgb, rgba_uint32, sprite

CLASSES = ["red", "green", "blue"]


def _layer_arrays(rng: np.random.Generator, uids: np.ndarray, c_in: int, hw: int, n_probes: int,
                  epoch: int, frozen: np.ndarray, index: int) -> dict[str, Any]:
    f = len(uids)
    return {
        "kernel": rng.normal(size=(f, 3, 3, c_in)).astype(np.float32),
        "bias": np.zeros(f, np.float32),
        "activations": np.abs(rng.normal(size=(n_probes, f, hw, hw)) * (epoch + 1)).astype(np.float16),
        "grad_l1": np.abs(rng.normal(size=f)).astype(np.float32),
        "weight_change_l1": np.abs(rng.normal(size=f)).astype(np.float32),
        "act_mean": np.abs(rng.normal(size=f)).astype(np.float32),
        "embedding": rng.normal(size=(f, 2)).astype(np.float32) * 5,
        "layer_embedding": rng.normal(size=(f, 2)).astype(np.float32) * 5,
        "filter_uids": uids.astype(np.int64),
        "frozen": frozen.astype(np.uint8),
        "_attrs": {"kind": "conv", "index": index, "frozen": bool(frozen.all())},
    }


def _write_epoch(w: RunWriter, rng: np.random.Generator, epoch: int, uids: dict[str, np.ndarray],
                 frozen_layers: set[str], n_probes: int) -> None:
    layers = {}
    filter_rows, layer_rows = [], []
    for i, (name, c_in, hw) in enumerate((("conv1", 3, 16), ("conv2", len(uids["conv1"]), 8))):
        u = uids[name]
        frozen = np.full(len(u), name in frozen_layers)
        arrs = _layer_arrays(rng, u, c_in, hw, n_probes, epoch, frozen, i)
        layers[name] = arrs
        for j, uid in enumerate(u):
            filter_rows.append({
                "run_id": w.run_id, "epoch": epoch, "layer": name, "filter": j, "filter_uid": int(uid),
                "frozen": bool(frozen[j]), "grad_l1": float(arrs["grad_l1"][j]), "weight_l2": 1.0,
                "weight_change_l1": float(arrs["weight_change_l1"][j]), "act_mean": float(arrs["act_mean"][j]),
                "tsne_x": float(arrs["embedding"][j, 0]), "tsne_y": float(arrs["embedding"][j, 1]),
                "layer_tsne_x": float(arrs["layer_embedding"][j, 0]),
                "layer_tsne_y": float(arrs["layer_embedding"][j, 1]),
            })
        layer_rows.append({
            "run_id": w.run_id, "epoch": epoch, "layer": name, "kind": "conv", "n_filters": len(u),
            "frozen": name in frozen_layers, "n_frozen_filters": int(frozen.sum()), "grad_l1": 1.0,
            "weight_l2": 1.0, "cluster_score": 0.1 * epoch, "rgb_mono_fraction": 0.2 if name == "conv1" else None,
            "layer_index": i,
        })
    layers["dense1"] = {"kernel": rng.normal(size=(3, 8)).astype(np.float32), "_attrs": {"kind": "dense"}}
    probs = rng.dirichlet(np.ones(3), size=n_probes).astype(np.float32)
    metrics = {"loss": 1.0 / (epoch + 1), "accuracy": 0.3 + 0.1 * epoch, "val_loss": 1.1 / (epoch + 1),
               "val_accuracy": 0.3 + 0.1 * epoch, "lr": 1e-3, "duration_s": 1.0, "cumulative_time_s": float(epoch)}
    w.write_arrays(epoch, layers, {"metrics": metrics}, extra={"predictions": probs})
    w.write_rows("filters", epoch, filter_rows)
    w.write_rows("layers", epoch, layer_rows)
    w.commit(epoch, metrics)


def synthetic_store(root: Path, *, epochs: int = 3, fork: bool = True, n_probes: int = 6,
                    root_status: str = "finished") -> dict[str, str]:
    """A store with one session, a root run of ``epochs`` epochs and (optionally) a fork at epoch 1
    that freezes conv1 and adds two conv2 filters. Returns run ids by name."""
    rng = np.random.default_rng(0)
    store = open_store(root)
    images = rng.integers(0, 255, size=(n_probes, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(n_probes) % 3
    sid = create_session(store, dataset="synthetic", model="tiny", probe_images=images, probe_labels=labels,
                         probe_indices=list(range(n_probes)), class_names=CLASSES, config={})
    w = RunWriter.create(store, session_id=sid, config={}, name="root")
    uids = {"conv1": np.arange(4), "conv2": np.arange(5)}
    for e in range(epochs + 1):
        _write_epoch(w, rng, e, uids, set(), n_probes)
    if root_status != "running":
        w.set_status(root_status)
    out = {"root": w.run_id, "session": sid}
    if fork:
        f = RunWriter.create(store, session_id=sid, config={}, name="fork", parent_run_id=w.run_id, fork_epoch=1)
        uids2 = {"conv1": np.arange(4), "conv2": np.arange(7)}
        f.write_event(event_id="cmd-1", epoch=1, batch=0, kind="freeze", args={"layer": "conv1"},
                      status="applied", message="fork change: conv1 frozen")
        f.write_event(event_id="cmd-2", epoch=1, batch=0, kind="add-filters", args={"layer": "conv2", "n": 2},
                      status="applied", message="fork change: 2 filters added")
        for e in range(1, epochs + 1):
            _write_epoch(f, rng, e, uids2, {"conv1"}, n_probes)
        f.set_status("finished")
        out["fork"] = f.run_id
    return out


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("ui-store")
    ids = synthetic_store(root)
    return root, ids


# ------------------------------------------------------------------------------ data layer
def test_tree_lists_sessions_and_fork_trees(store_dir: tuple[Path, dict[str, str]]) -> None:
    root, ids = store_dir
    rows = ReplayData(root).tree()
    kinds = [r["kind"] for r in rows]
    assert kinds == ["session", "run", "run"]
    run_rows = [r for r in rows if r["kind"] == "run"]
    assert [r["run_id"] for r in run_rows] == [ids["root"], ids["fork"]]
    assert run_rows[1]["depth"] == 1 and run_rows[1]["fork_epoch"] == 1
    assert run_rows[0]["last_epoch"] == 3
    assert run_rows[0]["best_val_accuracy"] == pytest.approx(0.6)


def test_bundle_holds_the_full_history_and_marks(store_dir: tuple[Path, dict[str, str]]) -> None:
    root, ids = store_dir
    b = ReplayData(root).bundle(ids["fork"])
    assert b.epochs == [0, 1, 2, 3]
    assert b.source(0) == ids["root"] and b.source(1) == ids["fork"]
    assert b.metrics["inherited"].tolist() == [True, False, False, False]
    kinds = {m["kind"] for m in b.marks}
    assert {"fork", "event"} <= kinds
    assert b.conv_layers(2) == ["conv1", "conv2"]
    assert b.layer_frozen(2, "conv1") and not b.layer_frozen(2, "conv2")
    hist = b.filter_history("conv2", 6)
    assert hist["epoch"].tolist() == [1, 2, 3]
    parent = ReplayData(root).bundle(ids["root"])
    assert any(m["kind"] == "child" and m["epoch"] == 1 for m in parent.marks)


def test_frame_reads_arrays_and_marks_added_filters(store_dir: tuple[Path, dict[str, str]]) -> None:
    root, ids = store_dir
    data = ReplayData(root)
    b = data.bundle(ids["fork"])
    f = data.frame(b, 1, prefetch=False)
    assert f.message is None
    assert [lf.name for lf in f.layers] == ["conv1", "conv2"]
    c1, c2 = f.layers
    assert c1.activations.shape == (6, 4, 16, 16) and c1.kernel.shape == (4, 3, 3, 3)
    assert c2.kernel is None and c2.n_filters == 7
    assert c1.frozen.all() and c1.layer_frozen
    assert c2.added.tolist() == [False] * 5 + [True] * 2
    assert set(c2.measures) == {"grad_l1", "act_mean", "weight_change_l1"}
    assert f.probabilities.shape == (6, 3)
    assert f.source_run_id == ids["fork"] and f.metrics["val_accuracy"] == pytest.approx(0.4)
    # an inherited epoch comes from the parent
    f0 = data.frame(b, 0, prefetch=False)
    assert f0.source_run_id == ids["root"] and f0.layers[1].n_filters == 5
    # an epoch that is not in the history
    assert "no committed epoch 9" in data.frame(b, 9).message
    # the kernel of a deeper layer on demand
    assert data.kernel(b, 2, "conv2").shape == (7, 3, 3, 4)


def test_missing_and_corrupt_arrays_give_messages(tmp_path: Path) -> None:
    ids = synthetic_store(tmp_path, fork=False)
    store = open_store(tmp_path, mode="r")
    shutil.rmtree(store.layout.epoch_arrays(ids["root"], 2))
    chunk_dir = store.layout.epoch_arrays(ids["root"], 3) / "conv2" / "activations"
    for p in chunk_dir.rglob("*"):
        if p.is_file() and p.name != "zarr.json":
            p.write_bytes(b"this is not a blosc chunk")
    data = ReplayData(tmp_path)
    b = data.bundle(ids["root"])
    missing = data.frame(b, 2, prefetch=False)
    assert missing.layers == [] and "missing" in missing.message
    corrupt = data.frame(b, 3, prefetch=False)
    assert corrupt.layers[0].error is None
    assert "corrupt" in corrupt.layers[1].error
    # the network view shows both as messages, not exceptions
    from revacnn.ui.views.network import NetworkView

    view = NetworkView(frame=missing)
    assert "missing" in view.render_data()["message"]
    view.frame = corrupt
    d = view.render_data()
    assert d["layers"][1]["error"] and d["layers"][0]["sig"]


def test_frame_from_live_snapshot() -> None:
    rng = np.random.default_rng(1)
    snap = {
        "meta": {"run_id": "run-x", "epoch": 2, "batch": 5, "n_batches": 10, "frozen_layers": ["conv1"],
                 "uids": {"conv1": [0, 1, 2], "conv2": [0, 1, 3]}, "frozen_filters": {"conv2": [3]}},
        "kernels": {"conv1": rng.normal(size=(3, 3, 3, 3)), "conv2": rng.normal(size=(3, 3, 3, 3))},
        "activations": {"conv1": rng.random((4, 3, 8, 8)).astype(np.float16),
                        "conv2": rng.random((4, 3, 4, 4)).astype(np.float16)},
        "probabilities": rng.dirichlet(np.ones(3), size=4),
    }
    images = rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    f = frame_from_live(snap, images, np.arange(4) % 3, CLASSES,
                        previous_uids={"conv2": np.array([0, 1, 2])})
    assert f.label.startswith("live · epoch 2") and f.epoch == 2
    assert f.layers[0].frozen.all() and f.layers[0].layer_frozen
    assert f.layers[1].frozen.tolist() == [False, False, True]
    assert f.layers[1].added.tolist() == [False, False, True] and f.layers[1].deleted == [2]
    from revacnn.ui.views.network import NetworkView

    d = NetworkView(frame=f).render_data()
    assert [lay["name"] for lay in d["layers"]] == ["conv1", "conv2"]
    assert d["layers"][1]["deleted"] == [2]


# ------------------------------------------------------------------------------ rendering
def test_render_helpers() -> None:
    rng = np.random.default_rng(2)
    k = kernel_rgb(rng.normal(size=(5, 3, 3, 3)))
    assert k.dtype == np.uint8 and k.shape == (5, 3, 3, 3) and k.min() == 0 and k.max() == 255
    assert kernel_rgb(rng.normal(size=(2, 3, 3, 1))).shape == (2, 3, 3, 3)
    a = activation_rgb(np.zeros((3, 4, 4)))
    assert a.shape == (3, 4, 4, 3) and (a == a[0, 0, 0]).all()  # silent maps stay dark, no NaN
    assert kernel_channels_rgb(rng.normal(size=(3, 3, 7))).shape == (7, 3, 3, 3)
    s = sprite(np.zeros((6, 4, 5, 3), np.uint8))
    assert s.n == 6 and s.tile_h == 4 and s.tile_w == 5 and s.uri.startswith("data:image/png;base64,")
    assert rgba_uint32(np.zeros((2, 3, 3), np.uint8)).dtype == np.uint32


def test_network_view_changes_with_epoch_probe_and_measure(store_dir: tuple[Path, dict[str, str]]) -> None:
    from revacnn.ui.views.network import NetworkView

    root, ids = store_dir
    data = ReplayData(root)
    b = data.bundle(ids["root"])
    view = NetworkView(frame=data.frame(b, 1, prefetch=False))
    d1 = view.render_data()
    assert d1["epoch"] == 1 and d1["probe_img"].startswith("data:image/png")
    assert "weights" in d1["layers"][0] and "weights" not in d1["layers"][1]
    view.frame = data.frame(b, 2, prefetch=False)
    d2 = view.render_data()
    assert [lay["sig"] for lay in d1["layers"]] != [lay["sig"] for lay in d2["layers"]]
    view.probe = 3
    d3 = view.render_data()
    assert d3["probe"] == 3 and d3["probe_img"] != d2["probe_img"] and d3["key"] != d2["key"]
    bars = {m: None for m in ("grad_l1", "act_mean")}
    for m in bars:
        view.measure = m
        bars[m] = view.render_data()["layers"][0]["bar"]
    assert bars["grad_l1"] != bars["act_mean"] and max(bars["grad_l1"]) == 1.0
    view.show_weights = False
    assert "weights" not in view.render_data()["layers"][0]
    # clicking a tile selects (layer, uid)
    view._canvas.clicked = "conv2:4|1"
    assert view.selected == ("conv2", 4)
    assert NetworkView().render_data()["message"]


# ------------------------------------------------------------------------------ the app (no browser)
def test_replay_app_switches_epochs_and_runs(store_dir: tuple[Path, dict[str, str]]) -> None:
    from revacnn.ui.apps import ReplayApp

    root, ids = store_dir
    app = ReplayApp(str(root))
    assert app.run_id == ids["fork"] and app.epoch == 3
    assert app.player.epochs == [0, 1, 2, 3] and app.player.inherited_upto == 1
    assert app.compare.run_a == ids["root"] and app.compare.run_b == ids["fork"]
    sig3 = [lay["sig"] for lay in app.network.render_data()["layers"]]
    dt = app.show_sync(ids["fork"], 2)
    assert dt < 5 and app.network.render_data()["epoch"] == 2 and app.player.shown == 2
    assert [lay["sig"] for lay in app.network.render_data()["layers"]] != sig3
    assert "data-epoch='2'" in app.header.object
    assert app.curves.overlays.current.data["x"] == [2.0]
    assert app.patterns.cards()[0]["layer"] == "conv1"
    app.probe = 2
    assert app.network.render_data()["probe"] == 2 and app.probes.value == 2
    app.selected = ("conv2", 6)
    detail = app.detail.render_data()
    assert detail["id"] == "conv2:6" and "weights" in detail and detail["acts"]["n"] == 6
    assert len(app.detail._hist.data["epoch"]) == 3
    # the compare view draws both runs once it is shown
    app.compare.active = True
    app.compare.update_sync()
    assert app.compare.net_a.frame.run_id == ids["root"] and app.compare.net_b.frame.run_id == ids["fork"]
    assert "B − A" in app.compare._summary.object
    # the embedding view in each mode
    for mode in ("node", "layer", "cloud"):
        app.embedding.mode = mode
        assert app.embedding._title.object
    app.embedding.mode = "node"
    assert len(app.embedding._circ.data["x"]) == 4
    # another run through the picker
    app.picker._tree.clicked = f"{ids['root']}|1"
    assert app.run_id == ids["root"] and app.bundle.run_id == ids["root"]
    assert app.events.rows() == []


def test_sql_console_shows_rows_and_refuses_files(store_dir: tuple[Path, dict[str, str]]) -> None:
    from revacnn.ui.views.sql import SQLConsole

    root, _ = store_dir
    console = SQLConsole(runner=ReplayData(root).sql)
    df = console.run_sync("SELECT run_id, epoch, val_accuracy FROM epochs ORDER BY epoch")
    assert df is not None and len(df) == 7 and console.error is None
    assert "7 rows" in console._status.object and len(console._table.value) == 7
    assert console._y.value == "val_accuracy" and len(console._plot_src.data["x"]) == 7
    assert console._csv().getvalue().startswith("run_id,epoch,val_accuracy")
    assert console.run_sync("SELECT * FROM read_csv('/etc/passwd')") is None
    assert "cannot read or write files" in console.error
    assert "root:" not in console._status.object and console._table.value.empty
    assert console.run_sync("DELETE FROM epochs") is None and "SELECT" in console.error
    console._kind.value = "lines"
    console.run_sync("SELECT run_id, epoch, val_accuracy FROM epochs")
    assert len(console._line_src.data["xs"]) == 2


@pytest.mark.parametrize("case", ["missing", "empty", "no-runs", "single", "running"])
def test_special_stores_show_a_message(tmp_path: Path, case: str) -> None:
    from revacnn.ui.apps import ReplayApp

    path = tmp_path / "store"
    if case == "empty":
        path.mkdir()
    elif case == "no-runs":
        open_store(path)
    elif case == "single":
        synthetic_store(path, epochs=0, fork=False)
    elif case == "running":
        synthetic_store(path, epochs=1, fork=False, root_status="running")
    app = ReplayApp(str(path))
    text = app.message.object
    assert app.message.visible and text
    expected = {"missing": "rv-store-message", "empty": "rv-store-message", "no-runs": "rv-empty-store",
                "single": "rv-single-epoch", "running": "rv-running"}[case]
    assert expected in text
    if case in ("single", "running"):
        assert app.network.render_data()["layers"]


def test_player_and_pickers() -> None:
    from revacnn.ui.views.player import EpochPlayer
    from revacnn.ui.views.probes import ProbeChooser
    from revacnn.ui.views.runs import RunPicker

    p = EpochPlayer(epochs=[0, 1, 2, 5], value=1)
    p.step(1)
    assert p.value == 2 and p._widget.value == 2
    p.step(10)
    assert p.value == 5
    p._widget.value = 0  # the browser moved it
    assert p.value == 0
    chooser = ProbeChooser(images=np.zeros((3, 4, 4, 3), np.uint8), labels=np.array([0, 1, 2]),
                           class_names=CLASSES, probabilities=np.eye(3))
    d = chooser.render_data()
    assert d["n"] == 3 and d["correct"] == [True, True, True] and d["names"] == CLASSES
    chooser._strip.clicked = "2|1"
    assert chooser.value == 2
    picker = RunPicker(rows=[{"kind": "run", "run_id": "r1"}])
    picker._tree.clicked = "nope|1"
    assert picker.value is None
    picker._tree.clicked = "r1|2"
    assert picker.value == "r1"


def test_event_log_and_patterns() -> None:
    from revacnn.ui.views.events import EventLog
    from revacnn.ui.views.patterns import PatternIndicators, cluster_note, mono_note

    ev = pd.DataFrame([{"run_id": "r", "event_id": "e", "epoch": 2, "batch": 3, "at": pd.Timestamp.now(),
                        "kind": "freeze", "args": json.dumps({"layer": "conv1"}), "status": "rejected",
                        "message": "no such layer", "latency_ms": 12.0, "inherited": False}])
    rows = EventLog(events=ev).rows()
    assert rows[0]["args"] == "layer=conv1" and rows[0]["latency"] == "12 ms"
    lay = pd.DataFrame([{"epoch": e, "layer": "conv1", "kind": "conv", "cluster_score": 0.1 * e,
                         "rgb_mono_fraction": 0.6, "n_filters": 4, "n_frozen_filters": 0, "frozen": False,
                         "layer_index": 0} for e in range(3)])
    cards = PatternIndicators(layers=lay, epoch=2).cards()
    assert cards[0]["rows"][0]["trend"].startswith("▲") and cards[0]["rows"][1]["text"] == "60%"
    assert cluster_note(0.9)[0].startswith("crowded") and mono_note(0.1)[0].startswith("filters mix")


def test_datashader_cloud_for_many_points() -> None:
    from revacnn.ui.views.embedding import DATASHADE_ABOVE, datashade_cloud

    rng = np.random.default_rng(3)
    n = DATASHADE_ABOVE + 1000
    df = pd.DataFrame({"x": rng.normal(size=n), "y": rng.normal(size=n),
                       "layer": rng.choice(["conv1", "conv2"], size=n)})
    img, extent = datashade_cloud(df, "x", "y", width=200, height=100)
    assert img.shape == (100, 200) and img.dtype == np.uint32 and (img != 0).any()
    assert extent[0] < extent[2] and extent[1] < extent[3]


def test_serve_rejects_unknown_apps(capsys: pytest.CaptureFixture[str]) -> None:
    from revacnn.ui.serve import free_port, serve

    assert serve("nope", store="store") == 2
    assert "expected one of replay, live" in capsys.readouterr().err
    assert 1024 < free_port() < 65536


def test_empty_frame() -> None:
    f = NetworkFrame.empty("nothing")
    assert f.n_probes == 0 and f.layer("conv1") is None and f.message == "nothing"


def test_running_run_is_followed(tmp_path: Path) -> None:
    import asyncio

    from revacnn.ui.apps import ReplayApp

    ids = synthetic_store(tmp_path, epochs=1, fork=False, root_status="running")
    app = ReplayApp(str(tmp_path))
    assert app.bundle.epochs == [0, 1] and app.epoch == 1
    w = RunWriter(open_store(tmp_path, mode="r"), ids["root"])
    _write_epoch(w, np.random.default_rng(9), 2, {"conv1": np.arange(4), "conv2": np.arange(5)}, set(), 6)
    app.data.watcher.check()
    # in a fresh thread: an earlier test (Playwright's sync API) may leave a loop on this one
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, app._refresh()).result()
    assert app.bundle.epochs == [0, 1, 2]
    assert app.epoch == 2 and app.network.render_data()["epoch"] == 2  # it was on the last epoch: it follows


# ------------------------------------------------------------------------------ lazy first page
def test_light_bundle_paints_first_and_the_full_one_completes_it(store_dir: tuple[Path, dict[str, str]]) -> None:
    from revacnn.ui.apps import ReplayApp

    root, ids = store_dir
    full = ReplayData(root).bundle(ids["fork"])
    ref = ReplayData(root).frame(full, 1, prefetch=False)  # the reference: from every table
    data = ReplayData(root)
    light = data.bundle(ids["fork"], light=True)
    assert light.partial and light.filters.empty and not full.partial
    # everything but the filters rows is there
    assert light.epochs == full.epochs and light.metrics.equals(full.metrics)
    assert light.layers.equals(full.layers) and len(light.events) == len(full.events)
    f = data.frame(light, 1, prefetch=False)
    assert f.partial and f.key != ref.key
    for lf, rl in zip(f.layers, ref.layers, strict=True):
        # uids and frozen flags come from the epoch's arrays: the same as the filters rows say
        assert lf.uids.tolist() == rl.uids.tolist() and lf.frozen.tolist() == rl.frozen.tolist()
        assert np.array_equal(lf.activations, rl.activations)
        assert lf.measures == {} and rl.measures
    # the app: first paint from the light bundle, then the full one (a fresh server: empty caches)
    ReplayData._instances.pop(str(Path(root).absolute()), None)
    app = ReplayApp(str(root), lazy=True)
    assert app.bundle.partial and not app.complete_bundle
    assert app.network.render_data()["complete"] is False
    app.complete()
    assert app.complete_bundle and app.network.render_data()["complete"] is True
    want = ReplayData(root).frame(full, app.epoch, prefetch=False)
    for lf, rl in zip(app.frame.layers, want.layers, strict=True):
        assert set(lf.measures) == set(rl.measures)
        for m in rl.measures:
            assert np.array_equal(lf.measures[m], rl.measures[m])
    # outside a served session the app reads everything at once (as before)
    assert not ReplayApp(str(root)).bundle.partial


# ------------------------------------------------------------------------------ surgery marks
def _events(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([{"status": "applied", "batch": 3, **r,
                          "args": json.dumps(r.get("args", {}))} for r in rows])


def test_touched_layers_come_from_applied_surgery_events() -> None:
    from revacnn.ui.data import touched_layers

    ev = _events([
        {"epoch": 2, "kind": "add-filters", "args": {"layer": "conv1", "n": 2,
                                                     "touched": ["conv1", "bn1", "conv2"]}},
        {"epoch": 2, "kind": "freeze", "args": {"layer": "conv3"}},  # not surgery
        {"epoch": 2, "kind": "delete-filters", "args": {"layer": "conv3", "indices": [0]},
         "status": "rejected"},  # not applied
        {"epoch": 3, "kind": "reinit-filters", "args": {"layer": "conv2", "indices": [1]}},  # no touched: target
    ])
    assert touched_layers(ev, 2) == {"conv1": "add-filters conv1", "bn1": "add-filters conv1",
                                     "conv2": "add-filters conv1"}
    assert touched_layers(ev, 3) == {"conv2": "reinit-filters conv2"}
    both = touched_layers(ev, 3, after=1)
    assert both["conv2"] == "add-filters conv1; reinit-filters conv2" and set(both) == {"conv1", "bn1", "conv2"}
    assert touched_layers(ev, 1) == {} and touched_layers(None, 2) == {} and touched_layers(ev, None) == {}


def test_replay_marks_the_layers_a_surgery_touched(store_dir: tuple[Path, dict[str, str]]) -> None:
    from revacnn.ui.apps import ReplayApp
    from revacnn.ui.views.network import NetworkView

    root, ids = store_dir
    app = ReplayApp(str(root))
    assert app.run_id == ids["fork"]
    # the fork's change (add-filters conv2 at its fork point, epoch 1) is marked there only
    app.show_sync(ids["fork"], 1)
    layers = {L["name"]: L for L in app.network.render_data()["layers"]}
    assert layers["conv2"]["touched"] == "add-filters conv2" and layers["conv1"]["touched"] is None
    app.show_sync(ids["fork"], 2)
    assert all(L["touched"] is None for L in app.network.render_data()["layers"])
    assert app.bundle.touched(2) == {} and app.bundle.touched(1) == {"conv2": "add-filters conv2"}
    # layers without a column (BatchNorm, dense) are listed beside the network
    view = NetworkView(frame=app.frame, touched={"conv1": "add-filters conv1", "dense1": "add-filters conv1"})
    d = view.render_data()
    assert d["layers"][0]["touched"] == "add-filters conv1"
    assert d["touched_other"] == [{"name": "dense1", "label": "add-filters conv1"}]
