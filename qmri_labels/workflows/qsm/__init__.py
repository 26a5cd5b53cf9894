"""QSM workflows, one room per job:

``labels``      the label study (kind ``qsm_labels``)
``activation``  Graf et al.'s activation x channels study (kind ``qsm_activation``)
``model``       the shipped network's training and the scoring of bundles, with their command
                ``python -m qmri_labels.workflows.qsm train-model | evaluate-model``
``common``      phantom sets, the tuned baselines and scoring that the three share
"""
