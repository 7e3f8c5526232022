"""The doctor panel: findings of the shown epoch, fixes as steering commands on click."""

from __future__ import annotations

import json

import pandas as pd

from revacnn.ui.views.doctor import DoctorPanel, command_text


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
    assert seen[-1]["finding"] == {"layer": "conv2", "uid": 7, "kind": "dead"}
    panel.enabled = False
    panel._table.clicked = "0|3"
    assert len(seen) == 1


def test_command_text_reads_like_the_cli():
    assert command_text({"op": "set-lr", "args": {"lr": 0.003}}) == "set-lr 0.003"
    assert command_text({"op": "delete-filters", "args": {"layer": "c", "indices": [1, 4]}}) == "delete-filters c 1 4"
