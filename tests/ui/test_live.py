"""Unit tests of the live page without a browser or TensorFlow: feed, views, steering controls, launcher."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from revacnn.steering.channel import CommandQueue
from revacnn.storage import RunWriter, create_session, open_store
from revacnn.storage.live import write_live_snapshot
from revacnn.ui import launcher
from revacnn.ui.data import ReplayData, StoreWatcher, frame_from_live
from revacnn.ui.feed import FeedState
from revacnn.ui.live import LiveApp, create_live_app, steering_permission
from revacnn.ui.views.curves import event_x
from revacnn.ui.views.network import NetworkView
from revacnn.ui.views.steering import SteeringControls, format_indices, parse_indices

LAYERS = {"conv1": (4, 3, 3, 3), "conv2": (6, 3, 3, 4)}


def _fake_run(root: Path, *, epochs: int = 1) -> tuple[object, RunWriter]:
    """A store with one run recorded by hand: ``epochs`` epoch records and a live snapshot."""
    store = open_store(root)
    rng = np.random.default_rng(0)
    sid = create_session(store, dataset="shapes", model="tiny", probe_images=rng.integers(0, 255, (2, 8, 8, 3)),
                         probe_labels=np.array([0, 1]), probe_indices=[0, 1], class_names=["a", "b"],
                         config={})
    w = RunWriter.create(store, session_id=sid, config={"epochs": 5, "model": "tiny"}, name="fake")
    for e in range(epochs):
        _commit(w, e, rng)
    _snapshot(w, epoch=epochs, batch=3)
    return store, w


def _commit(w: RunWriter, epoch: int, rng: np.random.Generator, *, frozen: tuple[str, ...] = ()) -> None:
    arrays = {}
    rows = []
    filters = []
    for name, (f, kh, kw, c) in LAYERS.items():
        emb = rng.normal(size=(f, 2)).astype(np.float32)
        filters += [{"run_id": w.run_id, "epoch": epoch, "layer": name, "filter": i, "filter_uid": i,
                     "frozen": name in frozen, "grad_l1": 1.0, "tsne_x": float(emb[i, 0]),
                     "tsne_y": float(emb[i, 1])} for i in range(f)]
        arrays[name] = {
            "kernel": rng.normal(size=(f, kh, kw, c)).astype(np.float32),
            "bias": np.zeros(f, np.float32),
            "activations": rng.random((2, f, 8, 8)).astype(np.float32),
            "grad_l1": rng.random(f).astype(np.float32),
            "embedding": emb,
            "filter_uids": np.arange(f, dtype=np.int64),
            "frozen": np.full(f, name in frozen),
            "_attrs": {"kind": "conv"},
        }
        rows.append({"run_id": w.run_id, "epoch": epoch, "layer": name, "kind": "conv", "n_filters": f,
                     "frozen": name in frozen, "n_frozen_filters": f if name in frozen else 0})
    arrays["dense1"] = {"kernel": np.zeros((24, 2), np.float32), "filter_uids": np.arange(2),
                        "_attrs": {"kind": "dense"}}
    w.write_arrays(epoch, arrays, {"metrics": {}})
    w.write_rows("layers", epoch, rows)
    w.write_rows("filters", epoch, filters)
    w.commit(epoch, {"loss": 1.0 / (epoch + 1), "accuracy": 0.5, "val_loss": 1.1, "val_accuracy": 0.4,
                     "lr": 1e-3, "n_batches": 10})


def _snapshot(w: RunWriter, *, epoch: int, batch: int, frozen_layers: tuple[str, ...] = (),
              uids: dict | None = None) -> None:
    rng = np.random.default_rng(epoch * 100 + batch)
    uids = uids or {name: list(range(shape[0])) for name, shape in LAYERS.items()} | {"dense1": [0, 1]}
    kernels = {n: rng.normal(size=(len(uids[n]), *LAYERS[n][1:])).astype(np.float32) for n in LAYERS}
    acts = {n: rng.random((2, len(uids[n]), 8, 8)).astype(np.float16) for n in LAYERS}
    meta = {"run_id": w.run_id, "epoch": epoch, "batch": batch, "n_batches": 10, "lr": 1e-3, "paused": False,
            "frozen_layers": list(frozen_layers), "uids": uids, "frozen_filters": {"conv2": [1]},
            "published_at": time.time()}
    hist = [(epoch, b, 1.0 / (b + 1), 0.1 * b, time.time()) for b in range(1, batch + 1)]
    write_live_snapshot(w.store, w.run_id, meta, kernels, acts, np.full((2, 2), 0.5), hist)


def _answer_commands(w: RunWriter, *, epoch: int = 1, batch: int = 4) -> list[dict]:
    """Play the trainer: pop queued commands, reject deleting every filter, apply the rest."""
    out = []
    for cmd, cid, _err in CommandQueue(w.store, w.run_id).pop():
        status, msg = "applied", f"{cmd.op} done"
        if cmd.op == "delete-filters" and len(cmd.args["indices"]) >= LAYERS[cmd.args["layer"]][0]:
            status, msg = "rejected", f"Cannot delete every filter of {cmd.args['layer']}"
        out.append(w.write_event(event_id=cid, epoch=epoch, batch=batch, kind=cmd.op, args=cmd.args,
                                 status=status, message=msg, sent_at=cmd.sent_at))
    return out


def _wait(pred, timeout: float = 5.0) -> None:
    t = time.time() + timeout
    while time.time() < t:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


# ---------------------------------------------------------------------- pure functions
def test_indices_round_trip():
    assert parse_indices("0, 3 5-7") == [0, 3, 5, 6, 7]
    assert parse_indices("2,2,1") == [2, 1]
    assert format_indices([5, 0, 3]) == "0, 3, 5"
    with pytest.raises(ValueError):
        parse_indices("a")


def test_small_helpers():
    assert event_x(3, 5, 10) == pytest.approx(2.5)
    assert event_x(3, 0, None) == 3.0


def test_network_frame_from_a_snapshot(tmp_path):
    store, w = _fake_run(tmp_path / "store")
    from revacnn.storage.live import read_live_snapshot

    images, labels = store.probes(store.run(w.run_id).session_id)
    frame = frame_from_live(read_live_snapshot(store, w.run_id), images, labels, ["a", "b"],
                            previous_uids={"conv1": np.array([0, 1, 2, 3, 9]), "conv2": np.array([0, 1, 2])})
    conv1, conv2 = frame.layers
    assert frame.live and frame.batch == 3 and frame.n_batches == 10 and frame.units["dense1"] == 2
    assert conv1.n_filters == 4 and conv1.deleted == [9] and not conv1.added.any()
    assert conv2.added.tolist() == [False, False, False, True, True, True]
    assert conv2.frozen.tolist() == [False, True, False, False, False, False]
    assert frame.frozen_filters == {"conv2": [1]} and frame.frozen_layers == []
    assert conv1.activations.shape == (2, 4, 8, 8) and "act_mean" in conv1.measures
    # the shared network view highlights a multi-selection through its `selection` parameter
    view = NetworkView(frame=frame, selection=["conv2:1", "conv2:4"])
    assert view.render_data()["selected_set"] == ["conv2:1", "conv2:4"]
    view.selected = ("conv1", 2)
    assert view.render_data()["selected_set"] == ["conv1:2", "conv2:1", "conv2:4"]


def test_permission_outside_a_server():
    assert steering_permission(True) == (True, "")
    ok, why = steering_permission(False)
    assert not ok and "authentication" in why


class _Request:
    def __init__(self, ip: str, host: str, headers: dict | None = None, cookies: dict | None = None) -> None:
        self.remote_ip = ip
        self.headers = {"Host": host, **(headers or {})}
        self.cookies = cookies or {}
        self.arguments = {}


class _Context:
    def __init__(self, request: _Request) -> None:
        self.request = request


@pytest.mark.parametrize(
    ("ip", "host", "headers", "user", "allowed"),
    [
        ("127.0.0.1", "127.0.0.1:5006", None, None, True),
        ("::1", "localhost:5006", None, None, True),
        ("10.1.2.3", "lab-box:5006", None, None, False),  # served on another address, nobody logged in
        ("127.0.0.1", "lab.example.org", None, None, False),  # a local reverse proxy
        ("127.0.0.1", "localhost:5006", {"X-Forwarded-For": "1.2.3.4"}, None, False),
        ("10.1.2.3", "lab-box:5006", None, "alice", True),  # basic auth / OAuth user
        ("10.1.2.3", "lab-box:5006", None, "guest", False),  # a guest cookie is not a login
    ],
)
def test_permission_per_connection(monkeypatch, ip, host, headers, user, allowed):
    import panel as pn
    from bokeh.document import Document
    from tornado.web import create_signed_value

    monkeypatch.setattr(pn.config, "cookie_secret", "test-secret")
    cookies = {}
    if user == "guest":
        cookies["is_guest"] = "1"
    elif user:
        cookies["user"] = create_signed_value("test-secret", "user", user).decode()
    doc = Document()
    ctx = _Context(_Request(ip, host, headers, cookies))
    doc._session_context = lambda: ctx
    pn.state.curdoc = doc
    try:
        ok, why = steering_permission(True)
    finally:
        pn.state.curdoc = None
    assert ok is allowed
    assert (why == "") is allowed


# ---------------------------------------------------------------------- the poller and the feed
def test_feed_follows_snapshot_events_and_commits(tmp_path):
    store, w = _fake_run(tmp_path / "store")
    watcher = StoreWatcher.shared(store.root)
    feed = watcher.follow(w.run_id)
    pushed = []
    feed.listeners.append(lambda: pushed.append(feed.state.version))
    try:
        _wait(lambda: feed.state.live is not None and feed.state.record is not None)
        st: FeedState = feed.state
        assert st.live.batch == 3 and st.live.conv_layers == ["conv1", "conv2"]
        assert st.live.frozen_filters == {"conv2": [1]}
        assert not st.record.live and st.record.layer("conv1").n_filters == 4
        assert st.record.units == {"conv1": 4, "conv2": 6}
        assert st.current is st.live  # the snapshot is newer than the epoch-0 record
        assert pushed  # every change is pushed to the listening sessions
        v = st.version
        _commit(w, 1, np.random.default_rng(1), frozen=("conv1",))
        _wait(lambda: feed.state.record is not None and feed.state.record.epoch == 1)
        st = feed.state
        assert st.epochs == [0, 1]
        assert st.version > v and st.current is st.record and st.record.frozen_layers == ["conv1"]
        w.write_event(event_id="cmd-x", epoch=2, batch=1, kind="pause", args={}, status="applied", message="paused")
        _wait(lambda: len(feed.state.events) == 1)
        w.set_status("finished")
        _wait(lambda: feed.state.status == "finished")
    finally:
        watcher.unfollow(feed)
    assert w.run_id not in watcher.followed()


def test_live_embedding_continues_the_recorded_layout(tmp_path):
    """Between epochs the embedding is a warm-started t-SNE of the snapshot, starting at the record's layout."""
    store, w = _fake_run(tmp_path / "store")
    feed = StoreWatcher.shared(store.root).follow(w.run_id)
    try:
        feed.want_embedding = time.monotonic() + 60
        _wait(lambda: feed.state.live is not None and feed.state.live.key[-1] == "tsne", timeout=60)
        live, record = feed.state.live, feed.state.record
        for name in ("conv1", "conv2"):
            pos, ref = live.layer(name).embedding, record.layer(name).embedding
            assert pos.shape == (len(live.layer(name).uids), 2) and np.isfinite(pos).all()
            # started from the recorded positions (same uids) and aligned to them: far closer to them
            # than to a shuffled copy of them
            d = np.linalg.norm(pos - ref, axis=1).mean()
            shuffled = np.linalg.norm(pos - ref[::-1], axis=1).mean()
            assert d < shuffled
    finally:
        StoreWatcher.shared(store.root).unfollow(feed)


