"""QSM label choices, training (qmri_labels.training.qsm) and the estimator (qmri_labels.estimators.qsm)."""

import json

import numpy as np
import pytest
import torch

from qmri_labels.data.qsm import QSMPhantomSpec
from qmri_labels.estimators import QSMEstimator
from qmri_labels.physics.qsm import forward_field
from qmri_labels.training.qsm import (
    EpochSampler,
    QSMLoss,
    QSMNormalisation,
    QSMPatchDataset,
    pad_to_multiple,
    qsm_loss_weights,
)


@pytest.fixture(scope="module")
def data():
    spec = QSMPhantomSpec(shape=(16, 16, 16), n=2, n_orientations=3, noise_sigma=0.002, seed=7)
    return spec.generate(), spec.replace(n=1, seed=8).generate()


def _tiny(**kw):
    params = dict(preset="toy", patch_size=8, samples_per_epoch=2, batch_size=2, max_epochs=2, seed=0, device="cpu")
    params.update(kw)
    return QSMEstimator(**params)


def test_loss_weights():
    assert qsm_loss_weights("gt") == {"gt": 1.0, "mle": 0.0, "self": 0.0}
    assert qsm_loss_weights("hybrid", alpha=0.25) == {"gt": 0.75, "mle": 0.25, "self": 0.0}
    assert qsm_loss_weights("graf") == {"gt": 1.0, "mle": 0.0, "self": 1.0}
    assert qsm_loss_weights("graf", field_weight=0.5)["self"] == 0.5
    with pytest.raises(ValueError, match="label"):
        qsm_loss_weights("cosmos")
    with pytest.raises(ValueError, match="alpha"):
        qsm_loss_weights("hybrid")


def test_loss_terms_zero_at_truth(data):
    train, _ = data
    norm = QSMNormalisation(0.05, 0.1)
    chi = torch.as_tensor(train.chi)
    batch = {"mask": torch.as_tensor(train.mask), "chi": chi, "mle": chi,
             "field": torch.as_tensor(forward_field(train.chi))}
    loss = QSMLoss({"gt": 1.0, "mle": 1.0, "self": 1.0}, norm)
    total, terms = loss(chi, batch)
    assert float(total) < 1e-8 and set(terms) == {"gt", "mle", "self"}
    total, terms = loss(chi + 0.1, batch)  # a constant offset is invisible to the field term
    assert float(terms["gt"]) == pytest.approx(1.0, rel=1e-4) and float(terms["self"]) < 1e-6
    shifted = torch.roll(chi, 1, dims=-1)
    _, terms = loss(shifted, batch)
    assert float(terms["self"]) > 1e-3


def test_patch_dataset_reproducible():
    arrays = {"inputs": np.random.default_rng(0).normal(size=(2, 1, 12, 12, 12)).astype(np.float32),
              "mask": np.ones((2, 12, 12, 12), np.float32)}
    a = QSMPatchDataset(arrays, 8, 5, seed=3)
    b = QSMPatchDataset(arrays, 8, 5, seed=3)
    assert len(a) == 5 and a[0]["inputs"].shape == (1, 8, 8, 8)
    assert all(torch.equal(a[i]["inputs"], b[i]["inputs"]) for i in range(5))
    vol, (x, y, z) = a.locate(2)
    assert torch.equal(a[2]["mask"], torch.as_tensor(arrays["mask"][vol, x:x + 8, y:y + 8, z:z + 8]))
    sampler = EpochSampler(a)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert first == [0, 1, 2, 3, 4] and second == [5, 6, 7, 8, 9]
    assert len({a.locate(j) for j in first + second}) > 5  # new patches in every epoch
    whole = QSMPatchDataset(arrays, None, 5)
    assert len(whole) == 2 and whole[0]["mask"].shape == (12, 12, 12)
    assert sorted(EpochSampler(whole)) == [0, 1]
    with pytest.raises(ValueError, match="patch_size"):
        QSMPatchDataset(arrays, 16, 1)


