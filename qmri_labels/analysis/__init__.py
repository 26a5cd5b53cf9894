"""Analysis beyond RMSE: evaluation grids, bias/SD/sensitivity summaries, calibration of reported
uncertainty (coverage, CRPS, reliability), the Cramer-Rao floor,
paired statistics, image metrics for QSM (NRMSE, SSIM, HFEN, PSNR) and the QSM challenge's scores
(:mod:`~qmri_labels.analysis.qsm_challenge`), figures and reports.

Plotting and reporting (:mod:`~qmri_labels.analysis.plots`, :mod:`~qmri_labels.analysis.report`)
import matplotlib only when first used.
"""

import importlib

from qmri_labels.analysis.calibration import (
    CalibrationResult,
    calibration_statistics,
    empirical_crps,
    evaluate_calibration,
    gaussian_crps,
    summarize_calibration,
)
from qmri_labels.analysis.crlb import (
    crlb,
    fisher_information,
    rician_information_factor,
)
from qmri_labels.analysis.grid import GridResult, evaluate_grid
from qmri_labels.analysis.image_metrics import (
    hfen,
    image_metrics,
    nrmse,
    nrmse_demeaned,
    psnr,
    ssim,
)
from qmri_labels.analysis.metrics import (
    marginal_curves,
    sensitivity,
    spearman_table,
    summarize,
)
from qmri_labels.analysis.qsm_challenge import challenge_metrics, visible_error
from qmri_labels.analysis.stats import (
    bonferroni,
    paired_comparisons,
    paired_effect_size,
)
from qmri_labels.data.grid import GridSpec


_LAZY = {
    "write_report": "qmri_labels.analysis.report",
    "read_grid_results": "qmri_labels.analysis.report",
    "plot_bias_sd_rmse": "qmri_labels.analysis.plots",
    "alpha_sweep_table": "qmri_labels.analysis.plots",
    "best_methods": "qmri_labels.analysis.report",
    "compare_on_grid": "qmri_labels.analysis.stats",
    "plot_bias_quiver": "qmri_labels.analysis.plots",
    "plot_error_hist2d": "qmri_labels.analysis.plots",
    "plot_alpha_sweep": "qmri_labels.analysis.plots",
    "plot_reliability": "qmri_labels.analysis.plots",
    "method_colors": "qmri_labels.analysis.plots",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "challenge_metrics",
    "visible_error",
    "GridResult",
    "GridSpec",
    "evaluate_grid",
    "summarize",
    "sensitivity",
    "marginal_curves",
    "spearman_table",
    "crlb",
    "CalibrationResult",
    "calibration_statistics",
    "evaluate_calibration",
    "summarize_calibration",
    "gaussian_crps",
    "empirical_crps",
    "plot_reliability",
    "fisher_information",
    "rician_information_factor",
    "paired_comparisons",
    "paired_effect_size",
    "bonferroni",
    "nrmse",
    "nrmse_demeaned",
    "ssim",
    "hfen",
    "psnr",
    "image_metrics",
    *_LAZY,
]