def test_feed_of_fork_includes_parent_epochs(tmp_path):
    store, w = _fake_run(tmp_path / "store", epochs=3)
    child = RunWriter.create(store, session_id=store.run(w.run_id).session_id, config={"epochs": 5},
                             parent_run_id=w.run_id, fork_epoch=2)
    _commit(child, 2, np.random.default_rng(5))
    m = ReplayData.shared(store.root).bundle(child.run_id, fresh=True).metrics
    assert m["epoch"].tolist() == [0, 1, 2]
    assert m["source_run_id"].tolist() == [w.run_id, w.run_id, child.run_id]


# ---------------------------------------------------------------------- steering controls
def test_controls_send_resolve_and_explain():
    sent = []

    def sender(op, words):
        sent.append((op, words))
        return f"cmd-{len(sent)}"

    c = SteeringControls(sender=sender)
    assert c.btn_freeze.disabled  # nothing attached
    c.update_state(run_id="run-1", status="running", layers={"conv1": 4, "dense1": 2}, conv_layers=["conv1"],
                   frozen_layers=[], frozen_filters={}, lr=1e-3)
    assert c.layer == "conv1" and not c.btn_freeze.disabled and c.btn_unfreeze.disabled
    assert c.btn_delete.disabled  # no filter selected
    c.btn_freeze.clicks += 1
    assert sent[-1] == ("freeze", ["conv1"]) and "waiting" in c.result.object
    ev = pd.DataFrame([{"event_id": "cmd-1", "status": "applied", "message": "conv1 frozen", "epoch": 1,
                        "batch": 2}])
    c.resolve(ev)
    assert "applied" in c.result.object and "conv1 frozen" in c.result.object and not c.pending
    c.indices.value = "0-3"
    assert c.selected == [0, 1, 2, 3] and "cannot apply" in c.filter_hint.object
    c.btn_delete.clicks += 1
    assert sent[-1] == ("delete-filters", ["conv1", "0", "1", "2", "3"])
    c.resolve(pd.DataFrame([{"event_id": "cmd-2", "status": "rejected", "epoch": 1, "batch": 3,
                             "message": "Cannot delete every filter of conv1"}]))
    assert "rejected" in c.result.object and "Cannot delete every filter" in c.result.object
    c.update_state(run_id="run-1", status="running", layers={"conv1": 3, "dense1": 2}, conv_layers=["conv1"],
                   frozen_layers=["conv1"], frozen_filters={})
    assert c.selected == []  # indices shifted after a deletion
    assert c.btn_freeze.disabled and not c.btn_unfreeze.disabled
    c.layer = "dense1"
    # a dense layer: no filter controls, and the hint says why; the layer itself can still be frozen
    assert c.btn_add.disabled and c.add_n.disabled
    assert all(b.disabled for b in (c.btn_ffreeze, c.btn_funfreeze, c.btn_delete, c.btn_reinit))
    assert "dense1 is a dense layer" in c.filter_hint.object
    assert not c.btn_freeze.disabled and c.btn_unfreeze.disabled
    c.update_state(run_id="run-1", status="finished", layers={"conv1": 3}, conv_layers=["conv1"],
                   frozen_layers=[], frozen_filters={})
    assert c.btn_freeze.disabled and c.btn_stop.disabled and c.notice.visible and "finished" in c.notice.object
    n = len(sent)
    assert c.send("pause", []) is None and len(sent) == n


