"""Image metrics (qmri_labels.analysis.image_metrics)."""

import numpy as np
import pytest
from scipy import ndimage

from qmri_labels.analysis.image_metrics import (
    hfen,
    image_metrics,
    nrmse,
    nrmse_demeaned,
    psnr,
    ssim,
)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    y = ndimage.gaussian_filter(rng.normal(size=(20, 20, 20)), 2.0)
    mask = np.zeros(y.shape, bool)
    mask[3:17, 3:17, 3:17] = True
    return y, mask, rng


def test_nrmse_definition(images):
    y, mask, rng = images
    x = y + 0.1 * rng.normal(size=y.shape)
    expected = 100 * np.linalg.norm((x - y)[mask]) / np.linalg.norm(y[mask])
    assert nrmse(x, y, mask) == pytest.approx(expected)
    assert nrmse(y, y, mask) == 0
    assert nrmse(np.zeros_like(y), y, mask) == pytest.approx(100.0)
    # outside the mask nothing counts
    x2 = y.copy()
    x2[~mask] += 5
    assert nrmse(x2, y, mask) == 0


def test_demeaned_nrmse_ignores_offset(images):
    y, mask, _ = images
    assert nrmse_demeaned(y + 0.3, y, mask) == pytest.approx(0, abs=1e-10)
    assert nrmse(y + 0.3, y, mask) > 10


def test_ssim_properties(images):
    y, mask, rng = images
    assert ssim(y, y, mask) == pytest.approx(1.0)
    small = ssim(y + 0.01 * rng.normal(size=y.shape), y, mask)
    large = ssim(y + 0.2 * rng.normal(size=y.shape), y, mask)
    assert 1 > small > large > -1
    # symmetric in the images when the data range is fixed
    a = y + 0.05 * rng.normal(size=y.shape)
    assert ssim(a, y, mask, data_range=1.0) == pytest.approx(ssim(y, a, mask, data_range=1.0))


def test_hfen_focuses_on_high_frequencies(images):
    y, mask, rng = images
    assert hfen(y, y, mask) == 0
    blurred = ndimage.gaussian_filter(y, 1.5)
    # the same error energy hurts HFEN more as edges than as a smooth offset-like field
    smooth_err = y + (blurred - y).std() * np.linspace(-1, 1, y.shape[0])[:, None, None]
    assert hfen(blurred, y, mask) > hfen(smooth_err, y, mask)


def test_psnr(images):
    y, mask, _ = images
    L = y[mask].max() - y[mask].min()
    x = y + 0.01
    assert psnr(x, y, mask) == pytest.approx(20 * np.log10(L / 0.01))
    assert psnr(y, y, mask) == float("inf")
    assert psnr(x, y, mask, data_range=2 * L) == pytest.approx(psnr(x, y, mask) + 20 * np.log10(2))


def test_image_metrics_keys_and_errors(images):
    y, mask, _ = images
    assert set(image_metrics(y, y, mask)) == {"nrmse", "nrmse_demeaned", "xsim", "ssim", "hfen", "psnr"}
    with pytest.raises(ValueError, match="shape"):
        nrmse(y[:-1], y)
    with pytest.raises(ValueError, match="mask"):
        nrmse(y, y, np.zeros_like(mask))
    with pytest.raises(ValueError, match="NaN"):
        nrmse(np.full_like(y, np.nan), y, mask)
    with pytest.raises(ValueError, match="zero"):
        nrmse(y, np.zeros_like(y), mask)


def test_nrmse_hfen_xsim_match_the_qsm_ci_scorer():
    """An independent implementation: the QSM-CI challenge's scorer (qsm-ci, MIT)."""
    qsm_eval = pytest.importorskip("qsm_ci.qsm_eval")
    from qmri_labels.analysis.image_metrics import xsim
    from qmri_labels.data.qsm import QSMPhantomSpec
    from qmri_labels.fitting.qsm_inversion import tkd

    data = QSMPhantomSpec(shape=(32, 32, 32), n=1, seed=4, noise_sigma=0.005).generate()
    chi, mask = data.chi[0].astype(np.float64), data.mask[0]
    est = tkd(data.field[0], mask=mask).astype(np.float64)  # a masked estimate with streaks
    assert nrmse_demeaned(est, chi, mask) == pytest.approx(qsm_eval.nrmse_challenge(est, chi, mask)[0], rel=1e-10)
    assert hfen(est, chi, mask) == pytest.approx(qsm_eval.hfen(est, chi, mask), rel=1e-10)
    ours = xsim(est, chi, mask)
    assert ours == pytest.approx(qsm_eval.xsim(est, chi, mask), rel=1e-10)
    assert 0.0 < ours < 0.99 and xsim(chi, chi, mask) == pytest.approx(1.0)
    # the QSM constants differ from the SSIM ones: XSIM is not SSIM with another name
    assert abs(ours - ssim(est, chi, mask)) > 1e-3
    with pytest.raises(ValueError, match="window"):
        xsim(est, chi, mask, window=4)
