"""CUDA paths that the CPU suite cannot reach: the batched MLE fitter and a voxel network
trained on the GPU agree with their CPU counterparts. Skipped without CUDA; run on a GPU machine
by ``benchmarks/gpu_check.py`` (``pytest -m gpu``)."""

import numpy as np
import pytest
import torch

from qmri_labels.data import EPSTEIN_BVALUES, DatasetSpec
from qmri_labels.fitting import fit_mle

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.fixture(scope="module")
def ivim():
    return DatasetSpec(model="ivim", protocol=EPSTEIN_BVALUES, snr=30.0, noise="rician", n=4000, seed=11).generate()


def test_fit_mle_on_the_gpu_matches_the_cpu(ivim):
    gpu = fit_mle(ivim.signals, ivim.protocol, sigma=ivim.sigma, device="cuda")
    cpu = fit_mle(ivim.signals, ivim.protocol, sigma=ivim.sigma, device="cpu")
    assert gpu.valid.mean() > 0.99 and np.array_equal(gpu.valid, cpu.valid)
    both = gpu.valid & cpu.valid
    # other kernels, same optimum: the NLL at the two estimates agrees closely voxel by voxel
    np.testing.assert_allclose(gpu.nll[both], cpu.nll[both], rtol=1e-4, atol=1e-3)
    assert np.median(np.abs(gpu.params[both] - cpu.params[both]) / (np.abs(cpu.params[both]) + 1e-6)) < 1e-3
    again = fit_mle(ivim.signals, ivim.protocol, sigma=ivim.sigma, device="cuda")
    assert np.array_equal(np.nan_to_num(gpu.params), np.nan_to_num(again.params))


def test_network_trains_on_the_gpu_and_predicts_like_on_the_cpu(ivim):
    from qmri_labels.estimators import NetworkEstimator

    est = NetworkEstimator(label="gt", max_epochs=3, batch_size=128, seed=0, accelerator="gpu", devices=1)
    est.fit(ivim)
    pred = est.predict(ivim.signals[:500])
    assert pred.shape == (500, 4) and np.all(np.isfinite(pred))
    # the fitted network's weights live where it trained; its predictions do not depend on where it runs
    est_cpu_pred = NetworkEstimator.load(_saved(est)).predict(ivim.signals[:500])
    np.testing.assert_allclose(pred, est_cpu_pred, rtol=1e-4, atol=1e-6)


def _saved(est):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "gpu_bundle"
    est.save(path)
    return path


def test_a_gpu_chunk_is_sized_from_the_gpu_s_free_memory():
    from qmri_labels.fitting.mle import _default_memory_mb

    free, _ = torch.cuda.mem_get_info()
    assert _default_memory_mb(torch.device("cpu")) == 1024.0
    assert _default_memory_mb(torch.device("cuda")) == max(1024.0, min(16384.0, free / 4 / 2**20))