def test_controls_show_the_plan_before_surgery():
    sent, planned = [], []

    def sender(op, words):
        sent.append((op, words))
        return f"cmd-{len(sent)}"

    def planner(op, words):
        planned.append((op, words))
        if op == "reinit-filters":
            raise ValueError("conv1 feeds softmax: refused")
        return f"plan: {op} {words[0]}\n  conv1 (Conv2D, producer) out 4->6 new 4-5\n  conv2 (Conv2D, consumer)"

    c = SteeringControls(sender=sender, planner=planner)
    c.update_state(run_id="run-1", status="running", layers={"conv1": 4}, conv_layers=["conv1"],
                   frozen_layers=[], frozen_filters={})
    # freezing is not surgery: sent at once
    c.btn_freeze.clicks += 1
    assert sent == [("freeze", ["conv1"])] and not planned and not c.plan_box.visible
    # add-filters: the plan first, every layer it touches; nothing sent until Apply
    c.add_n.value = 2
    c.btn_add.clicks += 1
    assert planned == [("add-filters", ["conv1", "2"])] and len(sent) == 1
    assert c.plan_box.visible and "conv2 (Conv2D, consumer)" in c.plan_text.object
    assert not c.btn_plan_apply.disabled and c.btn_plan_apply.label == "Apply"
    c.btn_plan_apply.clicks += 1
    assert sent[-1] == ("add-filters", ["conv1", "2"]) and not c.plan_box.visible and "cmd-2" in c.pending
    # cancel drops it
    c.indices.value = "1"
    c.btn_delete.clicks += 1
    assert planned[-1] == ("delete-filters", ["conv1", "1"]) and c.plan_box.visible
    c.btn_plan_cancel.clicks += 1
    assert not c.plan_box.visible and len(sent) == 2 and c.apply_plan() is None
    # a refusal in the plan is shown; the user may still send it (the trainer decides)
    c.btn_reinit.clicks += 1
    assert "would be refused" in c.plan_text.object and "softmax" in c.plan_text.object
    assert c.btn_plan_apply.label == "Send anyway"
    c.btn_plan_apply.clicks += 1
    assert sent[-1] == ("reinit-filters", ["conv1", "1"])
    # without a planner (or a run to steer) nothing is planned
    c.update_state(run_id="run-1", status="finished", layers={"conv1": 4}, conv_layers=["conv1"],
                   frozen_layers=[], frozen_filters={})
    n = len(planned)
    c.preview("add-filters", ["conv1", "1"])
    assert len(planned) == n and not c.plan_box.visible and "finished" in c.result.object


