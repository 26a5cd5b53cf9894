"""Synthetic QSM heads: random-shape and ellipsoid phantoms (:mod:`~qmri_labels.data.qsm.phantoms`),
anatomical heads (:mod:`~qmri_labels.data.qsm.anatomical`) and the one set class
with its recipe (:mod:`~qmri_labels.data.qsm.phantom_set`)."""

from qmri_labels.data.qsm.anatomical import AnatomicalHead, make_anatomical_head
from qmri_labels.data.qsm.phantom_set import FAMILIES, FIELD_KINDS, RECIPE_FIELDS, QSMPhantomSet, QSMPhantomSpec, generate_qsm
from qmri_labels.data.qsm.phantoms import make_background, make_ellipsoid_phantom, make_phantom, random_orientations

__all__ = ["AnatomicalHead", "FAMILIES", "FIELD_KINDS", "RECIPE_FIELDS", "QSMPhantomSet", "QSMPhantomSpec", "generate_qsm",
           "make_anatomical_head", "make_background", "make_ellipsoid_phantom", "make_phantom", "random_orientations"]
