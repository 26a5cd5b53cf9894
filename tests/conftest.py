"""Suite-wide settings: no test writes to the user's cache, and plots never need a display."""

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setenv("QMRI_LABELS_CACHE", str(tmp_path_factory.mktemp("qmri_labels_cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session")
def load_benchmark():
    """A loader of the scripts in ``benchmarks/`` (not a package), imported by file name."""
    folder = Path(__file__).resolve().parent.parent / "benchmarks"

    def load(name):
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