def test_controls_disabled_without_permission():
    c = SteeringControls(sender=lambda op, w: "x", allowed=False, deny_reason="no auth here")
    c.update_state(run_id="run-1", status="running", layers={"conv1": 4}, conv_layers=["conv1"],
                   frozen_layers=[], frozen_filters={})
    assert all(b.disabled for b in (c.btn_freeze, c.btn_add, c.btn_pause, c.btn_stop, c.btn_lr, c.btn_fork))
    assert c.notice.visible and "no auth here" in c.notice.object


def test_controls_report_send_errors():
    def bad(op, words):
        raise ValueError("Received: lr='x'")

    c = SteeringControls(sender=bad)
    c.update_state(run_id="run-1", status="running", layers={"conv1": 4}, conv_layers=["conv1"],
                   frozen_layers=[], frozen_filters={})
    assert c.send("set-lr", ["x"]) is None and "not sent" in c.result.object


# ---------------------------------------------------------------------- the app, headless
def test_app_attaches_steers_and_follows_to_the_end(tmp_path):
    store, w = _fake_run(tmp_path / "store")
    app = LiveApp(store_path=str(store.root), run_id=w.run_id)
    page2 = create_live_app(str(store.root), run_id=w.run_id)
    app2 = page2.live_app
    try:
        _wait(lambda: (app.refresh() or True) and app.network.frame is not None
              and "batch 3/10" in app.status_line.object)
        layers = {L["name"]: L for L in app.network.render_data()["layers"]}
        assert layers["conv1"]["n"] == 4 and not layers["conv1"]["layer_frozen"]
        assert w.run_id in app.run_select.options.values()
        # tile clicks toggle filters in the selection; the controls and the views follow
        app.network.selected = ("conv2", 1)  # what a click on a tile does
        app.network.clicks += 1
        app.network.selected = ("conv2", 2)
        app.network.clicks += 1
        assert app.steering.layer == "conv2" and app.steering.selected == [1, 2]
        assert app.network.selection == ["conv2:1", "conv2:2"]
        assert app.network.render_data()["selected_set"] == ["conv2:1", "conv2:2"]
        app.network.selected = ("conv2", 1)
        app.network.clicks += 1
        assert app.steering.selected == [2] and app.steering.indices.value == "2"
        app.tabs.active = 1  # the embedding (the replay page's view) draws when its tab is shown
        app.refresh()
        assert app.embedding.layer == "conv2" and app.embedding.frame is not None
        app.tabs.active = 0
        # freeze conv1 from one session; the fake trainer answers; both sessions see the event
        app.steering.select("conv1", [])
        app.steering.btn_freeze.clicks += 1
        queued = list((store.layout.commands_dir(w.run_id)).glob("*.json"))
        assert len(queued) == 1 and json.loads(queued[0].read_text())["op"] == "freeze"
        _answer_commands(w)
        _snapshot(w, epoch=1, batch=5, frozen_layers=("conv1",))
        _wait(lambda: (app.refresh() or True) and "applied" in app.steering.result.object)
        _wait(lambda: (app2.refresh() or True) and any(r["kind"] == "freeze" for r in app2.event_log.rows()))
        _wait(lambda: (app.refresh() or True)
              and app.network.render_data()["layers"][0]["layer_frozen"])
        assert app.steering.btn_unfreeze.disabled is False
        # filter surgery shows its plan first (here a stand-in for `revacnn steer … --dry-run`):
        # nothing is queued until "Apply"
        plans: list = []
        app.steering.planner = lambda op, words: plans.append((op, words)) or f"plan: {op} {words[0]}"
        queue = store.layout.commands_dir(w.run_id)
        n_queued = len(list(queue.glob("*.json")))
        app.steering.select("conv1", [0, 1, 2, 3])
        app.steering.btn_delete.clicks += 1
        assert plans == [("delete-filters", ["conv1", "0", "1", "2", "3"])]
        assert app.steering.plan_box.visible and "plan: delete-filters conv1" in app.steering.plan_text.object
        assert len(list(queue.glob("*.json"))) == n_queued
        # delete every filter of conv1: refused with its reason
        app.steering.btn_plan_apply.clicks += 1
        assert not app.steering.plan_box.visible and len(list(queue.glob("*.json"))) == n_queued + 1
        _answer_commands(w)
        _wait(lambda: (app.refresh() or True) and "rejected" in app.steering.result.object)
        assert "Cannot delete every filter" in app.steering.result.object
        assert app.network.touched == {}  # a rejected change touched nothing
        # an applied surgery marks every layer it touched (the event's args name them)
        app.steering.select("conv2", [])
        app.steering.add_n.value = 2
        app.steering.btn_add.clicks += 1
        app.steering.btn_plan_apply.clicks += 1
        for cmd, cid, _err in CommandQueue(w.store, w.run_id).pop():
            w.write_event(event_id=cid, epoch=1, batch=5, kind=cmd.op, status="applied", message="added",
                          args={**cmd.args, "touched": ["conv2", "dense1"]}, sent_at=cmd.sent_at)
        _wait(lambda: (app.refresh() or True) and bool(app.network.touched))
        assert app.network.touched == {"conv2": "add-filters conv2", "dense1": "add-filters conv2"}
        d = app.network.render_data()
        assert [L["touched"] for L in d["layers"]] == [None, "add-filters conv2"]
        assert d["touched_other"] == [{"name": "dense1", "label": "add-filters conv2"}]
        # the run ends: steering disabled, replay offered
        _commit(w, 1, np.random.default_rng(2), frozen=("conv1",))
        w.set_status("finished")
        _wait(lambda: (app.refresh() or True) and app.banner.visible)
        assert "replay?run=" in app.banner.object and app.steering.btn_freeze.disabled
        _wait(lambda: (app.refresh() or True) and app.network.frame is not None
              and not app.network.frame.live and app.network.frame.epoch == 1)
        # the live page shares the replay page's template (header, colours)
        assert type(page2).__name__ == "FastListTemplate" and page2.title == "revacnn · live"
    finally:
        app.close()
        app2.close()


