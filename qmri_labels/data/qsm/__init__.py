"""Synthetic QSM heads: phantoms (:mod:`~qmri_labels.data.qsm.phantoms`) and the one set class
with its recipe (:mod:`~qmri_labels.data.qsm.phantom_set`)."""

from qmri_labels.data.qsm.phantom_set import FIELD_KINDS, RECIPE_FIELDS, QSMPhantomSet, QSMPhantomSpec, generate_qsm
from qmri_labels.data.qsm.phantoms import make_background, make_phantom, random_orientations

__all__ = ["FIELD_KINDS", "RECIPE_FIELDS", "QSMPhantomSet", "QSMPhantomSpec", "generate_qsm", "make_background",
           "make_phantom", "random_orientations"]
