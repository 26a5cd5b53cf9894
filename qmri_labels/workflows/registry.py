"""The study kinds, registered in one table: :data:`WORKFLOWS` maps a configuration's ``kind`` to its
workflow (defaults, check, run).

A configuration reaches its workflow merged once over the defaults (:meth:`Workflow.merge`,
strict: a key nobody reads is an error), checked once (:meth:`Workflow.check`, before anything
is written) and run (:meth:`Workflow.run`); the workflow modules' own ``run(config, out, quiet)``
do the same for Python callers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Mapping

from qmri_labels.workflows import hparam, ivim, mismatch, reproducibility
from qmri_labels.workflows.common import merge_config
from qmri_labels.workflows.qsm import activation as qsm_activation
from qmri_labels.workflows.qsm import common as qsm_common
from qmri_labels.workflows.qsm import families as qsm_families
from qmri_labels.workflows.qsm import labels as qsm_labels

__all__ = ["Workflow", "WORKFLOWS", "get_workflow"]


@dataclass(frozen=True)
class Workflow:
    """One study kind.

    Attributes
    ----------
    kind : str
    module : module
        Where the workflow lives (its ``run(config, out, quiet)`` merges and checks a partial
        configuration itself, for Python callers).
    defaults : mapping
        Every key the workflow reads, with its default.
    runner : callable
        ``runner(config, out, quiet) -> dict`` of a merged and checked configuration.
    checker : callable or None
        ``checker(config) -> config``: checks (and normalises) a merged configuration, raising
        ``ValueError`` naming a bad entry; None: the run checks what it reads.
    free_form_keys : tuple of str
        Sub-mappings checked by their consumer, not against ``defaults``.
    """

    kind: str
    module: ModuleType
    defaults: Mapping
    runner: Callable[[dict, Path, bool], dict]
    checker: Callable[[dict], dict] | None = None
    free_form_keys: tuple[str, ...] = ()

    def merge(self, config: Mapping | None) -> dict:
        """``config`` over the defaults: the one merge (a new dict)."""
        return merge_config(self.defaults, config, self.free_form_keys)

    def check(self, config: Mapping) -> dict:
        """A merged ``config`` checked, as the run reads it (``config`` itself is left as it is)."""
        config = copy.deepcopy(dict(config))
        return self.checker(config) if self.checker is not None else config

    def run(self, config: Mapping, out: Path, quiet: bool = False) -> dict:
        """Run a configuration that :meth:`check` returned.

        Parameters
        ----------
        config : mapping
        out : Path
            Results folder.
        quiet : bool

        Returns
        -------
        dict
            The workflow's results (tables, ``summary_text``, ``manifest``, ...).
        """
        return self.runner(config, Path(out), quiet)


WORKFLOWS: dict[str, Workflow] = {
    "ivim_labels": Workflow("ivim_labels", ivim, ivim.DEFAULTS, ivim.run_resolved, ivim.check_config,
                            ivim.FREE_FORM_KEYS),
    "qsm_labels": Workflow("qsm_labels", qsm_labels, qsm_labels.DEFAULTS, qsm_labels.run_resolved, None,
                           qsm_common.FREE_FORM_KEYS),
    "qsm_activation": Workflow("qsm_activation", qsm_activation, qsm_activation.DEFAULTS, qsm_activation.run_resolved,
                               None, qsm_common.FREE_FORM_KEYS),
    "qsm_families": Workflow("qsm_families", qsm_families, qsm_families.DEFAULTS, qsm_families.run_resolved,
                             qsm_families.check_config, qsm_common.FREE_FORM_KEYS),
    "mismatch": Workflow("mismatch", mismatch, mismatch.DEFAULTS, mismatch.run_resolved, None,
                         mismatch.FREE_FORM_KEYS),
    "hparam": Workflow("hparam", hparam, hparam.DEFAULTS, hparam.run_resolved, hparam.check_config,
                       hparam.FREE_FORM_KEYS),
    "reproducibility": Workflow("reproducibility", reproducibility, reproducibility.DEFAULTS,
                                reproducibility.run_resolved, None, reproducibility.FREE_FORM_KEYS),
}


def get_workflow(kind: str) -> Workflow:
    """The workflow of ``kind``; ValueError naming the known kinds otherwise."""
    if kind not in WORKFLOWS:
        raise ValueError(f"unknown study kind {kind!r}; known kinds: {', '.join(sorted(WORKFLOWS))}")
    return WORKFLOWS[kind]
