"""Named common datasets: definitions, deterministic building, the fingerprint cache, and the
refusal to compare results on different test data."""

import warnings

import numpy as np
import pytest

from qmri_labels.data import registry
from qmri_labels.data.comparability import IncomparableResultsError, check_comparable, data_record
from qmri_labels.data.definitions import get_definition, list_datasets
from qmri_labels.data.registry import load_dataset


def test_named_definitions_resolve_with_inheritance():
    names = list_datasets()
    for name in ("ivim_epstein_snr15", "ivim_epstein_snr30", "qsm_synthetic_1mm", "qsm_synthetic_1x1x3mm"):
        assert name in names
    snr15, snr30 = get_definition("ivim_epstein_snr15"), get_definition("ivim_epstein_snr30")
    assert snr15.splits["train"]["snr"] == 15.0 and snr30.splits["train"]["snr"] == 30.0
    assert snr15.splits["test"]["protocol"] == snr30.splits["test"]["protocol"]
    assert len(snr15.splits["test"]["protocol"]) == 10
    assert snr15.splits["train"]["seed"] != snr15.splits["test"]["seed"]
    # the two QSM resolutions draw the same phantoms: same seeds, different voxel size
    hi, lo = get_definition("qsm_synthetic_1mm"), get_definition("qsm_synthetic_1x1x3mm")
    assert hi.splits["test"]["seed"] == lo.splits["test"]["seed"]
    assert lo.splits["test"]["truncate_to"] == [1.0, 1.0, 3.0] and hi.splits["test"]["truncate_to"] is None
    # a split set to null in a derived definition drops the inherited one
    assert "validation" in hi.splits and "validation" not in get_definition("tiny_qsm_1mm").splits
    tissue = get_definition("ivim_tissue_prior_snr30")
    assert tissue.splits["train"]["prior"]["kind"] == "tissue_mixture"


def test_load_is_deterministic_and_cached(fresh_cache):
    train = load_dataset("tiny_ivim_snr30", "train")
    assert len(train) == 1024 and train.spec.snr == 30.0
    files = list((fresh_cache / "datasets").glob("tiny_ivim_snr30-train-*.npz"))
    assert len(files) == 1
    fresh = load_dataset("tiny_ivim_snr30", "train", cache=False)
    assert fresh.fingerprint == train.fingerprint
    np.testing.assert_array_equal(fresh.signals, train.signals)
    again = load_dataset("tiny_ivim_snr30", "train")
    assert again.fingerprint == train.fingerprint
    test = load_dataset("tiny_ivim_snr30", "test")
    assert test.fingerprint != train.fingerprint and len(test) == 256


def test_overrides_make_a_different_dataset():
    small = load_dataset("tiny_ivim_snr30", "train", n=100)
    full = load_dataset("tiny_ivim_snr30", "train")
    assert len(small) == 100 and small.fingerprint != full.fingerprint
    assert registry.cache_path("tiny_ivim_snr30", "train", n=100) != registry.cache_path("tiny_ivim_snr30", "train")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_cache_file_is_detected_and_rebuilt(damage, fresh_cache):
    good = load_dataset("tiny_ivim_snr15", "test")
    path = registry.cache_path("tiny_ivim_snr15", "test")
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    else:
        # flip one byte inside the signals array (npz stores arrays uncompressed)
        payload = good.signals.tobytes()
        at = bytes(raw).find(payload[:64])
        assert at > 0
        raw[at + 10] ^= 0xFF
        path.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        rebuilt = load_dataset("tiny_ivim_snr15", "test")
    assert rebuilt.fingerprint == good.fingerprint
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_dataset("tiny_ivim_snr15", "test").fingerprint == good.fingerprint


def test_bad_definitions_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*ivim_epstein_snr30"):
        get_definition("nope")
    with pytest.raises(ValueError, match="no split 'holdout'"):
        get_definition("tiny_ivim_snr30").spec("holdout")
    base = {"name": "x", "spec": {"snr": 20}, "splits": {"train": {"n": 10, "seed": 1}, "test": {"n": 10, "seed": 1}}}
    with pytest.raises(ValueError, match="share a seed"):
        get_definition(base)
    with pytest.raises(ValueError, match="missing splits"):
        get_definition({"name": "x", "splits": {"train": {"n": 10, "seed": 1}}})
    with pytest.raises(ValueError, match="unknown dataset fields.*snrr"):
        get_definition({"name": "x", "spec": {"snrr": 3}, "splits": {"train": {"seed": 1}, "test": {"seed": 2}}})
    with pytest.raises(ValueError, match="snr must be finite"):
        get_definition({"name": "x", "spec": {"snr": -1}, "splits": {"train": {"seed": 1}, "test": {"seed": 2}}})
    (tmp_path / "a.yaml").write_text("name: a\nbase: b\nsplits: {train: {seed: 1}, test: {seed: 2}}\n")
    (tmp_path / "b.yaml").write_text("name: b\nbase: a\nsplits: {train: {seed: 1}, test: {seed: 2}}\n")
    with pytest.raises(ValueError, match="circular"):
        get_definition("a", directory=tmp_path)


