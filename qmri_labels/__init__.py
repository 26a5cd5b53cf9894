"""qmri_labels: which training label should a qMRI network learn from?

What a notebook needs, from one place::

    import qmri_labels as ql

    maps = ql.fit_volume(dwi, mask, bvalues, estimator="mle", sigma="auto")   # parameter maps
    fit = ql.fit_mle(signals, bvalues, model="ivim", sigma=20.0)             # voxels in a table
    net = ql.NetworkEstimator.load("ivim_epstein_snr30_self")                # a shipped network
    result = ql.run_study("tiny_ivim", out="runs/smoke")                     # a label study
    result = ql.load_results("runs/smoke")                                   # read back later
    ql.list_models()                                                         # what is shipped

Estimators follow scikit-learn's contract (``fit`` returns self, learned attributes end in
``_``, ``get_params``/``set_params``, :func:`clone`). The subpackages hold the rest: ``physics``
(signal models), ``fitting``, ``data``, ``nets``, ``training``, ``estimators``, ``search``,
``analysis``, ``maps``, ``workflows``, ``interop``, ``cli``.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Names are resolved on first use: `import qmri_labels` stays light (no torch or Lightning import
# just to read `__version__` or to print `--help`), and the public face cannot create an import
# cycle with the subpackages, which import small modules of this package while it initialises.
_EXPORTS = {
    "fit_volume": "qmri_labels.maps",
    "Maps": "qmri_labels.maps",
    "fit_mle": "qmri_labels.fitting",
    "MLEFit": "qmri_labels.fitting",
    "MLEEstimator": "qmri_labels.estimators",
    "NetworkEstimator": "qmri_labels.estimators",
    "QSMEstimator": "qmri_labels.estimators",
    "clone": "qmri_labels.estimators",
    "list_models": "qmri_labels.estimators.shipped",
    "run_study": "qmri_labels.workflows.run",
    "load_results": "qmri_labels.workflows.results",
    "StudyResult": "qmri_labels.workflows.results",
    "get_model": "qmri_labels.physics",
    "SignalModel": "qmri_labels.physics",
    "Parameter": "qmri_labels.physics",
    "DatasetSpec": "qmri_labels.data",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qmri_labels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
