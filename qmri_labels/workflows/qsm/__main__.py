"""``python -m qmri_labels.workflows.qsm train-model | evaluate-model``: the shipped QSM network's
training and the scoring of bundles (:mod:`qmri_labels.workflows.qsm.model`)."""

import sys

from qmri_labels.workflows.qsm.model import main

sys.exit(main())