def test_inline_definition_loads():
    inline = {"name": "inline_mono", "spec": {"model": "monoexp", "protocol": [0, 500, 1000], "snr": 50},
              "splits": {"train": {"n": 20, "seed": 5}, "test": {"n": 10, "seed": 6}}}
    data = load_dataset(inline, "test")
    assert data.signals.shape == (10, 3) and data.param_names == ("S0", "D")


def test_comparability_check_refuses_or_flags_different_test_data():
    a = load_dataset("tiny_ivim_snr30", "test")
    b = load_dataset("tiny_ivim_snr15", "test")
    train = load_dataset("tiny_ivim_snr30", "train", n=50)
    ok = check_comparable({"net-gt": {"data_fingerprints": data_record(train=train, test=a)},
                           "net-mle": {"test_fingerprint": a.fingerprint}, "fit": a})
    assert ok and ok.comparable
    mixed = {"net-gt": {"data_fingerprints": {"test": a.fingerprint}}, "net-mle": {"test_fingerprint": b.fingerprint}}
    with pytest.raises(IncomparableResultsError, match="refusing to compare.*net-gt.*net-mle"):
        check_comparable(mixed)
    assert issubclass(IncomparableResultsError, ValueError)
    with pytest.warns(RuntimeWarning, match="NOT COMPARABLE"):
        flagged = check_comparable(mixed, strict=False)
    assert not flagged and "NOT COMPARABLE" in flagged.message
    with pytest.raises(ValueError, match="no test-data fingerprint"):
        check_comparable({"a": {"rmse": 1.0}, "b": a})


def test_qsm_resolutions_share_phantoms():
    from qmri_labels.physics.qsm import change_resolution, forward_field

    hi = load_dataset("tiny_qsm_1mm", "test")
    lo = load_dataset("tiny_qsm_1x1x3mm", "test")
    assert hi.chi.shape == (1, 12, 12, 12) and lo.chi.shape == (1, 12, 12, 4)
    assert hi.fields.shape == (1, 1, 12, 12, 12) and lo.voxel_size == (1.0, 1.0, 3.0)
    assert hi.fingerprint != lo.fingerprint
    assert np.abs(hi.chi).max() > 0 and np.abs(lo.field).max() > 0
    # the same objects: the truncated 1 mm phantom is the 3 mm one inside its mask
    coarse = change_resolution(hi.chi.astype(np.float64), (1, 1, 1), (1, 1, 3)) * lo.mask
    np.testing.assert_allclose(coarse, lo.chi, atol=1e-6)
    # without noise, the truncated field is close to the dipole field of the 3 mm chi at 3 mm
    # voxels (masking the fine local field before truncation is the only difference, which
    # matters less as the brain grows: relative error 0.34 at 24^3, 0.14 at 48^3)
    clean = load_dataset({"name": "clean", "base": "tiny_qsm_1x1x3mm", "spec": {"noise_sigma": 0.0,
                                                                              "shape": [48, 48, 48]}}, "test")
    expected = forward_field(clean.chi[0].astype(np.float64), (1, 1, 3), pad=4) * clean.mask[0]
    inside = clean.mask[0]
    err = np.linalg.norm((clean.field[0] - expected)[inside]) / np.linalg.norm(expected[inside])
    assert err < 0.2
    assert load_dataset("tiny_qsm_1x1x3mm", "test").fingerprint == lo.fingerprint
    with pytest.raises(ValueError, match="not divisible"):
        get_definition({"name": "q", "kind": "qsm", "spec": {"shape": [8, 8, 8], "truncate_to": [1, 1, 3]},
                        "splits": {"train": {"seed": 1}, "test": {"seed": 2}}})
    with pytest.raises(ValueError, match="unknown QSMPhantomSpec fields"):
        get_definition({"name": "q", "kind": "qsm", "spec": {"shap": [8, 8, 8]},
                        "splits": {"train": {"seed": 1}, "test": {"seed": 2}}})


def test_cli_list_show_build(capsys):
    assert registry.main(["list"]) == 0
    assert "ivim_epstein_snr30" in capsys.readouterr().out
    assert registry.main(["build", "tiny_ivim_snr30", "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert load_dataset("tiny_ivim_snr30", "test").fingerprint in out
    assert registry.main(["show", "tiny_ivim_snr30"]) == 0
    assert "built: true" in capsys.readouterr().out
    assert registry.main(["show", "no_such_dataset"]) == 2
