"""The notebooks run top to bottom (executed, not only parsed) at a small size."""

from __future__ import annotations

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
    CHECKS.get(path.stem, lambda store_path: None)(tmp_path / "store")


def _check_freeze_experiment(store_path: Path) -> None:
    """What the freeze notebook promises, read back from the store it wrote at the small size."""
    import numpy as np

    import revacnn

    png = store_path / "freeze_experiment.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    store = revacnn.open_store(store_path, mode="r")
    runs = store.runs().set_index("name")
    assert sorted(runs.index) == ["conv1 frozen", "conv1+conv2 frozen", "original"]
    root = store.run(runs.run_id["original"])
    assert root.status == "finished" and root.epochs() == [0, 1, 2, 3]  # EPOCHS=3 at the small size
    for name, frozen in (("conv1 frozen", ["conv1"]), ("conv1+conv2 frozen", ["conv1", "conv2"])):
        fork = store.run(runs.run_id[name])
        assert (fork.parent_run_id, fork.fork_epoch, fork.status) == (root.run_id, 1, "finished")
        for layer in ("conv1", "conv2"):
            at_k = root.epoch(1).layer(layer).kernel
            last = fork.epoch(3).layer(layer).kernel
            assert np.array_equal(at_k, last) is (layer in frozen), (name, layer)


CHECKS = {"freeze_experiment": _check_freeze_experiment}
