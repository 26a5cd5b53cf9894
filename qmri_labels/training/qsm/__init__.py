"""Training 3-D U-Nets for QSM dipole inversion with a choice of training label.

A small subpackage, one job per module:

``loss``       label choices (gt, mle = COSMOS, self, hybrid, graf), :class:`QSMLoss`, the
               normalisation stored with a network.
``data``       reproducible random patches of phantom arrays, padding.
``module``     the thin LightningModule.
``inputs``     what a network takes (:data:`INPUT_KINDS`, recorded in its bundle) and
               :func:`check_input_kind` (refuse a network trained on other inputs).

The best epoch is kept by the IVIM training's
:class:`qmri_labels.training.module.KeepBestState`. The estimator that trains with these
pieces is :class:`qmri_labels.estimators.QSMEstimator`.
"""

from qmri_labels.training.qsm.data import EpochSampler, QSMPatchDataset, RankBatches, pad_to_multiple
from qmri_labels.training.qsm.inputs import INPUT_KINDS, check_input_kind, input_kind_of
from qmri_labels.training.qsm.loss import QSM_LABELS, QSMLoss, QSMNormalisation, qsm_loss_weights
from qmri_labels.training.qsm.module import QSMLitModule, network_chi

__all__ = [
    "QSM_LABELS",
    "INPUT_KINDS",
    "qsm_loss_weights",
    "QSMNormalisation",
    "QSMLoss",
    "QSMPatchDataset",
    "EpochSampler",
    "RankBatches",
    "QSMLitModule",
    "check_input_kind",
    "input_kind_of",
    "network_chi",
    "pad_to_multiple",
]
