"""The public mapping API (qmri_labels.maps.fit_volume) and the network preprocessing record."""

import numpy as np
import pytest
import torch

from qmri_labels.data import DatasetSpec
from qmri_labels.data.preprocessing import LEGACY_NOTE, SignalPreprocessing, for_training_signals, from_manifest
from qmri_labels.maps import fit_volume
from qmri_labels.physics import get_model

B = np.array([0, 10, 20, 30, 50, 80, 100, 200, 400, 800.0])
SHIPPED = "ivim_epstein_snr30_gt"


def volume(shape, sigma=10.0, seed=0):
    rng = np.random.default_rng(seed)
    theta = np.stack([rng.uniform(800, 1200, shape), rng.uniform(0.1, 0.3, shape),
                      rng.uniform(0.0008, 0.002, shape), rng.uniform(0.02, 0.08, shape)], -1)
    clean = get_model("ivim").forward(torch.tensor(theta), torch.tensor(B)).numpy()
    sigma = np.broadcast_to(np.asarray(sigma, dtype=float), shape)[..., None]
    return np.hypot(clean + sigma * rng.standard_normal(clean.shape), sigma * rng.standard_normal(clean.shape)), theta


def test_any_leading_shape_gives_the_same_estimates():
    data, theta = volume((4, 3, 2))
    cube = fit_volume(data, protocol=B, sigma=10.0)
    flat = fit_volume(data.reshape(-1, B.size), protocol=B, sigma=10.0)
    assert cube.params.shape == (4, 3, 2, 4) and cube["f"].shape == (4, 3, 2) and cube.status.shape == (4, 3, 2)
    np.testing.assert_allclose(cube.params.reshape(-1, 4), flat.params, rtol=1e-5)
    assert np.all(cube.status == 1) and cube.counts["estimated"] == 24
    assert np.median(np.abs(cube["D"] - theta[..., 2]) / theta[..., 2]) < 0.05


def test_mask_progress_callback_and_per_voxel_sigma():
    data, _ = volume((6, 6, 2), sigma=np.where(np.arange(6)[:, None, None] < 3, 5.0, 20.0) * np.ones((6, 6, 2)))
    mask = np.zeros((6, 6, 2), bool)
    mask[1:5] = True
    seen = []
    sigma_map = np.where(np.arange(6)[:, None, None] < 3, 5.0, 20.0) * np.ones((6, 6, 2))
    maps = fit_volume(data, mask, protocol=B, sigma=sigma_map, chunk_size=7, progress=seen.append)
    assert seen[-1] == mask.sum() and len(seen) == int(np.ceil(mask.sum() / 7))
    assert np.all(maps.params[~mask] == 0) and np.all(maps.status[~mask] == 0)
    np.testing.assert_array_equal(maps.sigma_map[mask], sigma_map[mask])
    assert maps.noise["method"] == "given" and maps.noise["per_voxel"]
    with pytest.raises(ValueError, match="sigma map shape"):
        fit_volume(data, protocol=B, sigma=np.ones((2, 2)))
    with pytest.raises(ValueError, match="protocol has 9 b-values"):
        fit_volume(data, protocol=B[:-1], sigma=5.0)
    with pytest.raises(ValueError, match="mask shape"):
        fit_volume(data, np.ones((6, 6)), protocol=B, sigma=5.0)
    with pytest.raises(TypeError, match="estimator must be"):
        fit_volume(data, protocol=B, estimator=3.0)


def test_nifti_input_equals_array_input(tmp_path):
    from qmri_labels.data.io import load_nifti, save_nifti

    data, _ = volume((4, 4, 2))
    save_nifti(tmp_path / "dwi.nii.gz", data, np.eye(4))
    from_file = fit_volume(load_nifti(tmp_path / "dwi.nii.gz"), protocol=B, sigma=10.0, chunk_size=5)
    from_array = fit_volume(data.astype(np.float32), protocol=B, sigma=10.0)
    np.testing.assert_allclose(from_file.params, from_array.params, rtol=1e-5)


