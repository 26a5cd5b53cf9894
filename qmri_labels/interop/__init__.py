"""Adapters that let other toolkits' code call qmri_labels estimators by their own names.

* :mod:`qmri_labels.interop.dipy`: ``IvimModel(gtab, estimator=...)`` with dipy's fit object.
* :mod:`qmri_labels.interop.osipi`: an algorithm class with the OSIPI TF2.4 wrapper interface.

Neither imports the other toolkit at module import; the dipy adapter needs dipy only for the
gradient table a caller passes in.
"""