def test_app_without_runs_says_so(tmp_path):
    open_store(tmp_path / "empty")
    app = LiveApp(store_path=str(tmp_path / "empty"))
    try:
        app.refresh()
        assert "No run attached" in app.status_line.object
    finally:
        app.close()


def test_app_on_a_mistyped_path_creates_no_store(tmp_path):
    app = LiveApp(store_path=str(tmp_path / "typo"))
    try:
        app.refresh()
        assert app.error.visible and "No revacnn store" in app.error.object
        assert not (tmp_path / "typo").exists()
    finally:
        app.close()


def test_app_served_without_permission_disables_steering(tmp_path):
    store, w = _fake_run(tmp_path / "store")
    app = LiveApp(store_path=str(store.root), run_id=w.run_id, allow_steering=False)
    try:
        assert app.auth_notice.visible and app.start_form.button.disabled
        _wait(lambda: (app.refresh() or True) and app.steering.run_id == w.run_id)
        assert app.steering.btn_freeze.disabled and app.steering.notice.visible
    finally:
        app.close()


# ---------------------------------------------------------------------- launcher
def test_launcher_argv():
    argv = launcher.train_argv("st", epochs=3, batch_size=32, lr=0.01, seed=2, train_size=100, val_size=50,
                               name="x")
    assert argv[:3] == [sys.executable, "-m", "revacnn.cli"]
    assert argv[3:5] == ["train", "--store"] and "--quiet" in argv
    assert argv[argv.index("--lr") + 1] == "0.01" and argv[argv.index("--name") + 1] == "x"
    f = launcher.fork_argv("st", "run-1", 2, freeze=["conv1"], add_filters={"conv2": 3},
                           delete_filters={"conv1": [1, 2]}, lr=1e-4)
    assert f[3:5] == ["fork", "run-1"] and "--freeze" in f and "conv2:3" in f and "conv1:1,2" in f