def test_shipped_bundles_declare_the_legacy_preprocessing_and_new_ones_record_it():
    from qmri_labels.estimators import NetworkEstimator
    from qmri_labels.paths import models_dir

    network = NetworkEstimator.load(models_dir() / SHIPPED)
    assert "preprocessing" not in network.manifest_  # shipped before the entry existed
    rule, source = from_manifest(network.manifest_)
    assert source == LEGACY_NOTE and rule == SignalPreprocessing("global_scale", 1.0)
    # a bundle saved now records it: the training data's own median lowest-b signal
    spec = DatasetSpec.from_dict(network.train_spec_).replace(n=2000, seed=5)
    data = spec.generate()
    recorded = network.manifest()["preprocessing"]
    assert recorded == rule.to_dict()
    fresh = for_training_signals(data.signals, data.protocol)
    assert fresh.kind == "global_scale" and abs(fresh.reference - 1.0) < 0.02
    with pytest.raises(ValueError, match="unknown keys"):
        SignalPreprocessing.from_dict({"kind": "global_scale", "refrence": 1.0})
    with pytest.raises(ValueError, match="kind"):
        SignalPreprocessing("per_voxel_b0")


def test_network_sees_the_data_scaled_as_in_training_not_divided_by_b0():
    """The mapping path divides the whole volume by one number (median lowest-b / reference), so
    the network sees noisy b = 0 samples as in training; before, each voxel's b = 0 was exactly 1."""
    from qmri_labels.estimators import NetworkEstimator
    from qmri_labels.paths import models_dir

    network = NetworkEstimator.load(models_dir() / SHIPPED)
    data = DatasetSpec.from_dict(network.train_spec_).replace(n=3000, seed=9).generate()
    signals = data.signals.astype(np.float64) * 1000.0
    maps = fit_volume(signals, protocol=data.protocol, estimator=SHIPPED)
    scale = np.median(signals[:, 0]) / 1.0
    expected = network.predict(signals / scale)
    expected[:, 0] *= scale
    np.testing.assert_allclose(maps.params, expected, rtol=2e-5, atol=1e-7)
    assert maps.estimator["preprocessing"]["kind"] == "global_scale"
    assert maps.estimator["preprocessing"]["scale"] == pytest.approx(scale)
    # what the old per-voxel division gave: measurably worse S0 (RMSE +6.6 % at n = 20000,
    # benchmarks/network_preprocessing.py); here: strictly worse on these 3000 voxels
    per_voxel = network.predict(signals / signals[:, :1]) * np.array([1, 1, 1, 1.0])
    per_voxel[:, 0] *= signals[:, 0]
    truth_s0 = data.theta_true[:, 0] * 1000.0
    assert np.sqrt(np.mean((maps["S0"] - truth_s0) ** 2)) < np.sqrt(np.mean((per_voxel[:, 0] - truth_s0) ** 2))


# ----------------------------------------------------------------------------- uncertainty