def test_pad_to_multiple():
    x = np.ones((2, 5, 8, 9))
    p, crop = pad_to_multiple(x, 4)
    assert p.shape == (2, 8, 8, 12)
    np.testing.assert_array_equal(p[(..., *crop)], x)


@pytest.mark.parametrize("label", ["gt", "mle", "self", "hybrid", "graf"])
def test_every_label_trains(data, label):
    train, val = data
    est = _tiny(label=label, alpha=0.5).fit(train, validation=val)
    assert len(est.history_) == 2
    assert all(np.isfinite(r["val_loss"]) and np.isfinite(r["train_loss"]) for r in est.history_)
    # the kept epoch is the one with the lowest validation loss (two distinct losses: a real choice)
    val_losses = [r["val_loss"] for r in est.history_]
    assert val_losses[0] != val_losses[1] and est.best_epoch_ == int(np.argmin(val_losses))
    assert "val_nrmse" in est.history_[0]
    chi = est.predict(val.field[0], val.mask[0])
    assert chi.shape == (16, 16, 16) and chi.dtype == np.float32 and np.all(chi[~val.mask[0]] == 0)


def test_mle_label_needs_orientations():
    single = QSMPhantomSpec(shape=(16, 16, 16), n=1, n_orientations=1).generate()
    with pytest.raises(ValueError, match="n_orientations"):
        _tiny(label="mle").fit(single)


def test_fit_is_seeded_and_learns(data):
    train, val = data
    a = _tiny(label="gt", max_epochs=1).fit(train, validation=val)
    b = _tiny(label="gt", max_epochs=1).fit(train, validation=val)
    np.testing.assert_array_equal(a.predict(val.field[0]), b.predict(val.field[0]))
    # a few more steps on whole volumes lower the training loss
    c = _tiny(label="gt", patch_size=None, max_epochs=6, lr=3e-3, residual=False, inputs=("field",)).fit(train)
    losses = [r["train_loss"] for r in c.history_]
    assert min(losses[3:]) < losses[0]


def test_predict_patches_and_save_load(data, tmp_path):
    train, val = data
    est = _tiny(label="gt", unet={"levels": 2, "init_channels": 2}).fit(train)
    whole = est.predict(val.field[0])
    patched = est.predict(val.field[0], patch_size=8, overlap=4)
    assert patched.shape == whole.shape
    # BatchNorm in eval mode and zero padding: patches and the whole volume agree in the centre
    assert np.corrcoef(whole.ravel(), patched.ravel())[0, 1] > 0.9
    batch = est.predict(val.field)
    np.testing.assert_allclose(batch[0], whole, atol=1e-6)
    path = est.save(tmp_path / "net", extra={"note": "test"})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["kind"] == "qmri_labels.QSMEstimator" and manifest["train_fingerprint"] == train.fingerprint
    assert manifest["network"]["levels"] == 2 and manifest["params"]["label"] == "gt"
    assert manifest["normalisation"]["chi_scale"] > 0 and manifest["note"] == "test"
    back = QSMEstimator.load(path)
    np.testing.assert_array_equal(back.predict(val.field[0]), whole)
    # a tampered weights file is refused
    wfile = next(p for p in path.iterdir() if p.name.startswith("weights"))
    raw = bytearray(wfile.read_bytes())
    raw[-1] ^= 0xFF
    wfile.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="SHA-256|bytes"):
        QSMEstimator.load(path)


def test_estimator_bad_input(data):
    train, _ = data
    with pytest.raises(ValueError, match="inputs"):
        _tiny(inputs=("phase",)).fit(train)
    with pytest.raises(ValueError, match="QSMPhantomSet"):
        _tiny().fit(np.zeros((2, 8, 8, 8)))
    with pytest.raises(ValueError, match="not fitted"):
        _tiny().predict(np.zeros((8, 8, 8)))
    est = _tiny().fit(train)
    with pytest.raises(ValueError, match="field"):
        est.predict(np.zeros((8, 8)))
    with pytest.raises(ValueError, match="multiple"):
        _tiny(patch_size=7).fit(train)


