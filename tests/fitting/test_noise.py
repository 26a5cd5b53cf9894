"""The one noise estimator (qmri_labels.fitting.noise): repeats with an SNR gate, background,
MP-PCA validated against dipy; fit_mle with a per-voxel sigma map."""

import numpy as np
import pytest
import torch

from qmri_labels.fitting import fit_mle
from qmri_labels.fitting.noise import estimate_noise, sigma_from_background, sigma_from_repeats, sigma_mppca
from qmri_labels.physics import get_model

B = np.array([0, 10, 20, 30, 50, 80, 100, 200, 400, 600, 800, 1000.0])


def rayleigh(shape, sigma, seed):
    rng = np.random.default_rng(seed)
    return np.hypot(sigma * rng.standard_normal(shape), sigma * rng.standard_normal(shape))


def ivim_volume(shape=(14, 14, 10), sigma=20.0, seed=0, bvals=B, s0=1000.0):
    rng = np.random.default_rng(seed)
    theta = np.stack([rng.uniform(0.8, 1.2, shape) * s0, rng.uniform(0.1, 0.3, shape),
                      rng.uniform(0.0007, 0.002, shape), rng.uniform(0.02, 0.08, shape)], -1)
    clean = get_model("ivim").forward(torch.tensor(theta), torch.tensor(bvals)).numpy()
    sigma = np.broadcast_to(np.asarray(sigma, dtype=float), shape)[..., None]
    noisy = np.hypot(clean + sigma * rng.standard_normal(clean.shape), sigma * rng.standard_normal(clean.shape))
    return noisy, theta


def test_mppca_matches_dipy_on_a_spatially_varying_noise_field():
    from dipy.denoise.localpca import mppca

    shape = (14, 14, 10)
    sigma_true = 15 + 15 * np.linspace(0, 1, shape[0])[:, None, None] * np.ones(shape)
    noisy, _ = ivim_volume(shape, sigma_true, bvals=np.concatenate([B, B[1:] + 5]))
    ours = sigma_mppca(noisy)
    _, theirs = mppca(noisy, return_sigma=True)
    covered = np.isfinite(ours.sigma_map) & (theirs > 0)
    assert covered.mean() > 0.9
    # the same estimator: equal to float32 rounding wherever both are defined
    np.testing.assert_allclose(ours.sigma_map[covered], theirs[covered], rtol=1e-4)
    # and it follows the true field (correlation) at the right level (median within 10 %)
    assert np.corrcoef(ours.sigma_map[covered], sigma_true[covered])[0, 1] > 0.9
    assert abs(np.median(ours.sigma_map[covered]) / np.median(sigma_true) - 1) < 0.1


def test_mppca_stride_uses_fewer_patches_and_stays_close():
    noisy, _ = ivim_volume(sigma=25.0)
    full = sigma_mppca(noisy)
    sparse = sigma_mppca(noisy, stride=2)
    assert sparse.n_voxels < full.n_voxels / 4
    assert abs(sparse.sigma / full.sigma - 1) < 0.05


def test_repeats_gate_removes_the_rician_floor_of_dark_voxels():
    """Half the voxels are background (S0 = 0): their magnitude spread is Rayleigh, not sigma.
    The gated estimate uses the bright voxels only; the ungated one is biased low."""
    bvals = np.array([0, 0, 0, 0, 200, 500, 1000.0])
    noisy, _ = ivim_volume((40, 40, 4), 30.0, bvals=bvals)
    noisy[:20] = rayleigh(noisy[:20].shape, 30.0, 1)
    gated = sigma_from_repeats(noisy, bvals)
    ungated = sigma_from_repeats(noisy, bvals, snr_gate=0)
    assert abs(gated.sigma / 30 - 1) < 0.05
    assert ungated.sigma < 0.85 * 30  # the Rayleigh spread (0.655 sigma) pulls it down
    assert gated.details["snr_gate"] == 3.0 and "> 3 sigma" in gated.description


def test_fit_mle_uses_the_gated_estimator():
    bvals = np.array([0, 0, 0, 0, 10, 20, 50, 100, 200, 400, 800.0])
    noisy, _ = ivim_volume((40, 40, 2), 30.0, bvals=bvals)
    noisy[:20] = rayleigh(noisy[:20].shape, 30.0, 1)
    with pytest.warns(UserWarning, match="sigma estimated"):
        fit = fit_mle(noisy.reshape(-1, bvals.size), bvals, n_starts=1, max_iter=5)
    assert abs(fit.sigma[0] / 30 - 1) < 0.05
    assert fit.sigma_method == sigma_from_repeats(noisy, bvals).description


def test_background_and_auto_order():
    noisy, _ = ivim_volume((12, 12, 8), 20.0)
    noisy[:, :, 6:] = rayleigh(noisy[:, :, 6:].shape, 20.0, 3)
    mask = np.zeros((12, 12, 8), bool)
    mask[:, :, :6] = True
    background = sigma_from_background(noisy[..., 0], mask)
    assert abs(background.sigma / 20 - 1) < 0.15 and background.n_voxels == 12 * 12 * 2
    assert estimate_noise(noisy, B, mask).method == "background"   # one b = 0: no repeats
    assert estimate_noise(noisy, B).method == "mppca"              # no mask: no background
    with pytest.raises(ValueError, match="no volumes repeat each other"):
        estimate_noise(noisy, B, method="repeats")
    with pytest.raises(ValueError, match="noise method"):
        estimate_noise(noisy, B, method="guess")
    with pytest.raises(ValueError, match="4-D"):
        estimate_noise(noisy.reshape(-1, B.size), B, method="mppca")


def test_fit_mle_takes_a_per_voxel_sigma_map():
    """A noise level that differs 4x across the volume: the per-voxel map is used voxel by voxel."""
    shape = (8, 8, 2)
    sigma_true = np.where(np.arange(8)[:, None, None] < 4, 10.0, 40.0) * np.ones(shape)
    noisy, _ = ivim_volume(shape, sigma_true)
    fit = fit_mle(noisy, B, sigma=sigma_true)
    assert not fit.sigma_estimated
    np.testing.assert_allclose(fit.sigma, sigma_true)
    scalar = fit_mle(noisy, B, sigma=float(np.median(sigma_true)))
    assert not np.allclose(fit.nll, scalar.nll)
    with pytest.raises(ValueError, match="does not match"):
        fit_mle(noisy, B, sigma=np.ones((3, 3)))