def test_sd_maps_equal_fit_mle_standard_errors_with_reasons():
    from qmri_labels.fitting import fit_mle
    from qmri_labels.maps import SD_REASON_CODES

    data, theta = volume((5, 4, 3), sigma=10.0, seed=3)
    # a slab of mono-exponential voxels (f = 0): f lands on its lower bound, D* is not identifiable
    rng = np.random.default_rng(4)
    clean = get_model("ivim").forward(torch.tensor([[1000.0, 0.0, 1e-3, 0.05]]), torch.tensor(B)).numpy()
    data[4] = np.hypot(clean + 10 * rng.standard_normal((4, 3, B.size)), 10 * rng.standard_normal((4, 3, B.size)))
    mask = np.ones((5, 4, 3), bool)
    mask[0, 0] = False
    maps = fit_volume(data, mask, protocol=B, sigma=10.0, chunk_size=13, uncertainty=True)
    direct = fit_mle(data[mask], B, sigma=10.0, uncertainty=True)
    assert maps.sd.shape == maps.params.shape and maps.sd.dtype == np.float32
    np.testing.assert_allclose(maps.params[mask], direct.params, rtol=1e-6)
    np.testing.assert_allclose(maps.sd[mask], direct.sd, rtol=1e-5, equal_nan=True)
    assert np.all(maps.sd[~mask] == 0) and np.all(maps.sd_reason[~mask] == 0)
    # NaN exactly where fit_mle gives a reason, and the same reason
    reasons = np.vectorize(lambda c: "" if c == 1 else SD_REASON_CODES[c])(maps.sd_reason[mask])
    np.testing.assert_array_equal(reasons, direct.sd_reason)
    assert np.array_equal(np.isnan(maps.sd[mask]), direct.sd_reason != "")
    assert (direct.sd_reason != "").any()  # the f = 0 slab gives bound / singular voxels
    counts = maps.sd_reason_counts("Dstar")
    assert sum(counts.values()) == mask.sum() and counts["reported"] < mask.sum()
    np.testing.assert_array_equal(maps.sd_map("D"), maps.sd[..., 2])
    assert "Fisher" in maps.sd_method
    plain = fit_volume(data, mask, protocol=B, sigma=10.0, chunk_size=13)
    assert plain.sd is None and plain.sd_reason is None
    with pytest.raises(ValueError, match="uncertainty=True"):
        plain.sd_map("D")
    with pytest.raises(TypeError, match="uncertainty must be True or False"):
        fit_volume(data, protocol=B, sigma=10.0, uncertainty="yes")


def test_a_network_without_sd_is_refused_and_one_with_sd_is_scaled_back():
    from qmri_labels.estimators import NetworkEstimator
    from qmri_labels.maps import UncertaintyNotSupported
    from qmri_labels.paths import models_dir

    network = NetworkEstimator.load(models_dir() / SHIPPED)
    data = DatasetSpec.from_dict(network.train_spec_).replace(n=200, seed=2).generate()
    signals = data.signals.astype(np.float64) * 1000.0
    with pytest.raises(UncertaintyNotSupported, match="does not report standard deviations.*return_sd"):
        fit_volume(signals, protocol=data.protocol, estimator=SHIPPED, uncertainty=True)
    with pytest.raises(UncertaintyNotSupported):
        fit_volume(signals, protocol=data.protocol, estimator=network, uncertainty=True)

    class ReportsSD(NetworkEstimator):
        """A network whose SD is a known function of its estimate (10 % of it)."""

        reports_sd = True
        sd_kind = "truth"

        def predict(self, signals, batch_size=65536, device=None, return_sd=False, **options):
            params = super().predict(signals, batch_size=batch_size, device=device, **options)
            return (params, 0.1 * np.abs(params)) if return_sd else params

    with_sd = ReportsSD.load(models_dir() / SHIPPED)
    maps = fit_volume(signals, protocol=data.protocol, estimator=with_sd, uncertainty=True)
    plain = fit_volume(signals, protocol=data.protocol, estimator=SHIPPED)
    np.testing.assert_array_equal(maps.params, plain.params)
    # S0's SD is scaled back with S0 (the data are 1000x the training scale), the others are not
    np.testing.assert_allclose(maps.sd, 0.1 * np.abs(maps.params), rtol=1e-5)
    assert np.all(maps.sd_reason == 1) and "network" in maps.sd_method


