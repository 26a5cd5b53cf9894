"""The estimator classes a bundle can hold, by kind, and :func:`load` of any bundle."""

from __future__ import annotations

import os

from qmri_labels.estimators.bundle import estimator_kind, manifest_kind, read_manifest
from qmri_labels.estimators.network import NetworkEstimator
from qmri_labels.estimators.qsm import QSMEstimator

#: bundle kind -> estimator class
BUNDLE_CLASSES = {estimator_kind(cls): cls for cls in (NetworkEstimator, QSMEstimator)}


def load(path: str | os.PathLike):
    """The estimator in a bundle folder, whichever kind it holds (checksum verified)."""
    manifest = read_manifest(path)
    cls = BUNDLE_CLASSES.get(manifest_kind(manifest))
    if cls is None:
        raise ValueError(f"{path} is a bundle of kind {manifest.get('kind')!r}; estimators are of kinds "
                         f"{sorted(BUNDLE_CLASSES)}")
    return cls.load(path)