def test_warm_start_continues_from_fitted_weights(data):
    train, _ = data
    est = _tiny(label="gt", max_epochs=1).fit(train)
    before = {k: v.clone() for k, v in est.network_.state_dict().items()}
    norm = est.normalisation_
    est.warm_start = True
    est.max_epochs = 1
    est.fit(train)
    assert est.normalisation_ == norm
    after = est.network_.state_dict()
    changed = [k for k in before if before[k].dtype.is_floating_point and not torch.equal(before[k], after[k])]
    assert changed  # it trained further, starting from the fitted weights
    fresh = _tiny(label="gt", max_epochs=1).fit(train)
    assert not torch.equal(fresh.network_.head.weight, after["head.weight"])


def test_label_study_runs_by_name(tmp_path):
    import yaml

    from qmri_labels.cli.study import main

    out = tmp_path / "run"
    assert main(["--config", "tiny_qsm", "--out", str(out), "--quiet"]) == 0
    import pandas as pd

    table = pd.read_csv(out / "results.csv")
    assert {"tkd", "tikhonov", "tv", "cosmos", "net-gt", "net-mle", "net-self", "net-hybrid-0.5",
            "net-graf"} <= set(table.method)
    assert table[["nrmse", "xsim", "hfen", "ssim"]].notna().all().all()
    assert "input: masked local fields" in (out / "report.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["fingerprints"]) == {"train", "val", "test"}
    assert yaml.safe_load((out / "config.yaml").read_text())["kind"] == "qsm_labels"
    assert (out / "slices.png").stat().st_size > 0 and (out / "report.md").is_file()


def test_activation_study_tiny(tmp_path):
    from qmri_labels.cli.study import load_config
    from qmri_labels.workflows.qsm.activation import run

    config, _ = load_config("qsm_activation")
    assert config["kind"] == "qsm_activation" and config["channels"] == [16, 32]
    config.update(phantom={"shape": [16, 16, 16]}, n_train=2, n_val=1, n_test=1, channels=[2, 4],
                  activations=[["relu", 0.0], ["elu", 0.0]], example_slices=1, tikhonov_lambdas=[0.01])
    config["training"].update(unet={"levels": 2}, max_epochs=2)
    result = run(config, tmp_path, quiet=True)
    methods = {r["method"] for r in result["results"]}
    assert {"relu-2", "relu-4", "elu-2", "elu-4", "tkd", "tikhonov"} <= methods
    epochs = {(h["network"], h["epoch"]) for h in result["history"]}
    assert len(epochs) == 8 and all("val_nrmse" in h and "val_loss" in h for h in result["history"])
    for name in ("convergence.png", "slices.png", "history.csv", "results.csv", "report.md", "manifest.json"):
        assert (tmp_path / name).is_file()


def test_shipped_model_is_named_for_what_it_is_and_beats_the_baselines_on_masked_fields():
    from qmri_labels.analysis.image_metrics import nrmse, xsim
    from qmri_labels.fitting.qsm_inversion import tikhonov, tkd, tv
    from qmri_labels.paths import models_dir
    from qmri_labels.workflows.qsm.model import SHIPPED_MODEL

    bundle = models_dir() / SHIPPED_MODEL
    if not (bundle / "manifest.json").is_file():
        pytest.fail(f"shipped model {bundle} is missing")
    assert not (models_dir() / "qsm_graf16").exists()  # trained on unmasked fields: superseded
    est = QSMEstimator.load(bundle, device="cpu")
    manifest = est.manifest_
    # the name says it: inputs field + TV, residual (on the TV channel), leaky ReLU, 16 channels
    assert tuple(est.inputs) == ("field", "tv") and est.residual and est.residual_channel_ == 1
    assert est.network_.config.activation == "leaky_relu" and est.network_.config.init_channels == 16
    assert manifest["input_kind"] == "local" and manifest["train_spec"]["field_kind"] == "local"
    rows = {r["method"]: r for r in manifest["heldout_metrics"]}
    for baseline in ("tkd", "tikhonov", "tv"):
        assert rows["unet"]["nrmse"] < rows[baseline]["nrmse"], baseline
        assert rows["unet"]["xsim"] > rows[baseline]["xsim"], baseline
    # the recorded numbers are real: recompute on the first recorded held-out phantom
    spec = QSMPhantomSpec.from_dict(manifest["test_spec"]).replace(n=1)
    data = spec.generate()
    chi, mask, field = data.chi[0], data.mask[0], data.field[0]
    assert np.all(field[~mask] == 0)  # a masked local field
    net = est.predict(field, mask)
    for name, baseline in (("tkd", tkd(field, mask=mask)),
                           ("tikhonov", tikhonov(field, lam=rows["tikhonov"]["lambda"], mask=mask))):
        assert nrmse(net, chi, mask) < nrmse(baseline, chi, mask), name
        assert xsim(net, chi, mask) > xsim(baseline, chi, mask), name
    # against tuned TV the margin is within the spread between heads (16 held-out phantoms: NRMSE
    # 18.6 vs 21.9 %, XSIM 0.58 vs 0.53, paired tests not significant): the manifest says "tie";
    # on this phantom TV wins both (NRMSE 11.3 vs 13.2 %, XSIM 0.568 vs 0.548)
    verdicts = {(r["input"], r["baseline"], r["metric"]): r["verdict"] for r in manifest["heldout_comparisons"]}
    assert "of 16 held-out phantoms" in manifest["heldout_input"]
    for baseline in ("tkd", "tikhonov"):
        assert verdicts[("local", baseline, "nrmse")] == verdicts[("local", baseline, "xsim")] == "network"
    assert all(r["n"] == 16 for r in manifest["heldout_comparisons"])
    chi_tv = tv(field, mask, lam=rows["tv"]["lambda"])
    assert xsim(net, chi, mask) > xsim(chi_tv, chi, mask) - 0.05
    assert nrmse(net, chi, mask) < 1.25 * nrmse(chi_tv, chi, mask)


def test_qsm_estimator_follows_the_estimator_contract():
    inputs = ["field", "tv"]
    est = QSMEstimator(unet=None, inputs=inputs, residual=1, warm_start=0)
    params = est.get_params(deep=True)
    # __init__ stores its arguments unchanged (scikit-learn's clone relies on it)
    assert params["inputs"] is inputs and params["unet"] is None and params["residual"] == 1
    assert params == est.get_params(deep=False)
    try:
        from sklearn.base import clone
    except ImportError:  # pragma: no cover - scikit-learn is optional
        clone = None
    if clone is not None:
        twin = clone(est)
        assert twin.get_params()["inputs"] == inputs and not hasattr(twin, "network_")
    assert est.set_params(tv_lambda=1e-3) is est and est.tv_lambda == 1e-3
    with pytest.raises(ValueError, match="invalid parameter 'tv_lamda'"):
        est.set_params(tv_lamda=1.0)
    with pytest.raises(ValueError, match="not fitted yet"):
        est.manifest()


def test_check_input_kind_refuses_a_mismatched_network():
    from qmri_labels.training.qsm import check_input_kind

    assert check_input_kind({"input_kind": "local"}, "local") == "local"
    with pytest.raises(ValueError, match="trained on 'local_unmasked' fields but is given 'local'"):
        check_input_kind({}, "local")  # an old bundle without the record: unmasked fields
    with pytest.raises(ValueError, match="trained on 'local' fields but is given 'bfr:vsharp'"):
        check_input_kind({"input_kind": "local"}, "bfr:vsharp")
    assert check_input_kind({"input_kind": "local"}, "bfr:vsharp", force=True) == "local"
    assert check_input_kind({"input_kind": "bfr:pdf"}, "bfr:pdf") == "bfr:pdf"
    with pytest.raises(ValueError, match="given_kind 'masked'"):
        check_input_kind({"input_kind": "local"}, "masked")
