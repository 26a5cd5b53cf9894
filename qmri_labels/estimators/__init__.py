"""One interface for every way of estimating parameters, scikit-learn's contract.

* :class:`MLEEstimator` wraps the batched maximum-likelihood fitter;
* :class:`NetworkEstimator` trains a voxel-wise network under a chosen training label;
* :class:`QSMEstimator` trains a 3-D U-Net that maps a local field to chi.

``__init__`` stores its arguments, ``fit`` returns ``self``, learned attributes end in ``_``,
``get_params`` / ``set_params`` and :func:`clone` (a new, unfitted copy) work on all of them.
The networks save to and load from one bundle layout (:mod:`~qmri_labels.estimators.bundle`:
weights plus a manifest, checksum verified before reading); :func:`load` reads any of them.
"""

from qmri_labels.estimators.base import BaseEstimator, clone
from qmri_labels.estimators.bundle import (
    estimator_kind,
    load_bundle,
    load_estimator,
    manifest_kind,
    read_manifest,
    save_bundle,
    save_estimator,
    verify_bundle,
)
from qmri_labels.estimators.kinds import BUNDLE_CLASSES, load
from qmri_labels.estimators.mle import MLEEstimator
from qmri_labels.estimators.network import ESTIMATOR_KIND, NetworkEstimator
from qmri_labels.estimators.network_design import DESIGN_PRESETS, UNCERTAINTY_KINDS
from qmri_labels.estimators.qsm import QSMEstimator
from qmri_labels.estimators.reproducible import TrainingRun, train_network

__all__ = [
    "BUNDLE_CLASSES",
    "BaseEstimator",
    "DESIGN_PRESETS",
    "ESTIMATOR_KIND",
    "MLEEstimator",
    "NetworkEstimator",
    "QSMEstimator",
    "TrainingRun",
    "UNCERTAINTY_KINDS",
    "clone",
    "estimator_kind",
    "load",
    "load_bundle",
    "load_estimator",
    "manifest_kind",
    "read_manifest",
    "save_bundle",
    "save_estimator",
    "train_network",
    "verify_bundle",
]