def test_launcher_reads_run_id_and_reports_failures(tmp_path, monkeypatch):
    ok = launcher.launch([sys.executable, "-c", "print('run-123-abc', flush=True); import sys; "
                          "print('progress', file=sys.stderr)"], log_dir=tmp_path)
    assert ok.wait_run_id(20) == "run-123-abc"
    ok.proc.wait(20)
    bad = launcher.launch([sys.executable, "-c", "import sys; sys.exit('revacnn train: error: no data')"],
                          log_dir=tmp_path)
    assert bad.wait_run_id(20) is None
    bad.proc.wait(20)
    monkeypatch.setattr(launcher, "launch_train", lambda store, **kw: bad)
    form = launcher.StartRunForm(store_path=str(tmp_path))
    form.start()
    _wait(lambda: form.poll() is None and form.watcher.alert.alert_type == "danger")
    assert "no data" in form.watcher.alert.object
    monkeypatch.setattr(launcher, "launch_fork", lambda store, rid, epoch, **kw: ok)
    fork = launcher.ForkForm(store_path=str(tmp_path), run_id="run-1", epochs_available=[0, 1], layers=["conv1"])
    assert fork.epoch == 1 and fork.w_epoch.value == 1
    fork.epochs_available = [0, 1, 2]
    assert fork.epoch == 2  # follows the newest record until the user picks one
    fork.w_epoch.value = 0
    fork.epochs_available = [0, 1, 2, 3]
    assert fork.epoch == 0
    fork.select_latest()
    assert fork.epoch == 3
    fork.w_freeze.value = ["conv1"]
    fork.start()
    assert fork.poll() == "run-123-abc"


