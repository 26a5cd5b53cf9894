"""The layers contract in pyproject.toml (import-linter) holds for the package, and an upward
import (physics importing the command line) breaks it: the check can fail."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT = shutil.which("lint-imports")
pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install -e '.[dev]')")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def copy_of_package(tmp_path_factory):
    root = tmp_path_factory.mktemp("layers")
    shutil.copytree(REPO / "qmri_labels", root / "qmri_labels",
                    ignore=shutil.ignore_patterns("__pycache__", "models", "studies"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_package_keeps_its_layers(copy_of_package):
    proc = _lint(copy_of_package)
    assert proc.returncode == 0 and "1 kept, 0 broken" in proc.stdout, proc.stdout[-2000:]


def test_an_upward_import_breaks_the_contract(copy_of_package):
    physics = copy_of_package / "qmri_labels" / "physics" / "noise.py"
    original = physics.read_text()
    physics.write_text(original + "\nfrom qmri_labels.cli import study  # an upward import\n")
    try:
        proc = _lint(copy_of_package)
    finally:
        physics.write_text(original)
    assert proc.returncode != 0 and "qmri_labels.physics is not allowed to import qmri_labels.cli" in proc.stdout, \
        proc.stdout[-2000:]
