"""HTMLView's wire format: the data a view draws goes to the browser as one JSON string."""

from __future__ import annotations

import json

import numpy as np

from revacnn.ui.views._component import HTMLView, to_json


def test_text_is_the_data_as_json_with_nan_as_null() -> None:
    view = HTMLView(data={"a": [1, 2.5, float("nan")], "b": {"c": float("inf"), "d": "x"}, "n": np.int64(7),
                          "v": np.array([0.5, -1.0])})
    assert json.loads(view.text) == {"a": [1, 2.5, None], "b": {"c": None, "d": "x"}, "n": 7, "v": [0.5, -1.0]}
    view.data = {"k": [True, None]}  # every change of data is sent again
    assert json.loads(view.text) == {"k": [True, None]}


def test_data_itself_is_not_a_synced_property() -> None:
    """Only `text` reaches the Bokeh model (a Dict would be walked value by value on each change)."""
    view = HTMLView(data={"big": list(range(1000))})
    model = view.get_root()
    synced = model.data.properties_with_values(include_defaults=True)
    assert "text" in synced and "data" not in synced
    assert json.loads(synced["text"])["big"][-1] == 999


def test_to_json_rejects_what_json_cannot_hold() -> None:
    try:
        to_json({"x": object()})
    except TypeError as exc:
        assert "object" in str(exc) and "JSON" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("to_json accepted an object")
