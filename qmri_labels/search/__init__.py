"""One hyperparameter search: an Optuna study with one space format, serving per-label tuning
(:func:`qmri_labels.search.tuning.tune`) and the hyperparameter study
(:mod:`qmri_labels.workflows.hparam`), in one process or shared by workers on many machines.

``space``   the search-space format: a list of choices or a ``{low, high, log}`` range per name
``engine``  trial-seeded sampling (random or TPE), median pruning in trial order, shared storage
            with heartbeats, re-queueing of dead workers' trials, the trial budget
``tuning``  :func:`tune`: the design of one training label's network
"""

from qmri_labels.search.engine import finished_trials, open_study, run_trials, trial_seeded_sampler
from qmri_labels.search.space import check_space, suggest
from qmri_labels.search.tuning import DEFAULT_SPACE, tune

__all__ = ["tune", "DEFAULT_SPACE", "check_space", "suggest", "open_study", "run_trials", "finished_trials",
           "trial_seeded_sampler"]
