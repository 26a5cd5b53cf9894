"""Where the toolkit looks for caches, named study configurations and shipped models."""

from __future__ import annotations

import os
from pathlib import Path

#: the installed package: ``studies/`` and ``models/`` ship inside it as package data, so that
#: they are found after any install (editable or not), from any working directory
PACKAGE_DIR = Path(__file__).resolve().parent

#: the named study configuration the study command runs when given none (``studies/default.yaml``)
DEFAULT_CONFIG = "default"


def cache_dir() -> Path:
    """Cache folder: ``$QMRI_LABELS_CACHE`` or ``~/.cache/qmri_labels``."""
    return Path(os.environ.get("QMRI_LABELS_CACHE", Path.home() / ".cache" / "qmri_labels"))


def studies_dir() -> Path:
    """Folder of named study configurations: ``$QMRI_LABELS_STUDIES`` or ``<package>/studies``."""
    return Path(os.environ.get("QMRI_LABELS_STUDIES", PACKAGE_DIR / "studies"))


def models_dir() -> Path:
    """Folder of shipped trained networks: ``$QMRI_LABELS_MODELS`` or ``<package>/models``."""
    return Path(os.environ.get("QMRI_LABELS_MODELS", PACKAGE_DIR / "models"))