def test_mle_sd_map_matches_the_spread_over_noise_repeats():
    """Monte Carlo: on a volume of repeated known truths at SNR 50 the Fisher SD map equals
    the empirical SD of the estimates within 0.8-1.25 for f and D (an SD off by a factor
    of 1.3 either way, e.g. from a wrong sigma, fails)."""
    truths = np.array([[1000, 0.2, 0.001, 0.05], [1000, 0.3, 0.0015, 0.08], [1000, 0.25, 0.002, 0.04]])
    repeats, sigma = 300, 20.0
    theta = np.repeat(truths, repeats, axis=0).reshape(3, 15, 20, 4)
    rng = np.random.default_rng(11)
    clean = get_model("ivim").forward(torch.tensor(theta), torch.tensor(B)).numpy()
    data = np.hypot(clean + sigma * rng.standard_normal(clean.shape), sigma * rng.standard_normal(clean.shape))
    maps = fit_volume(data, protocol=B, sigma=sigma, uncertainty=True)
    for i in range(len(truths)):
        for name in ("f", "D"):
            estimates = maps[name][i].ravel()
            reported = maps.sd_map(name)[i].ravel()
            assert np.isfinite(reported).mean() > 0.99
            ratio = np.sqrt(np.nanmean(reported ** 2)) / np.std(estimates)
            assert 0.8 < ratio < 1.25, (truths[i], name, ratio)


# ----------------------------------------------------------------------------- the estimator contract


def test_the_mle_path_gives_exactly_fit_mles_numbers():
    """fit_volume's MLE goes through MLEEstimator.predict; its maps are fit_mle's own numbers,
    bit for bit, with a per-voxel sigma map, SD reasons, and a voxel fitted without its NaN
    sample on the remaining b-values."""
    from qmri_labels.fitting import fit_mle
    from qmri_labels.maps import SD_REASON_CODES

    data, _ = volume((4, 5, 3), sigma=10.0, seed=8)
    # float32 like the noise maps fit_volume keeps (MP-PCA's, or a given one)
    sigma_map = np.random.default_rng(9).uniform(8.0, 12.0, (4, 5, 3)).astype(np.float32)
    data[0, 0, 0, 4] = np.nan
    mask = np.ones((4, 5, 3), bool)
    mask[3, 4] = False
    maps = fit_volume(data, mask, protocol=B, sigma=sigma_map, uncertainty=True)

    complete = mask.copy()
    complete[0, 0, 0] = False
    direct = fit_mle(data[complete], B, sigma=sigma_map[complete], uncertainty=True)
    np.testing.assert_array_equal(maps.params[complete], direct.params.astype(np.float32))
    np.testing.assert_array_equal(maps.sd[complete], direct.sd.astype(np.float32))
    reasons = np.vectorize(lambda c: "" if c == 1 else SD_REASON_CODES[c])(maps.sd_reason[complete])
    np.testing.assert_array_equal(reasons, direct.sd_reason)

    keep = np.arange(B.size) != 4
    gap = fit_mle(data[0, 0, 0][None, keep], B[keep], sigma=sigma_map[0, 0, 0][None], uncertainty=True)
    np.testing.assert_array_equal(maps.params[0, 0, 0], gap.params[0].astype(np.float32))
    assert maps.status[0, 0, 0] == 2 and np.all(maps.status[complete] == 1) and np.all(maps.status[~mask] == 0)
    assert maps.estimator == {"kind": "mle", "name": "mle", "noise": "rician"}


class SegmentedIVIM:
    """A user's own estimator that is no class of the toolkit: the contract is all fit_volume
    reads (predict, reports_sd, model_name, param_names, protocol). It was "trained" for B in
    its own order and reports an SD of 5 % of each estimate."""

    model_name = "ivim"
    param_names = ("S0", "f", "D", "Dstar")
    reports_sd = True

    def __init__(self):
        self.protocol = B[::-1].copy()
        self.calls = []

    def predict(self, signals, device=None, return_sd=False):
        self.calls.append((np.array(signals), device, return_sd))
        signals = np.asarray(signals, dtype=np.float64)
        b = self.protocol
        high = b >= 200
        slope, intercept = np.polyfit(b[high], np.log(signals[:, high]).T, 1)
        s0 = signals[:, b == 0][:, 0]
        f = np.clip(1 - np.exp(intercept) / s0, 0, 1)
        params = np.stack([s0, f, -slope, np.full_like(s0, 0.05)], -1).astype(np.float32)
        return (params, 0.05 * np.abs(params)) if return_sd else params


