"""Suite-wide settings: no test writes to the user's cache, and plots never need a display."""

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setenv("QMRI_LABELS_CACHE", str(tmp_path_factory.mktemp("qmri_labels_cache")))
    yield
    patch.undo()
