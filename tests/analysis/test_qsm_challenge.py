"""The QSM challenge's scores (qmri_labels.analysis.qsm_challenge), each against the QSM-CI scorer."""

import math

import numpy as np
import pytest
from scipy import ndimage

from qmri_labels.analysis.qsm_challenge import challenge_metrics, score_mask, visible_error
from qmri_labels.data.qsm import make_anatomical_head
from qmri_labels.fitting.bfr import common_eroded_mask

qsm_eval = pytest.importorskip("qsm_ci.qsm_eval")

METRICS = ("nrmse", "nrmse_detrend", "nrmse_tissue", "nrmse_blood", "nrmse_dgm", "dgm_linearity", "calc_moment_dev",
           "calc_streak", "hfen", "xsim", "correlation")


@pytest.fixture(scope="module")
def case():
    head = make_anatomical_head(seed=4, calcification=1.0)
    rng = np.random.default_rng(0)
    truth = head.chi.astype(np.float64)
    # a plausible reconstruction: blurred, scaled, offset, noisy, the calcification underestimated
    # and the brain's outer voxel rim lost (as after an eroding BFR)
    recon = 0.8 * ndimage.gaussian_filter(truth, 0.8) + 0.004 + rng.normal(0, 0.01, truth.shape)
    calc = head.labels == 16
    recon[calc] = 0.7 * truth[calc]
    rim = head.mask & ~ndimage.binary_erosion(head.mask, iterations=2)
    recon = np.where(head.mask & ~rim, recon, 0.0)
    return recon, truth, head


@pytest.mark.parametrize("restrict", [True, False])
def test_every_metric_matches_the_qsm_ci_scorer(case, restrict):
    recon, truth, head = case
    ours = challenge_metrics(recon, truth, head.mask, head.labels, restrict_to_recon=restrict)
    m = score_mask(recon, head.mask, restrict)
    theirs, _ = qsm_eval.score_arrays(recon, truth, m.astype(np.uint8), kind="chi", seg=head.labels.astype(np.int32))
    for name in METRICS:
        assert math.isfinite(ours[name]), name
        assert ours[name] == pytest.approx(theirs[name], rel=1e-6, abs=1e-9), name
    if not restrict:  # the scorer's coverage is over the mask it is given
        assert ours["coverage"] == pytest.approx(theirs["coverage"])
    assert 0 < ours["coverage"] < 1
    assert 0.0 < ours["dgm_slope"] < 1.0 and ours["dgm_linearity"] == pytest.approx(1 - ours["dgm_slope"])


def test_perfect_recon_and_the_score_mask(case):
    _, truth, head = case
    perfect = challenge_metrics(truth, truth, head.mask, head.labels)
    assert perfect["nrmse"] == pytest.approx(0, abs=1e-9) and perfect["xsim"] == pytest.approx(1.0)
    assert perfect["dgm_linearity"] == pytest.approx(0, abs=1e-9)
    # even a perfect map loses the calcification's blurred rim above the scorer's threshold
    assert perfect["calc_moment_dev"] < 0.5 * abs(truth[head.labels == 16].sum())
    scaled = challenge_metrics(np.where(head.mask, 0.8 * truth + 0.01, 0.0), truth, head.mask, head.labels)
    assert scaled["nrmse_detrend"] == pytest.approx(0, abs=1e-6) and scaled["nrmse"] == pytest.approx(20.0)
    no_labels = challenge_metrics(truth, truth, head.mask)
    assert math.isnan(no_labels["nrmse_dgm"]) and no_labels["nrmse"] == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="no voxels"):
        challenge_metrics(np.zeros_like(truth), truth, head.mask)


def test_visible_error_after_bfr(case):
    _, truth, head = case
    common = common_eroded_mask(head.mask, head.voxel_size, ("sharp", "vsharp", "lbv"))
    assert common.sum() > 0.4 * head.mask.sum()
    assert visible_error(truth, truth, head.mask, head.voxel_size, method="sharp") == pytest.approx(0, abs=1e-6)
    # a scaled chi is seen in proportion (BFR is linear); a constant offset inside the brain
    # barely (the field of a uniform ellipsoid is uniform inside it: harmonic, removed as background)
    offset = truth + head.mask * 0.05
    seen = visible_error(1.5 * truth, truth, head.mask, head.voxel_size, method="vsharp", common_mask=common)
    assert seen == pytest.approx(50.0, rel=1e-3)
    hidden = visible_error(offset, truth, head.mask, head.voxel_size, method="vsharp", common_mask=common)
    assert hidden < 0.5 * seen, hidden
