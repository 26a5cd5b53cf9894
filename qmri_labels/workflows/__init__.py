"""Study workflows run by ``python -m qmri_labels.study``: one module (or small package) per study
kind, registered in :data:`qmri_labels.workflows.registry.WORKFLOWS`.

``ivim``             the label comparison for voxel-wise models (kind ``ivim_labels``), with
                     ``label_fairness`` (designs, per-label tuning, seeds) and ``jobs`` (workers)
``ivim_models``      the shipped IVIM networks exported from a label study
``qsm``              the QSM label and activation studies and the shipped QSM network
``mismatch``         train/test mismatch (kind ``mismatch``)
``hparam``           the hyperparameter study (kind ``hparam``) on :mod:`qmri_labels.search`
``reproducibility``  Oh et al.'s sources of irreproducibility (kind ``reproducibility``)
``common``           what the workflows share (the strict config merge, tests, tables, manifests)
"""
