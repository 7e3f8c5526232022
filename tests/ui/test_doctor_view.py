"""The doctor panel: findings of the shown epoch, fixes as steering commands on click."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from revacnn.ui.data import LayerFrame, NetworkFrame
from revacnn.ui.launcher import fork_argv
from revacnn.ui.views.doctor import (
    DoctorPanel,
    command_text,
    finding_key,
    fork_command_line,
    fork_kwargs,
    handled_by,
    live_diagnoses,
)


def _frame() -> pd.DataFrame:
    sug_dead = {"op": "reinit-filters", "args": {"layer": "conv2", "indices": [3]}, "filter_uids": [7]}
    return pd.DataFrame([
        {"run_id": "r", "epoch": 2, "layer": "conv2", "filter_uid": 7, "filter": 3, "kind": "dead",
         "score": 1.0, "suggestion": json.dumps(sug_dead), "message": "conv2 filter 3 is dead"},
        {"run_id": "r", "epoch": 2, "layer": "conv1", "filter_uid": None, "filter": None,
         "kind": "rgb_pattern", "score": 0.9, "suggestion": None, "message": "one colour"},
        {"run_id": "r", "epoch": 3, "layer": "conv1", "filter_uid": None, "filter": None,
         "kind": "converged", "score": 0.8, "suggestion": json.dumps({"op": "freeze", "args": {"layer": "conv1"}}),
         "message": "conv1 stopped changing"},
    ])


def test_rows_of_the_shown_epoch_filters_first_with_their_commands():
    panel = DoctorPanel(diagnoses=_frame(), epoch=2)
    rows = panel.rows()
    assert [(r["layer"], r["kind"], r["command"]) for r in rows] == [
        ("conv2", "dead", "reinit-filters conv2 3"), ("conv1", "rgb_pattern", "")]
    assert panel._table.data["summary"] == "epoch 2: 1 dead, 1 rgb_pattern"
    panel.epoch = 3
    assert [r["command"] for r in panel.rows()] == ["freeze conv1"]
    panel.epoch = 9
    assert panel.rows() == [] and "found nothing" in panel._table.data["empty"]


def test_a_click_requests_the_suggested_command_and_disabled_clicks_do_nothing():
    panel = DoctorPanel(diagnoses=_frame(), epoch=2)
    seen = []
    panel.param.watch(lambda e: seen.append(e.new), "request")
    panel._table.clicked = "1|1"  # the rgb finding has no fix: nothing requested
    assert seen == []
    panel._table.clicked = "0|2"
    assert seen[-1]["op"] == "reinit-filters" and seen[-1]["args"] == {"layer": "conv2", "indices": [3]}
    assert seen[-1]["finding"] == {"layer": "conv2", "uid": 7, "kind": "dead", "live": False, "epoch": 2}
    panel.enabled = False
    panel._table.clicked = "0|3"
    assert len(seen) == 1


def test_command_text_reads_like_the_cli():
    assert command_text({"op": "set-lr", "args": {"lr": 0.003}}) == "set-lr 0.003"
    assert command_text({"op": "delete-filters", "args": {"layer": "c", "indices": [1, 4]}}) == "delete-filters c 1 4"


def _live_frame() -> NetworkFrame:
    rng = np.random.default_rng(0)
    k = rng.normal(size=(5, 3, 3, 3))
    k[4] = 1.5 * k[1]  # filter 4 (uid 14) copies filter 1 (uid 11)
    acts = rng.random((6, 5, 4, 4)).astype(np.float16)
    acts[:, 2] = 0  # filter 2 (uid 12) is silent on every probe
    lf = LayerFrame("conv1", uids=np.arange(10, 15), frozen=np.zeros(5, bool), activations=acts, kernel=k)
    return NetworkFrame(layers=[lf], probabilities=None, probe_images=np.zeros((6, 6, 6, 3), np.uint8),
                        probe_labels=np.zeros(6, np.int64), class_names=[], epoch=3, live=True, batch=7,
                        n_batches=20)


def test_live_findings_between_epochs_are_shown_marked_provisional():
    frame = _live_frame()
    live = live_diagnoses(frame)
    assert sorted(zip(live.kind, live.filter_uid, live["filter"], strict=True)) == [
        ("dead", 12, 2), ("redundant", 14, 4)]
    assert json.loads(live[live.kind == "redundant"].suggestion.iloc[0])["duplicate_of"] == 11
    assert live.live.all() and live.message.str.endswith("(live, provisional)").all()
    assert len(live_diagnoses(NetworkFrame(**{**frame.__dict__, "live": False}))) == 0  # a record: none
    panel = DoctorPanel(diagnoses=_frame(), epoch=2, live=live, live_label="epoch 3, batch 7/20")
    rows = panel._table.data["rows"]
    assert [(r["kind"], r["live"]) for r in rows] == [
        ("dead", False), ("rgb_pattern", False), ("dead", True), ("redundant", True)]
    assert panel._table.data["summary"] == ("epoch 2: 1 dead, 1 rgb_pattern; live (epoch 3, batch 7/20), "
                                           "provisional: 1 dead, 1 redundant")
    seen = []
    panel.param.watch(lambda e: seen.append(e.new), "request")
    panel._table.clicked = "2|1"  # the live dead filter's fix
    assert seen[-1]["args"] == {"layer": "conv1", "indices": [2]} and seen[-1]["filter_uids"] == [12]
    assert seen[-1]["finding"]["live"] is True


@pytest.mark.parametrize("sug", [
    {"op": "reinit-filters", "args": {"layer": "conv2", "indices": [3, 5]}},
    {"op": "delete-filters", "args": {"layer": "conv2", "indices": [1]}, "duplicate_of": 4},
    {"op": "freeze", "args": {"layer": "conv1"}},
    {"op": "set-lr", "args": {"lr": 0.003}},
])
def test_the_started_fork_is_the_shown_command_line(sug):
    line = fork_command_line("store", "run-1", 3, sug).split()
    argv = fork_argv("store", "run-1", 3, **fork_kwargs(sug))
    # the launcher's argv: the interpreter and -m revacnn.cli, then the same words (plus --quiet)
    words = [w for w in argv[argv.index("fork"):] if w != "--quiet"]
    assert words[:6] == line[1:7]
    opt = dict(zip(line[7::2], line[8::2], strict=True))
    got = dict(zip(words[6::2], words[7::2], strict=True))
    if "--lr" in opt:
        assert float(got["--lr"]) == float(opt["--lr"])
    else:
        assert got == opt


def test_a_fork_with_the_fix_at_the_findings_epoch_marks_it_handled():
    sug = {"op": "reinit-filters", "args": {"layer": "conv2", "indices": [3]}, "filter_uids": [7]}
    kids = [
        {"run_id": "run-a", "fork_epoch": 1, "config": json.dumps({"extra": {"fork_changes": [
            {"op": "reinit-filters", "args": {"layer": "conv2", "indices": [3]}}]}})},  # other epoch
        {"run_id": "run-b", "fork_epoch": 2, "config": {"extra": {"fork_changes": [
            {"op": "reinit-filters", "args": {"layer": "conv2", "indices": [4]}}]}}},  # other filter
    ]
    assert handled_by(sug, 2, kids) is None
    kids.append({"run_id": "run-c", "fork_epoch": 2, "config": json.dumps({"lr": 0.001, "extra": {
        "fork_changes": [{"op": "reinit-filters", "args": {"layer": "conv2", "indices": [3]},
                          "command_id": "x"}]}})})
    assert handled_by(sug, 2, kids) == "run-c"
    assert handled_by({"op": "set-lr", "args": {"lr": 0.001}}, 2, kids) == "run-c"
    panel = DoctorPanel(diagnoses=_frame(), epoch=2, handled={finding_key(2, "conv2", 7, "dead"): "run-c"})
    assert [r["handled"] for r in panel._table.data["rows"]] == ["run-c", ""]
