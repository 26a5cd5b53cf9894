"""Priors, simulated datasets with fingerprints, and (elsewhere in this package) I/O."""

from qmri_labels.data.datasets import (
    EPSTEIN_BVALUES,
    Dataset,
    DatasetSpec,
)
from qmri_labels.data.fingerprint import fingerprint
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
    "TissueMixturePrior",
    "UniformPrior",
    "fingerprint",
    "prior_from_dict",
]
