"""TKD, Tikhonov and COSMOS (qmri_labels.fitting.qsm_inversion)."""

import numpy as np
import pytest
import torch

from qmri_labels.analysis.image_metrics import nrmse_demeaned
from qmri_labels.data.qsm import QSMPhantomSpec, make_phantom, random_orientations
from qmri_labels.fitting.qsm_inversion import cosmos, tikhonov, tkd
from qmri_labels.physics.qsm import dipole_kernel, forward_field


@pytest.fixture(scope="module")
def phantom():
    chi, mask = make_phantom((32, 32, 32), seed=11)
    return chi.astype(np.float64), mask


def test_tkd_recovers_chi_from_noiseless_field(phantom):
    chi, mask = phantom
    field = forward_field(chi)
    est = tkd(field, mask=mask)
    err = nrmse_demeaned(est, chi, mask)
    # truncation loses the cone of small |D| (underestimation + streaks) but keeps the rest
    assert err < 45
    assert np.corrcoef(est[mask], chi[mask])[0, 1] > 0.85
    assert np.all(est[~mask] == 0)
    # with a tiny threshold TKD comes closer to the exact inverse on a noiseless field (what
    # remains is the information lost on the cone D = 0 itself)
    assert nrmse_demeaned(tkd(field, threshold=1e-3), chi, mask) < 0.8 * err


def test_tkd_exact_where_kernel_large():
    rng = np.random.default_rng(0)
    shape = (12, 12, 12)
    d = dipole_kernel(shape)
    spec = np.fft.fftn(rng.normal(size=shape))
    spec[np.abs(d) < 0.19] = 0  # only frequencies TKD does not truncate
    chi = np.fft.ifftn(spec).real
    np.testing.assert_allclose(tkd(forward_field(chi)), chi, atol=1e-4)


def test_tikhonov_regularisation_tradeoff(phantom):
    chi, mask = phantom
    rng = np.random.default_rng(1)
    field = forward_field(chi) + rng.normal(0, 0.01, chi.shape)
    errs = {lam: nrmse_demeaned(tikhonov(field, lam=lam, mask=mask), chi, mask) for lam in (1e-4, 0.02, 5.0)}
    assert errs[0.02] < errs[1e-4] and errs[0.02] < errs[5.0]  # an interior optimum
    ident = tikhonov(field, lam=0.02, regularizer="identity", mask=mask)
    assert np.isfinite(ident).all()
    # noiseless and lam -> 0: the exact inverse on every frequency where D != 0 (grid points
    # exactly on the magic-angle cone carry no field and are lost)
    exact = tikhonov(forward_field(chi), lam=1e-12)
    visible = np.fft.ifftn(np.fft.fftn(chi) * (np.abs(dipole_kernel(chi.shape)) > 1e-6)).real
    np.testing.assert_allclose(exact, visible, atol=1e-4 * np.abs(chi).max())


def test_cosmos_exact_without_noise(phantom):
    chi, mask = phantom
    o = random_orientations(3, 30.0, seed=2)
    fields = np.stack([forward_field(chi, b0_dir=d) for d in o])
    est = cosmos(fields, o, mask=mask, conditioning=1e-10)
    assert nrmse_demeaned(est, chi, mask) < 1e-4
    # the default conditioning gives up the few ill-conditioned frequencies
    assert nrmse_demeaned(cosmos(fields, o, mask=mask), chi, mask) < 5.0
    # the mean of chi over the whole grid is not observable
    full = cosmos(fields, o, conditioning=1e-10)
    np.testing.assert_allclose(full + chi.mean(), chi, atol=1e-6)


def test_cosmos_batched_and_beats_single_orientation():
    data = QSMPhantomSpec(shape=(24, 24, 24), n=2, n_orientations=5, noise_sigma=0.003, seed=4).generate()
    est = cosmos(data.fields, data.orientations, mask=data.mask)
    assert est.shape == data.chi.shape
    for i in range(2):
        e_cosmos = nrmse_demeaned(est[i], data.chi[i], data.mask[i])
        e_tkd = nrmse_demeaned(tkd(data.field[i], mask=data.mask[i]), data.chi[i], data.mask[i])
        assert e_cosmos < e_tkd


def test_torch_input_and_anisotropic_voxels(phantom):
    chi, mask = phantom
    vs, b0 = (1.0, 1.0, 2.0), (0.2, 0.1, 1.0)
    field = forward_field(chi, vs, b0)
    t = tkd(torch.as_tensor(field), vs, b0)
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy(), tkd(field, vs, b0), atol=1e-8)
    # inverting with the wrong voxel size is measurably worse
    right = nrmse_demeaned(tikhonov(field, vs, b0, lam=1e-4), chi, mask)
    wrong = nrmse_demeaned(tikhonov(field, (1, 1, 1), b0, lam=1e-4), chi, mask)
    assert right < wrong / 2


def test_bad_input():
    with pytest.raises(ValueError, match="threshold"):
        tkd(np.zeros((4, 4, 4)), threshold=0)
    with pytest.raises(ValueError, match="lam"):
        tikhonov(np.zeros((4, 4, 4)), lam=-1)
    with pytest.raises(ValueError, match="regularizer"):
        tikhonov(np.zeros((4, 4, 4)), regularizer="tv")
    with pytest.raises(ValueError, match="orientations"):
        cosmos(np.zeros((2, 4, 4, 4)), np.eye(3))
    with pytest.raises(ValueError, match="mask"):
        tkd(np.zeros((4, 4, 4)), mask=np.ones((3, 3, 3)))


def test_tv_beats_tkd_and_tikhonov_on_a_masked_local_field():
    from qmri_labels.analysis.image_metrics import nrmse
    from qmri_labels.fitting.qsm_inversion import tv

    data = QSMPhantomSpec(shape=(32, 32, 32), n=1, noise_sigma=0.005, seed=21, size_range=(1.5, 6.0)).generate()
    f, m, chi = data.field[0], data.mask[0], data.chi[0]
    err_tv = nrmse(tv(f, m, lam=3e-4, max_iter=60), chi, m)
    err_tkd = nrmse(tkd(f, mask=m), chi, m)
    err_tik = nrmse(tikhonov(f, mask=m), chi, m)
    assert err_tv < 0.6 * err_tkd and err_tv < 0.6 * err_tik, (err_tv, err_tkd, err_tik)
    assert err_tv < 35.0
    # zero outside the mask; batched like the other inversions; torch in, torch out
    batch = tv(np.stack([f, f]), m, lam=3e-4, max_iter=5)
    assert np.all(batch[:, ~m] == 0)
    np.testing.assert_allclose(batch[0], batch[1], atol=1e-6)
    out = tv(torch.as_tensor(f), torch.as_tensor(m), lam=3e-4, max_iter=3)
    assert isinstance(out, torch.Tensor) and out.shape == f.shape
    with pytest.raises(ValueError, match="lam"):
        tv(f, m, lam=0.0)
    with pytest.raises(ValueError, match="mask"):
        tv(f, m[:8])


def test_tv_lambda_is_tuned_on_training_phantoms():
    from qmri_labels.workflows.qsm.common import tune_lambda

    train = QSMPhantomSpec(shape=(32, 32, 32), n=1, noise_sigma=0.005, seed=21, size_range=(1.5, 6.0)).generate()
    best, scores = tune_lambda("tv", train, [3e-5, 3e-4, 3e-2], max_iter=60)
    assert best == 3e-4 and scores[1] == min(scores)  # neither extreme: too little / too much smoothing
    with pytest.raises(ValueError, match="method"):
        tune_lambda("cosmos", train, [1.0, 2.0])
