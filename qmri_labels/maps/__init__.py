"""Parameter maps from a user's own scans: the mapping wing that ``qmri-fit`` wraps.

* :mod:`.volume`: :func:`fit_volume`, every voxel of a volume (array or NIfTI) estimated by
  one estimator (the MLE, a network, or any object with the estimator contract);
* :mod:`.result`: :class:`Maps`, what it returns, with the per-voxel status codes;
* :mod:`.estimator`: which estimator (``"mle"``, a bundle name or folder, an object) and how
  the scan's voxels reach it, read off the estimator contract alone;
* :mod:`.loading`: a DWI series with its b-values (:func:`load_dwi`), read lazily;
* :mod:`.derivatives`: BIDS-derivative names, sidecars and ``dataset_description.json``;
* :mod:`.cohort`: many scans split into shards, verified outputs skipped on a rerun;
* :mod:`.qc`: the quick-look figure.
"""

from qmri_labels.maps.estimator import EstimatorPlan, load_network, match_protocol, resolve_estimator
from qmri_labels.maps.loading import load_dwi
from qmri_labels.maps.result import SD_REASON_CODES, STATUS_CODES, Maps
from qmri_labels.maps.volume import DIRECTION_CHOICES, ProtocolNotIdentifiable, UncertaintyNotSupported, fit_volume

__all__ = ["DIRECTION_CHOICES", "EstimatorPlan", "Maps", "ProtocolNotIdentifiable", "SD_REASON_CODES", "STATUS_CODES",
           "UncertaintyNotSupported", "fit_volume", "load_dwi", "load_network", "match_protocol",
           "resolve_estimator"]
