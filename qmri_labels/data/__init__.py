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
    EPSTEIN_RANGES,
    TissueMixturePrior,
    UniformPrior,
    prior_from_dict,
)

__all__ = [
    "EPSTEIN_BVALUES",
    "EPSTEIN_RANGES",
    "Dataset",
    "DatasetSpec",
    "GridSpec",
    "SimulationSpec",
    "TissueMixturePrior",
    "UniformPrior",
    "fingerprint",
    "prior_from_dict",
]
