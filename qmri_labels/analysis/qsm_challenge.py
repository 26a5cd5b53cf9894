"""The QSM reconstruction challenge's scores, as the QSM-CI scorer computes them.

:func:`challenge_metrics` gives the simulation-track set of the QSM-CI scorer (the ``qsm-ci``
package's ``qsm_eval``, itself a port of the QSM.rs reference; checked against it in the tests)
for a susceptibility map ``recon`` against ``truth`` on a *score mask*:

* ``nrmse`` -- demeaned NRMSE (%): ``100 ||(x - mean x) - (y - mean y)|| / ||y - mean y||``;
* ``nrmse_detrend`` -- NRMSE (%) after fitting ``x = a y + b`` (least squares on the demeaned
  maps) and undoing it, ``(x - b) / a``: what remains when scale and offset are forgiven;
* ``nrmse_tissue``, ``nrmse_blood``, ``nrmse_dgm`` -- ``nrmse_detrend`` over the tissue (labels 7,
  8, 9: thalamus, white and grey matter), over the venous blood (label 11) dilated by one voxel
  (26-neighbourhood; the scorer does not cut the dilation back to the mask), and over the deep
  grey matter (labels 1-6);
* ``dgm_slope`` and ``dgm_linearity`` -- slope ``a`` of the least-squares line through the six deep
  grey-matter region means (recon against truth) and ``|1 - a|``;
* ``calc_moment_dev`` and ``calc_streak`` -- around a calcification (label 16): the absolute
  difference between the true susceptibility moment (voxels x mean) and that of the recon voxels
  in a cube 3 voxels around it that lie below the least negative threshold (0, -0.01, ...,
  -3.5 ppm) that no voxel of the surroundings (a box 8 voxels further out, cube excluded) goes
  below; and the streak level: the SD of the residual of a linear fit of recon on truth in a
  4-voxel rim around the cube, over the absolute mean of those calcification voxels;
* ``hfen`` -- ``100 ||LoG x - LoG y|| / ||LoG y||`` (sigma 1.5 voxels, truncated at 5 sigma);
* ``xsim`` -- :func:`~qmri_labels.analysis.image_metrics.xsim`; ``correlation`` -- Pearson's r;
* ``coverage`` -- the fraction of the brain mask where the recon is finite and non-zero.

The score mask is the brain mask AND ``recon != 0`` by default (``restrict_to_recon``): a
method that erodes the brain (BFR) is scored where it gave a value, as the challenge did; the
QSM-CI scorer now scores the whole brain mask instead, counting eroded voxels as zeros, which
``restrict_to_recon=False`` reproduces. Both maps are set to zero outside the score mask before
anything is filtered (as the scorer does), so that nothing outside it enters a window. Region
labels follow :data:`qmri_labels.data.qsm.anatomical.LABELS`; without labels the region scores
are NaN.

:func:`visible_error` is the error that a method could see after background-field removal:
``||BFR(D (chi_hat - chi))|| / ||BFR(D chi)||`` on a mask common to all compared methods.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from qmri_labels.analysis.image_metrics import hfen, xsim
from qmri_labels.fitting.bfr import remove_background
from qmri_labels.physics.qsm import forward_field

__all__ = ["challenge_metrics", "score_mask", "visible_error", "TISSUE_LABELS", "BLOOD_LABEL", "DGM_LABELS",
           "CALCIFICATION_LABEL"]

TISSUE_LABELS = (7, 8, 9)
BLOOD_LABEL = 11
DGM_LABELS = (1, 2, 3, 4, 5, 6)
CALCIFICATION_LABEL = 16


def _line(x, y) -> tuple[float, float]:
    """Least-squares ``y = slope x + intercept`` (0, 0 when x is constant)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = x.size
    denom = n * (x * x).sum() - x.sum() ** 2
    if abs(denom) < 1e-30:
        return 0.0, 0.0
    slope = (n * (x * y).sum() - x.sum() * y.sum()) / denom
    return float(slope), float((y.sum() - slope * x.sum()) / n)


