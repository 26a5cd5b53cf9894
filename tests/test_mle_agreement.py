"""The batched fitter against scipy's L-BFGS-B on the same Rician likelihood (the reference is
NumPy/SciPy code in qmri_labels.fitting.reference, independent of the torch fitter)."""

import numpy as np

from qmri_labels.data import EPSTEIN_BVALUES, DatasetSpec
from qmri_labels.fitting import fit_mle
from qmri_labels.fitting.reference import fit_voxel_lbfgsb


def test_nll_no_worse_than_scipy_started_at_truth():
    spec = DatasetSpec(protocol=EPSTEIN_BVALUES, snr=30, noise="rician", n=200, seed=2024)
    data = spec.generate()
    bounds = np.array([[0.0, 0.0, 0.0, 0.003], [2.0, 1.0, 0.005, 0.3]])
    fit = fit_mle(data.signals, data.protocol, noise="rician", sigma=data.sigma, bounds=bounds)
    assert fit.valid.all()
    reference = np.array([
        fit_voxel_lbfgsb(data.signals[i], data.protocol, data.sigma[i], data.theta_true[i], bounds).fun
        for i in range(len(data))
    ])
    gap = fit.nll - reference
    no_worse = gap <= 1e-4
    assert no_worse.mean() >= 0.99, f"worse than scipy in {np.sum(~no_worse)} voxels, gaps {np.sort(gap)[-5:]}"
    assert np.all(fit.params >= bounds[0]) and np.all(fit.params <= bounds[1])