def test_fit_volume_takes_any_object_with_the_estimator_contract():
    data, _ = volume((3, 4, 2), seed=5)
    data[0, 0, 0, 3] = np.nan  # an estimator trained for a protocol needs all of it: skipped
    estimator = SegmentedIVIM()
    maps = fit_volume(data, protocol=B, estimator=estimator, device="cpu", uncertainty=True)

    rows = data.reshape(-1, B.size)[1:].astype(np.float32)  # fit_volume reads voxels as float32
    expected = SegmentedIVIM().predict(rows[:, ::-1])  # the scan's volumes in the estimator's order
    np.testing.assert_array_equal(maps.params.reshape(-1, 4)[1:], expected)
    np.testing.assert_allclose(maps.sd.reshape(-1, 4)[1:], 0.05 * np.abs(expected))
    assert maps.status[0, 0, 0] == 6 and np.all(maps.status.reshape(-1)[1:] == 1)
    assert np.all(np.isnan(maps.params[0, 0, 0])) and np.all(maps.sd_reason.reshape(-1, 4)[1:] == 1)
    # no preprocessing declared: the estimator sees the scan's units; no noise level is needed
    seen, device, return_sd = estimator.calls[0]
    assert seen.max() > 100 and device == "cpu" and return_sd is True
    assert maps.noise is None and maps.estimator == {"kind": "estimator", "name": "SegmentedIVIM"}
    assert "reported by the estimator" in maps.sd_method

    class NoSD(SegmentedIVIM):
        reports_sd = False

    from qmri_labels.maps import UncertaintyNotSupported

    with pytest.raises(UncertaintyNotSupported, match="reports_sd is false"):
        fit_volume(data, protocol=B, estimator=NoSD(), uncertainty=True)
    with pytest.raises(ValueError, match="fits the ivim model"):
        fit_volume(data, protocol=B, estimator=SegmentedIVIM(), model="monoexp")
    with pytest.raises(TypeError, match="no reports_sd"):
        fit_volume(data, protocol=B, estimator=type("Partial", (), {"predict": None, "model_name": "ivim",
                                                                   "param_names": (), "protocol": B})())


def test_an_estimator_without_a_protocol_gets_the_scans_through_set_params():
    """An estimator of the toolkit's contract with ``protocol=None`` (like the MLE) fits the
    scan's own b-values and noise level, given to a clone; the caller's object is unchanged."""
    from qmri_labels.estimators import BaseEstimator

    class LogLinear(BaseEstimator):
        model_name = "monoexp"
        param_names = ("S0", "D")
        reports_sd = False

        def __init__(self, protocol=None, sigma=None):
            self.protocol = protocol
            self.sigma = sigma

        def predict(self, signals, device=None, return_sd=False):
            b = np.asarray(self.protocol, dtype=np.float64)
            slope, intercept = np.polyfit(b, np.log(np.asarray(signals, dtype=np.float64)).T, 1)
            return np.stack([np.exp(intercept), -slope], -1).astype(np.float32)

    b = np.array([0, 200, 400, 600, 800, 1000.0])
    s0 = np.array([[1000.0], [1500.0]])
    data = s0 * np.exp(-b * np.array([[1e-3], [2e-3]]))
    data[1, 2] = np.nan  # fitted on the other five b-values
    template = LogLinear()
    maps = fit_volume(data, protocol=b, estimator=template, sigma=10.0)
    np.testing.assert_allclose(maps["S0"], [1000.0, 1500.0], rtol=1e-4)
    np.testing.assert_allclose(maps["D"], [1e-3, 2e-3], rtol=1e-4)
    assert list(maps.status) == [1, 2] and maps.noise["method"] == "given"
    assert template.protocol is None and template.sigma is None