def _nrmse_pair(x, y, sel) -> tuple[float, float]:
    """(demeaned NRMSE, detrended NRMSE) in % over ``sel``; NaN where undefined."""
    if not sel.any():
        return math.nan, math.nan
    xd, yd = x[sel] - x[sel].mean(), y[sel] - y[sel].mean()
    ref = math.sqrt(float((yd * yd).sum()))
    if ref < 1e-30:
        return math.nan, math.nan
    demeaned = 100.0 * math.sqrt(float(((xd - yd) ** 2).sum())) / ref
    slope, intercept = _line(yd, xd)
    if abs(slope) < 1e-30:
        return demeaned, demeaned
    corrected = (xd - intercept) / slope
    return demeaned, 100.0 * math.sqrt(float(((corrected - yd) ** 2).sum())) / ref


def _calcification(x, y, labels) -> tuple[float, float]:
    calc = labels == CALCIFICATION_LABEL
    if not calc.any():
        return math.nan, math.nan
    true_moment = float(y[calc].sum())
    lo = np.argwhere(calc).min(axis=0)
    hi = np.argwhere(calc).max(axis=0) + 1
    shape = np.array(labels.shape)

    def box(margin):
        m = np.zeros(labels.shape, bool)
        a, b = np.maximum(lo - margin, 0), np.minimum(hi + margin, shape)
        m[a[0]:b[0], a[1]:b[1], a[2]:b[2]] = True
        return m

    cube, rim_box, outer = box(3), box(7), box(11)
    around = outer & ~cube
    rim = around & rim_box
    threshold = -3.5
    lowest = float(x[around].min()) if around.any() else 0.0
    for i in range(351):  # the least negative t (0.01 ppm steps) that no surrounding voxel is below
        if not lowest < -i * 0.01:
            threshold = -i * 0.01
            break
    inside = x[cube][x[cube] < threshold]
    if inside.size == 0:
        return abs(true_moment), math.nan
    recon_moment = float(inside.sum())
    if rim.sum() < 2:
        return abs(true_moment - recon_moment), math.nan
    slope, intercept = _line(y[rim], x[rim])
    residual = x[rim] - (slope * y[rim] + intercept)
    mean_calc = float(inside.mean())
    streak = float(residual.std()) / abs(mean_calc) if abs(mean_calc) > 1e-30 else math.nan
    return abs(true_moment - recon_moment), streak


def score_mask(recon, mask, restrict_to_recon: bool = True) -> np.ndarray:
    """The voxels that count: ``mask`` AND (recon finite and non-zero, when ``restrict_to_recon``)."""
    m = np.asarray(mask) != 0
    if restrict_to_recon:
        r = np.asarray(recon)
        m = m & np.isfinite(r) & (r != 0)
    return m


