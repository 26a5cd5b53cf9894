"""qmri_labels: which training label should a qMRI network learn from?"""

__version__ = "0.1.0"
