"""Study workflows run by ``python -m qmri_labels.study``.

Each workflow module exposes ``DEFAULTS: dict`` and ``run(config: dict, out: Path, quiet: bool)
-> dict``; a study configuration's ``kind`` selects the module (see :data:`KINDS`). Modules are
imported only when their kind is run.
"""

#: kind -> module name under ``qmri_labels.workflows``
KINDS = {
    "ivim_labels": "ivim",
    "qsm_labels": "qsm",
    "qsm_activation": "qsm",
    "mismatch": "mismatch",
    "hparam": "hparam",
    "reproducibility": "reproducibility",
}

__all__ = ["KINDS"]
