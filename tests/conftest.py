"""Suite-wide settings and shared pieces.

No test writes to the user's cache (one private cache for the session; ``fresh_cache`` gives a
test an empty one of its own), plots never need a display, and the small IVIM datasets and CPU
networks that many files use come from one place (``ivim_set``, ``small_network``).
"""

import importlib.util
import os
from pathlib import Path

import pytest

# before anything imports matplotlib, which reads the backend once
os.environ.setdefault("MPLBACKEND", "Agg")

from qmri_labels.data import DatasetSpec  # noqa: E402
from qmri_labels.estimators import NetworkEstimator  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setenv("QMRI_LABELS_CACHE", str(tmp_path_factory.mktemp("qmri_labels_cache")))
    yield
    patch.undo()


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache of this test's own, for tests that watch what gets written to it."""
    path = tmp_path / "cache"
    monkeypatch.setenv("QMRI_LABELS_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def ivim_set():
    """``ivim_set(**spec)``: the simulated dataset of ``DatasetSpec(**spec)``, generated once per session.

    The same spec gives the same object to every test that asks, so tests read its arrays and
    never write to them.
    """
    made = {}

    def make(**spec):
        key = repr(sorted(spec.items()))
        if key not in made:
            made[key] = DatasetSpec(**spec).generate()
        return made[key]

    return make


@pytest.fixture(scope="session")
def small_network():
    """``small_network(**params)``: an unfitted NetworkEstimator sized for tests (2 epochs, batches
    of 128, CPU, one thread, no progress bar); ``params`` override any of these."""
    def make(**params):
        args = dict(max_epochs=2, batch_size=128, accelerator="cpu", devices=1, progress=False, num_threads=1)
        args.update(params)
        return NetworkEstimator(**args)

    return make


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