def _dead(w: RunWriter, epoch: int, index: int, uid: int) -> dict:
    sug = {"op": "reinit-filters", "args": {"layer": "conv2", "indices": [index]}, "filter_uids": [uid]}
    return {"run_id": w.run_id, "epoch": epoch, "layer": "conv2", "filter_uid": uid, "filter": index,
            "kind": "dead", "score": 1.0, "suggestion": json.dumps(sug),
            "message": f"conv2 filter {index} (uid {uid}) is dead"}


def _doctor_run(root: Path) -> tuple[object, RunWriter]:
    """A run whose epoch 0 has two dead conv2 filters (uids 0 and 3) and a converged conv1."""
    store = open_store(root)
    rng = np.random.default_rng(0)
    sid = create_session(store, dataset="shapes", model="tiny", probe_images=rng.integers(0, 255, (2, 8, 8, 3)),
                         probe_labels=np.array([0, 1]), probe_indices=[0, 1], class_names=["a", "b"],
                         config={})
    w = RunWriter.create(store, session_id=sid, config={"epochs": 5, "model": "tiny"}, name="doc")
    conv = {"run_id": w.run_id, "epoch": 0, "layer": "conv1", "filter_uid": None, "filter": None,
            "kind": "converged", "score": 0.99, "message": "conv1 stopped changing",
            "suggestion": json.dumps({"op": "freeze", "args": {"layer": "conv1"}})}
    w.write_rows("diagnoses", 0, [_dead(w, 0, 0, 0), _dead(w, 0, 3, 3), conv])
    _commit(w, 0, rng)
    return store, w


