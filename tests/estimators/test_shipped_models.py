"""The trained networks shipped in models/: they load, verify, and still meet their manifests."""

import numpy as np
import pytest

from qmri_labels import paths
from qmri_labels.estimators.bundle import verify_bundle
from qmri_labels.data import EPSTEIN_BVALUES, DatasetSpec
from qmri_labels.estimators import NetworkEstimator
from qmri_labels.workflows.ivim import heldout_metrics

SHIPPED = {"ivim_epstein_snr30_gt": "net-gt", "ivim_epstein_snr30_mle": "net-mle",
           "ivim_epstein_snr30_self": "net-self", "ivim_epstein_snr30_hybrid0.5": "net-hybrid-0.5"}
#: same data: only float round-off between machines may differ
SAME_DATA_RTOL = 1e-4
#: fresh data (another seed, 5000 signals): RMSE has a sampling error of a few percent
FRESH_DATA_RTOL = 0.10


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def shipped(request):
    path = paths.models_dir() / request.param
    if not path.is_dir():
        pytest.fail(f"shipped model {path} is missing")
    return request.param, path, NetworkEstimator.load(path)


def test_bundle_verifies_and_is_small(shipped):
    name, path, net = shipped
    data, manifest = verify_bundle(path)
    assert len(data) < 64 * 1024  # kilobytes, not megabytes
    assert manifest["method"] == SHIPPED[name]
    for key in ("training_config", "data", "versions", "metrics", "weights", "normalisation", "device"):
        assert key in manifest, key
    assert len(manifest["data"]["train_fingerprint"]) == 64


def test_trained_for_epstein_protocol_at_snr30(shipped):
    name, path, net = shipped
    assert net.model_name == "ivim"
    np.testing.assert_array_equal(net.protocol, EPSTEIN_BVALUES)
    assert net.train_spec_["snr"] == 30 and net.train_spec_["noise"] == "rician"
    assert net.metrics_["heldout"]["spec"]["snr"] == 30


def test_heldout_metrics_reproduce_on_the_same_data(shipped):
    name, path, net = shipped
    recorded = net.metrics_["heldout"]
    data = DatasetSpec.from_dict(recorded["spec"]).generate()
    assert data.fingerprint == recorded["fingerprint"]
    # recorded on the simulated signals as they are (the training scale), not rescaled
    metrics = heldout_metrics(net.predict(data.signals, signal_scale=1.0), data)
    for param, value in recorded["rmse"].items():
        assert metrics["rmse"][param] == pytest.approx(value, rel=SAME_DATA_RTOL), param


def test_heldout_metrics_hold_on_freshly_simulated_data(shipped):
    name, path, net = shipped
    recorded = net.metrics_["heldout"]
    spec = DatasetSpec.from_dict(recorded["spec"]).replace(seed=recorded["spec"]["seed"] + 17, n=5000)
    data = spec.generate()
    metrics = heldout_metrics(net.predict(data.signals), data)
    for param in ("f", "D", "Dstar"):
        assert metrics["rmse"][param] == pytest.approx(recorded["rmse"][param], rel=FRESH_DATA_RTOL), param
