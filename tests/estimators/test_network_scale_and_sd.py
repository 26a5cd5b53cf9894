"""A network reads a scan in scanner units through every entry point, and the SD it reports is
an error bar against the truth unless the label's spread is asked for by name."""

from __future__ import annotations

import json
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from qmri_labels.cli import fit as fit_cli
from qmri_labels.data import DatasetSpec
from qmri_labels.estimators import NetworkEstimator
from qmri_labels.estimators.network import SDNotCalibrated
from qmri_labels.interop.dipy import IvimModel
from qmri_labels.maps import fit_volume
from qmri_labels.maps.derivatives import param_map_name, sd_map_name
from qmri_labels.maps.volume import UncertaintyNotSupported
from qmri_labels.paths import models_dir
from qmri_labels.physics import get_model

SHIPPED = models_dir() / "ivim_epstein_snr30_mle"
SHAPE = (8, 8, 3)


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """One IVIM scan in scanner units: S0 around 1000, varying smoothly and at random across
    the voxels, Rician noise at SNR 30, the shipped networks' protocol."""
    network = NetworkEstimator.load(SHIPPED)
    bvals = np.asarray(network.protocol, dtype=np.float64)
    rng = np.random.default_rng(7)
    ramp = np.linspace(0.6, 1.4, SHAPE[0])[:, None, None] * np.ones(SHAPE)
    theta = np.stack([1000 * ramp * rng.uniform(0.9, 1.1, SHAPE), rng.uniform(0.05, 0.35, SHAPE),
                      rng.uniform(0.0008, 0.0025, SHAPE), rng.uniform(0.01, 0.08, SHAPE)], -1)
    clean = get_model("ivim").forward(torch.tensor(theta), torch.tensor(bvals)).numpy()
    sigma = 1000 / 30
    dwi = np.hypot(clean + sigma * rng.standard_normal(clean.shape),
                   sigma * rng.standard_normal(clean.shape)).astype(np.float32)
    folder = tmp_path_factory.mktemp("scan")
    nib.save(nib.Nifti1Image(dwi, np.diag([2.0, 2.0, 3.0, 1.0])), str(folder / "sub-01_dwi.nii.gz"))
    np.savetxt(folder / "sub-01_dwi.bval", bvals[None], fmt="%g")
    return {"network": network, "bvals": bvals, "theta": theta, "dwi": dwi, "folder": folder}


def test_raw_unit_predict_is_not_pinned_at_the_bounds(scan):
    network = scan["network"]
    params = network.predict(scan["dwi"]).reshape(-1, 4)
    truth = scan["theta"].reshape(-1, 4)
    head = network.network_
    bounded = head.head
    lower, upper = bounded.lower.numpy(), (bounded.lower + bounded.span).numpy()
    pinned = np.isclose(params, lower, rtol=1e-3) | np.isclose(params, upper, rtol=1e-3)
    assert pinned[:, 1:].mean() < 0.05
    # S0 comes back in the scan's units, D follows the truth
    assert np.median(np.abs(params[:, 0] / truth[:, 0] - 1)) < 0.1
    assert np.corrcoef(params[:, 2], truth[:, 2])[0, 1] > 0.6
    # the same as scaling by hand into the training units and S0 back
    scale = network.signal_scale(scan["dwi"])
    by_hand = network.predict(scan["dwi"] / scale, signal_scale=1.0).reshape(-1, 4)
    by_hand[:, 0] *= scale
    np.testing.assert_allclose(params, by_hand, rtol=1e-5, atol=1e-9)


def test_one_scan_through_four_entry_points_gives_the_same_maps(scan, tmp_path):
    network, dwi, bvals = scan["network"], scan["dwi"], scan["bvals"]
    by_predict = network.predict(dwi)
    by_fit_volume = fit_volume(dwi, protocol=bvals, estimator=network).params
    ivim = IvimModel(SimpleNamespace(bvals=bvals), estimator=network).fit(dwi)
    by_dipy = np.asarray(ivim.model_params)[..., [0, 1, 3, 2]]
    out = tmp_path / "maps"
    assert fit_cli.main(["--dwi", str(scan["folder"] / "sub-01_dwi.nii.gz"), "--bval",
                         str(scan["folder"] / "sub-01_dwi.bval"), "--estimator", str(SHIPPED), "--out", str(out),
                         "--quiet"]) == 0
    by_cli = np.stack([np.asarray(nib.load(str(out / param_map_name("sub-01", "ivim", n))).dataobj)
                       for n in network.param_names], -1)
    for other in (by_fit_volume, by_dipy, by_cli):
        np.testing.assert_allclose(other, by_predict, rtol=1e-5, atol=1e-9)


def test_a_scale_that_cannot_be_known_is_refused(scan):
    network = scan["network"]
    with pytest.raises(ValueError, match="lowest b-value"):
        network.predict(np.zeros((3, len(scan["bvals"]))))
    with pytest.raises(ValueError, match="signal_scale"):
        network.predict(scan["dwi"], signal_scale=-1.0)


# ------------------------------------------------------------------------- what an SD means

@pytest.fixture(scope="module")
def data():
    return DatasetSpec(n=3000, seed=21).generate()


