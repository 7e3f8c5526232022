"""The notebooks run top to bottom (executed, not only parsed) at a small size."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.setenv("REVACNN_NB_SMALL", "1")
    monkeypatch.setenv("REVACNN_NB_STORE", str(tmp_path / "store"))
    monkeypatch.delenv("REVACNN_CIFAR_DIR", raising=False)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert (tmp_path / "store" / "freeze_experiment.png").exists() or "freeze" not in path.name
    assert os.environ.get("REVACNN_NB_SMALL") == "1"
