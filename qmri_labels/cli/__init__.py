"""Command-line layers: thin wrappers that read files, call the library and write results.

Both commands' entry points live here: :mod:`.study` (``qmri-study``, ``python -m
qmri_labels.study``) runs a named study; :mod:`.fit` (``qmri-fit``, ``python -m
qmri_labels.fit``) dispatches to :mod:`.fit_dwi` (diffusion, over
:func:`qmri_labels.maps.fit_volume`) and :mod:`.fit_qsm` (dipole inversion); shared input
checks live in :mod:`.common`. The cohort mode (:mod:`.fit_cohort`: many DWI series,
``--shard I/N``) is a loop over :func:`.fit_dwi.map_scan`, which maps one scan into one output
folder.
"""