@pytest.fixture(scope="module")
def mle_net(data):
    return NetworkEstimator(label="mle", uncertainty="variance_head", max_epochs=4, batch_size=128, val_fraction=0.25,
                            accelerator="cpu", devices=1, progress=False, num_threads=1,
                            mle_options={"n_starts": 1}, seed=2).fit(data)


def _z_rms(estimate, sd, truth):
    z = (estimate - truth) / sd
    return np.sqrt(np.nanmean(z ** 2, axis=0))


def test_an_mle_label_network_reports_an_sd_calibrated_against_the_truth(mle_net):
    assert mle_net.sd_kind == "truth"
    scale = np.asarray(mle_net.uncertainty_["sd_scale"])
    assert scale.shape == (4,) and np.all(scale > 0)
    held_out = DatasetSpec(n=3000, seed=99).generate()
    estimate, sd = mle_net.at_training_scale().predict(held_out.signals, return_sd=True)
    _, label_sd = mle_net.at_training_scale().predict(held_out.signals, return_sd=True, sd_kind="label")
    np.testing.assert_allclose(sd, label_sd * scale.astype(np.float32), rtol=1e-6)
    z = _z_rms(estimate.astype(np.float64), sd.astype(np.float64), held_out.theta_true)
    f, d = mle_net.param_names.index("f"), mle_net.param_names.index("D")
    assert 0.8 < z[f] < 1.25 and 0.8 < z[d] < 1.25


def test_the_calibration_is_recorded_in_the_bundle(mle_net, tmp_path):
    path = mle_net.save(tmp_path / "net")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["uncertainty"]["sd_kind"] == "truth"
    assert manifest["uncertainty"]["sd_scale"] == mle_net.uncertainty_["sd_scale"]
    back = NetworkEstimator.load(path)
    signals = 1000 * DatasetSpec(n=50, seed=5).generate().signals
    np.testing.assert_array_equal(mle_net.predict(signals, return_sd=True)[1], back.predict(signals, return_sd=True)[1])


@pytest.fixture(scope="module")
def uncalibrated(data, tmp_path_factory):
    """An MLE-label network trained on arrays without the truth: its SD cannot be calibrated."""
    rng = np.random.default_rng(0)
    labels = data.theta_true * rng.uniform(0.9, 1.1, data.theta_true.shape)
    net = NetworkEstimator(label="mle", uncertainty="variance_head", max_epochs=2, batch_size=128,
                           accelerator="cpu", devices=1, progress=False, num_threads=1, seed=2)
    net.fit(data.signals, labels, protocol=data.protocol)
    return net, net.save(tmp_path_factory.mktemp("bundle") / "uncalibrated")


def test_an_uncalibrated_sd_is_given_only_by_its_name(uncalibrated, scan, tmp_path, capsys):
    net, bundle = uncalibrated
    assert net.sd_kind == "label"
    with pytest.raises(SDNotCalibrated, match="sd_kind='label'"):
        net.predict(scan["dwi"], return_sd=True)
    with pytest.raises(UncertaintyNotSupported, match="--sd-kind label"):
        fit_volume(scan["dwi"], protocol=scan["bvals"], estimator=net, uncertainty=True)
    maps = fit_volume(scan["dwi"], protocol=scan["bvals"], estimator=net, uncertainty=True, sd_kind="label")
    assert maps.sd_kind == "label" and "NOT calibrated" in maps.sd_method
    dwi, bval = scan["folder"] / "sub-01_dwi.nii.gz", scan["folder"] / "sub-01_dwi.bval"
    refused = fit_cli.main(["--dwi", str(dwi), "--bval", str(bval), "--estimator", str(bundle), "--uncertainty",
                            "--out", str(tmp_path / "refused"), "--quiet"])
    assert refused == 1 and "--sd-kind label" in capsys.readouterr().err
    out = tmp_path / "label"
    assert fit_cli.main(["--dwi", str(dwi), "--bval", str(bval), "--estimator", str(bundle), "--uncertainty",
                         "--sd-kind", "label", "--out", str(out), "--quiet"]) == 0
    sidecar = json.loads((out / sd_map_name("sub-01", "ivim", "f")).with_name(
        sd_map_name("sub-01", "ivim", "f").replace(".nii.gz", ".json")).read_text())
    assert sidecar["SDKind"] == "label" and "NOT an error bar" in sidecar["Description"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["uncertainty"]["sd_kind"] == "label"


def test_fine_tuning_on_scanner_units_trains_at_the_training_scale(scan):
    """A shipped network fine-tuned (warm_start) on voxels in scanner units sees them at its
    training scale, as predict does; it keeps its preprocessing and maps the scan sensibly."""
    net = NetworkEstimator.load(models_dir() / "ivim_epstein_snr30_self")
    net.set_params(warm_start=True, lr=1e-4, max_epochs=2, batch_size=64, accelerator="cpu", progress=False,
                   num_threads=1)
    reference = net.preprocessing_["reference"]
    signals = scan["dwi"].reshape(-1, len(scan["bvals"]))
    net.fit(signals, protocol=net.protocol)
    assert net.preprocessing_["reference"] == pytest.approx(reference, rel=1e-6)
    params = net.predict(signals)
    truth = scan["theta"].reshape(-1, 4)
    assert np.median(np.abs(params[:, 0] / truth[:, 0] - 1)) < 0.1
    assert np.corrcoef(params[:, 2], truth[:, 2])[0, 1] > 0.6
