"""Where the toolkit looks for caches, named study configurations and shipped models."""

from __future__ import annotations

import os
from pathlib import Path

#: the source checkout (holds ``studies/`` and ``models/`` next to the package)
REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Cache folder: ``$QMRI_LABELS_CACHE`` or ``~/.cache/qmri_labels``."""
    return Path(os.environ.get("QMRI_LABELS_CACHE", Path.home() / ".cache" / "qmri_labels"))


def studies_dir() -> Path:
    """Folder of named study configurations: ``$QMRI_LABELS_STUDIES`` or ``<repo>/studies``."""
    return Path(os.environ.get("QMRI_LABELS_STUDIES", REPO_ROOT / "studies"))


def models_dir() -> Path:
    """Folder of shipped trained networks: ``$QMRI_LABELS_MODELS`` or ``<repo>/models``."""
    return Path(os.environ.get("QMRI_LABELS_MODELS", REPO_ROOT / "models"))
