"""The package façade: `Run.fork`, `Run.steer`, `Run.load_model` are wired at the top, not by storage."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import revacnn
from revacnn import _facade
from revacnn.errors import EpochNotFoundError, SteeringError
from revacnn.storage import RunWriter, create_session


def test_the_methods_come_from_the_facade_not_from_storage():
    for name in ("fork", "steer", "load_model"):
        assert getattr(revacnn.Run, name) is getattr(_facade, name)
    tree = ast.parse((Path(revacnn.__file__).parent / "storage" / "store.py").read_text())
    run_cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Run")
    assert not {"fork", "steer", "load_model"} & {f.name for f in run_cls.body if isinstance(f, ast.FunctionDef)}


def test_steer_and_load_model_refuse_clearly(tmp_path):
    store = revacnn.open_store(tmp_path / "store")
    sid = create_session(store, dataset="toy", model="toy", probe_images=np.zeros((1, 4, 4, 3), np.uint8),
                         probe_labels=np.array([0]), probe_indices=[0], class_names=["a"], config={})
    w = RunWriter.create(store, session_id=sid, config={}, name="r")
    w.set_status("finished")
    run = store.run(w.run_id)
    with pytest.raises(SteeringError, match="not running"):
        run.steer("freeze", "conv1")
    with pytest.raises(EpochNotFoundError, match="no committed epoch"):
        run.load_model()
    with pytest.raises(EpochNotFoundError):
        run.load_model(3)
