"""The import contract (pyproject `[tool.importlinter]`): the package keeps it, and a break fails it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")

pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install -e '.[dev]')")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([LINT, "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_package_keeps_the_contract():
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("storage/store.py", "import revacnn.trainer", "Layers"),
        ("steering/commands.py", "from revacnn.trainer import steer", "Layers"),
        ("analysis/patterns.py", "import keras", "import no TensorFlow"),
        ("ui/views/events.py", "from revacnn.storage._tables import read_tables", "_private"),
        ("ui/views/events.py", "from revacnn.trainer.checkpoint import load_checkpoint", "UI never imports"),
    ],
)
def test_a_forbidden_import_breaks_it(tmp_path, module, line, contract):
    """Copy the package, add one forbidden import, and expect `lint-imports` to fail naming the contract."""
    shutil.copytree(ROOT / "revacnn", tmp_path / "revacnn", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "revacnn" / module
    target.write_text(target.read_text() + f"\n{line}  # injected by the test\n")
    res = _lint(tmp_path)
    assert res.returncode != 0, res.stdout
    broken = [ln for ln in res.stdout.splitlines() if ln.rstrip().endswith("BROKEN")]
    assert any(contract in ln for ln in broken), res.stdout
    assert line.split()[1] in res.stdout  # the report names the offending import