def test_live_doctor_sends_fixes_with_current_indices_and_refuses_gone_filters(tmp_path):
    store, w = _doctor_run(tmp_path / "store")
    # since the finding, conv2's uid 0 was deleted: uid 3 is now at index 2
    uids = {"conv1": [0, 1, 2, 3], "conv2": [1, 2, 3, 4, 5], "dense1": [0, 1]}
    _snapshot(w, epoch=1, batch=3, uids=uids)
    assert len(ReplayData.shared(store.root).diagnoses(w.run_id, epoch=0)) == 3
    app = LiveApp(store_path=str(store.root), run_id=w.run_id)
    try:
        _wait(lambda: (app.refresh() or True) and app.network.frame is not None and len(app.doctor.rows()) == 3)
        layers = {L["name"]: L for L in app.network.render_data()["layers"]}
        assert [b["kind"] if b else None for b in layers["conv2"]["badges"]] == [None, None, "dead", None, None]
        assert [b["kind"] for b in layers["conv1"]["layer_badges"]] == ["converged"]
        rows = app.doctor.rows()
        i_gone = next(i for i, r in enumerate(rows) if r["uid"] == 0)
        i_ok = next(i for i, r in enumerate(rows) if r["uid"] == 3)
        app.doctor._table.clicked = f"{i_gone}|1"
        assert "uid 0" in app.doctor_note.object and "gone" in app.doctor_note.object
        assert not list(store.layout.commands_dir(w.run_id).glob("*.json"))
        app.doctor._table.clicked = f"{i_ok}|2"
        queued = list(store.layout.commands_dir(w.run_id).glob("*.json"))
        assert len(queued) == 1
        sent = json.loads(queued[0].read_text())
        assert sent["op"] == "reinit-filters" and sent["args"] == {"layer": "conv2", "indices": [2]}
        _answer_commands(w)
        _wait(lambda: (app.refresh() or True) and "applied" in app.steering.result.object)
        assert "reinit-filters conv2 2" in app.steering.result.object
    finally:
        app.close()


def test_replay_doctor_gives_the_fork_command_and_badges_the_network(tmp_path):
    from revacnn.ui.apps import ReplayApp

    store, w = _doctor_run(tmp_path / "store")
    w.set_status("finished")
    app = ReplayApp(str(store.root))
    app.show_sync(w.run_id, 0)
    rows = app.doctor.rows()
    assert sorted(r["kind"] for r in rows) == ["converged", "dead", "dead"]
    layers = {L["name"]: L for L in app.network.render_data()["layers"]}
    assert [b["kind"] if b else None for b in layers["conv2"]["badges"]] == [
        "dead", None, None, "dead", None, None]
    app.doctor._table.clicked = f"{next(i for i, r in enumerate(rows) if r['uid'] == 3)}|1"
    assert app.doctor_fork.visible
    assert (f"revacnn fork {w.run_id} --store {store.root} --epoch 0 --reinit-filters conv2:3"
            in app.doctor_fork.object)
