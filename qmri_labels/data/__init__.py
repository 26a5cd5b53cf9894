"""Priors, the simulation specs (a dataset's and an evaluation grid's) with their simulated
data and the one fingerprint, and (elsewhere in this package) named datasets, QSM phantoms and
I/O."""

from qmri_labels.data.datasets import (
    EPSTEIN_BVALUES,
    Dataset,
    DatasetSpec,
    SimulationSpec,
)
from qmri_labels.data.fingerprint import fingerprint
from qmri_labels.data.grid import GridSpec
from qmri_labels.data.priors import (
    DEFAULT_PRIORS,
    EPSTEIN_RANGES,
    TissueMixturePrior,
    UniformPrior,
    default_prior_ranges,
    prior_from_dict,
)

__all__ = [
    "DEFAULT_PRIORS",
    "EPSTEIN_BVALUES",
    "EPSTEIN_RANGES",
    "Dataset",
    "DatasetSpec",
    "GridSpec",
    "SimulationSpec",
    "TissueMixturePrior",
    "UniformPrior",
    "default_prior_ranges",
    "fingerprint",
    "prior_from_dict",
]