def challenge_metrics(recon, truth, mask, labels=None, *, restrict_to_recon: bool = True) -> dict[str, float]:
    """The QSM challenge / QSM-CI scores of a susceptibility map (module docstring).

    Parameters
    ----------
    recon, truth : array (X, Y, Z)
        Susceptibility (ppm).
    mask : array (X, Y, Z)
        The brain mask.
    labels : array (X, Y, Z) of int, optional
        Region labels (the challenge segmentation); without them the region scores are NaN.
    restrict_to_recon : bool
        Score on ``mask & (recon != 0)`` (default) or on the whole mask.

    Returns
    -------
    dict
        ``nrmse``, ``nrmse_detrend``, ``nrmse_tissue``, ``nrmse_blood``, ``nrmse_dgm``, ``dgm_slope``,
        ``dgm_linearity``, ``calc_moment_dev``, ``calc_streak``, ``hfen``, ``xsim``, ``correlation``,
        ``coverage``.
    """
    recon = np.asarray(recon, np.float64)
    truth = np.asarray(truth, np.float64)
    brain = np.asarray(mask) != 0
    if recon.shape != truth.shape or brain.shape != truth.shape:
        raise ValueError(f"shapes differ: recon {recon.shape}, truth {truth.shape}, mask {brain.shape}")
    m = score_mask(recon, brain, restrict_to_recon)
    if not m.any():
        raise ValueError("the score mask selects no voxels (an all-zero recon?)")
    coverage = float((brain & np.isfinite(recon) & (recon != 0)).sum() / max(brain.sum(), 1))
    x = np.where(m, recon, 0.0)
    y = np.where(m, truth, 0.0)
    nrmse, nrmse_detrend = _nrmse_pair(x, y, m)
    xm, ym = x[m], y[m]
    cov = float(((xm - xm.mean()) * (ym - ym.mean())).sum())
    sd = math.sqrt(float(((xm - xm.mean()) ** 2).sum() * ((ym - ym.mean()) ** 2).sum()))
    out = {"nrmse": nrmse, "nrmse_detrend": nrmse_detrend}
    nan = math.nan
    out.update(nrmse_tissue=nan, nrmse_blood=nan, nrmse_dgm=nan, dgm_slope=nan, dgm_linearity=nan,
               calc_moment_dev=nan, calc_streak=nan)
    if labels is not None:
        lab = np.rint(np.asarray(labels)).astype(np.int32)
        if lab.shape != truth.shape:
            raise ValueError(f"labels shape {lab.shape} differs from the maps' {truth.shape}")
        out["nrmse_tissue"] = _nrmse_pair(x, y, m & np.isin(lab, TISSUE_LABELS))[1]
        blood = ndimage.binary_dilation(m & (lab == BLOOD_LABEL), structure=np.ones((3, 3, 3), bool))
        out["nrmse_blood"] = _nrmse_pair(x, y, blood)[1]
        out["nrmse_dgm"] = _nrmse_pair(x, y, m & np.isin(lab, DGM_LABELS))[1]
        regions = [lab == k for k in DGM_LABELS if (lab == k).any()]
        if len(regions) >= 2:
            slope, _ = _line([y[r].mean() for r in regions], [x[r].mean() for r in regions])
            out["dgm_slope"], out["dgm_linearity"] = slope, abs(1.0 - slope)
        out["calc_moment_dev"], out["calc_streak"] = _calcification(x, y, lab)
    out["hfen"] = hfen(x, y, m)
    out["xsim"] = xsim(x, y, m)
    out["correlation"] = cov / sd if sd > 0 else 0.0
    out["coverage"] = coverage
    return out


def visible_error(chi_hat, chi, mask, voxel_size=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0), *, method: str,
                  common_mask=None, **options) -> float:
    """The error a method could see after background-field removal (%):
    ``100 ||BFR(D (chi_hat - chi))|| / ||BFR(D chi)||``.

    Both fields go through the same BFR ``method`` (with ``options``) on the brain ``mask``; the
    norms are taken over ``common_mask`` (default: the method's eroded mask; pass the
    intersection of the eroded masks of all compared methods,
    :func:`~qmri_labels.fitting.bfr.common_eroded_mask`, for a fair comparison) after removing
    each field's mean there (BFR results are defined up to a constant). Of an error, only this
    part reaches the local field a method sees; the rest (e.g. chi profiles whose fields are
    harmonic in the brain) no inversion after that BFR can recover.

    Parameters
    ----------
    chi_hat, chi : array (X, Y, Z)
        Estimate and truth (ppm).
    mask : array (X, Y, Z)
        Brain mask.
    voxel_size, b0_dir
        mm; B0 direction.
    method : str
        BFR method (:data:`qmri_labels.fitting.bfr.BFR_METHODS`).
    common_mask : array (X, Y, Z), optional
    **options
        The method's options.

    Returns
    -------
    float
        Percent.
    """
    chi = np.asarray(chi, np.float64)
    fields = np.stack([forward_field(np.asarray(chi_hat, np.float64) - chi, voxel_size, b0_dir),
                       forward_field(chi, voxel_size, b0_dir)])
    local, eroded = remove_background(method, fields, mask, voxel_size, b0_dir, **options)
    m = eroded if common_mask is None else (np.asarray(common_mask) != 0) & eroded
    if not m.any():
        raise ValueError("the common mask and the method's eroded mask share no voxel")
    err, ref = (f[m] - f[m].mean() for f in local)
    if not np.linalg.norm(ref) > 0:
        raise ValueError("the true local field is zero on the mask")
    return float(100.0 * np.linalg.norm(err) / np.linalg.norm(ref))
