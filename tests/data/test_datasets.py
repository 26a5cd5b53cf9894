import numpy as np
import pytest

from qmri_labels.data import Dataset, DatasetSpec, TissueMixturePrior, UniformPrior

# Recorded once; the same spec must give these bytes on any machine.
GOLDEN = {
    "uniform": "0a3cd87d61df01acd05e603c8f160b94ad8f186f72fad34468411bb7446f1765",
    "tissue": "2811aa9526043638f692e3cf53ce982a799b009c2ea08dd31e4ed398704ad987",
}


def test_same_spec_same_bytes_and_known_fingerprint():
    a = DatasetSpec(n=1000, seed=7).generate()
    b = DatasetSpec(n=1000, seed=7).generate()
    assert a.signals.tobytes() == b.signals.tobytes()
    assert a.fingerprint == b.fingerprint == GOLDEN["uniform"]
    c = DatasetSpec(n=500, seed=3, prior=TissueMixturePrior(), noise="gaussian", snr=15).generate()
    assert c.fingerprint == GOLDEN["tissue"]


def test_fingerprint_changes_with_seed_and_spec():
    base = DatasetSpec(n=100, seed=1)
    prints = {base.generate().fingerprint, base.replace(seed=2).generate().fingerprint,
              base.replace(snr=15).generate().fingerprint, base.replace(noise="gaussian").generate().fingerprint}
    assert len(prints) == 4


def test_epstein_prior_ranges():
    data = DatasetSpec(n=20000, seed=0).generate()
    s0, f, d, dstar = data.theta_true.T
    assert 0.8 <= s0.min() and s0.max() <= 1.2
    assert 0.1 <= f.min() and f.max() <= 0.5
    assert 0.4e-3 <= d.min() and d.max() <= 3.0e-3
    offset = dstar - d
    assert offset.min() >= 10e-3 - 1e-7 and offset.max() <= 150e-3 + 1e-7
    np.testing.assert_allclose(data.prior_support, [[0.8, 0.1, 0.4e-3, 10.4e-3], [1.2, 0.5, 3e-3, 153e-3]], rtol=1e-6)
    assert data.signals.dtype == np.float32 and data.theta_true.dtype == np.float32
    assert np.allclose(data.sigma, 1 / 30)


def test_tissue_mixture_prior_is_in_vivo_like():
    theta = DatasetSpec(n=5000, seed=0, prior=TissueMixturePrior()).generate().theta_true
    support = TissueMixturePrior().support
    assert np.all(theta >= support[0] - 1e-7) and np.all(theta <= support[1] + 1e-7)
    # not a box: most voxels have small f, as in tissue
    assert np.median(theta[:, 1]) < 0.15


def test_monoexp_dataset_and_prior_for_other_model():
    data = DatasetSpec(model="monoexp", prior=UniformPrior("monoexp"), n=50, seed=0).generate()
    assert data.theta_true.shape == (50, 2) and data.param_names == ("S0", "D")


def test_save_load_round_trip_and_corruption(tmp_path):
    data = DatasetSpec(n=300, seed=4).generate()
    path = data.save(tmp_path / "train.npz")
    loaded = Dataset.load(path)
    assert loaded.fingerprint == data.fingerprint and loaded.spec == data.spec
    np.testing.assert_array_equal(loaded.signals, data.signals)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "bad.npz").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="bad.npz"):
        Dataset.load(tmp_path / "bad.npz")
    (tmp_path / "short.npz").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="short.npz"):
        Dataset.load(tmp_path / "short.npz")


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="snr"):
        DatasetSpec(snr=-1)
    with pytest.raises(ValueError, match="noise"):
        DatasetSpec(noise="poisson")
    with pytest.raises(ValueError, match="bvalues"):
        DatasetSpec(protocol=(0, -10, 20))
    with pytest.raises(ValueError, match="prior is for model"):
        DatasetSpec(model="monoexp")


# --- SNR as a distribution ------------------------------------------------------------
@pytest.mark.parametrize("distribution", ["uniform", "loguniform"])
def test_snr_range_draws_one_sigma_per_voxel(distribution):
    spec = DatasetSpec(n=20000, seed=1, snr={"low": 10, "high": 100, "distribution": distribution})
    data = spec.generate()
    snr = 1.0 / data.sigma.astype(np.float64)
    assert snr.min() >= 10 - 1e-3 and snr.max() <= 100 + 1e-3
    # uniform: median near 55; log-uniform: median near sqrt(10 * 100) = 31.6
    expected = 55.0 if distribution == "uniform" else np.sqrt(1000.0)
    assert abs(np.median(snr) - expected) < 2.0
    # the noise follows each voxel's sigma: residuals at b where the signal is large scale with sigma
    clean_b0 = data.theta_true[:, 0]
    resid = data.signals[:, 0] - clean_b0
    low, high = snr < 20, snr > 80
    assert resid[low].std() > 3 * resid[high].std()
    assert DatasetSpec.from_dict(spec.to_dict()) == spec
    assert spec.generate().fingerprint == data.fingerprint
    assert spec.replace(snr=(10, 100)).generate().fingerprint != DatasetSpec(n=20000, seed=1, snr=30).generate().fingerprint


def test_snr_range_is_checked_and_has_no_single_sigma():
    assert DatasetSpec(snr=[5, 50]).snr == {"low": 5.0, "high": 50.0, "distribution": "uniform"}
    with pytest.raises(ValueError, match="per voxel"):
        DatasetSpec(snr=[5, 50]).sigma
    for bad, match in [([50, 5], "low < high"), ({"low": 5}, "low and high"), ([1, 2, 3], "low, high"),
                       ({"low": 5, "high": 50, "distribution": "normal"}, "distribution"), ("high", "snr")]:
        with pytest.raises(ValueError, match=match):
            DatasetSpec(snr=bad)


def test_fingerprint_is_that_of_the_values_whatever_their_byte_order():
    from qmri_labels.data.fingerprint import fingerprint

    data = DatasetSpec(n=50, seed=7).generate()
    arrays = (data.theta_true, data.signals, data.sigma)
    swapped = tuple(a.astype(a.dtype.newbyteorder(">")) for a in arrays)
    assert swapped[1].dtype.str == ">f4" and swapped[1].tobytes() != data.signals.tobytes()
    assert fingerprint(data.spec.canonical_json(), swapped) == data.fingerprint
    swapped_set = Dataset(data.spec, *swapped)
    assert swapped_set.fingerprint == data.fingerprint
    assert fingerprint("x", {"b": data.sigma, "a": data.signals}) == fingerprint("x", {"a": data.signals, "b": data.sigma})
    assert fingerprint("x", ()) != fingerprint("y", ())


def test_shipped_bundles_record_the_fingerprint_of_their_heldout_data():
    """The recorded fingerprints stay verifiable: the held-out spec regenerates them."""
    import json

    from qmri_labels.paths import models_dir

    manifest = json.loads((models_dir() / "ivim_epstein_snr30_gt" / "manifest.json").read_text())
    heldout = manifest["metrics"]["heldout"]
    assert DatasetSpec.from_dict(heldout["spec"]).generate().fingerprint == heldout["fingerprint"]
