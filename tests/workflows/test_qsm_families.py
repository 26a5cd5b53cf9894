"""The QSM family study: runs by name, its datasets differ in the family only, its primary
comparison is powered by the pilot."""

import copy
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from qmri_labels.analysis.power import paired_t_power
from qmri_labels import paths
from qmri_labels.cli import study
from qmri_labels.data.qsm.phantom_set import FAMILIES
from qmri_labels.estimators import QSMEstimator
from qmri_labels.fitting.qsm_inversion import tv
from qmri_labels.workflows.qsm import families
from qmri_labels.workflows.registry import get_workflow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("families") / "tiny"
    assert study.main(["--config", "tiny_qsm_families", "--out", str(out), "--quiet"]) == 0
    return out


def _tiny_config():
    config = yaml.safe_load((paths.studies_dir() / "tiny_qsm_families.yaml").read_text())
    return get_workflow("qsm_families").check(get_workflow("qsm_families").merge(config))


def test_study_runs_by_name_and_writes_its_tables(tiny_run):
    for name in ("results.csv", "per_head.csv", "pilot.csv", "comparisons.csv", "cross_family.csv", "power.json",
                 "report.md", "manifest.json"):
        assert (tiny_run / name).is_file(), name
    per_head = pd.read_csv(tiny_run / "per_head.csv")
    power = json.loads((tiny_run / "power.json").read_text())
    counts = per_head[per_head["method"] == "tv"].groupby("family").size().to_dict()
    # the primary family has the pilot-powered count (clipped to 3..4), the others n_test_cross
    assert counts == {"anatomical": power["n_test"], "random_shapes": 2, "ellipsoids": 2}
    assert 3 <= power["n_test"] <= 4
    assert set(per_head["method"]) == {"tkd", "tikhonov", "tv", "net-anatomical", "net-random_shapes"}
    assert np.isfinite(per_head[["nrmse", "xsim"]].to_numpy()).all()
    # region scores exist only where heads carry labels
    assert per_head.loc[per_head["family"] == "anatomical", "nrmse_dgm"].notna().all()
    assert per_head.loc[per_head["family"] != "anatomical", "nrmse_dgm"].isna().all()
    comp = pd.read_csv(tiny_run / "comparisons.csv")
    prim = comp[comp["role"] == "primary"].iloc[0]
    assert (prim["network"], prim["baseline"], prim["metric"], prim["family"]) == ("net-anatomical", "tv", "nrmse",
                                                                                   "anatomical")
    assert prim["n"] == power["n_test"]
    # 2 networks x 3 baselines x 2 metrics x 3 families, less the primary
    assert (comp["role"] == "secondary").sum() == 35
    cross = pd.read_csv(tiny_run / "cross_family.csv")
    assert len(cross) == 6 and cross["seen"].sum() == 2
    ok = (cross["nrmse"] < cross["tikhonov_nrmse"]) & (cross["nrmse"] <= 1.5 * cross["tv_nrmse"])
    assert (cross["target_holds"] == ok).all()
    assert "## Primary comparison" in (tiny_run / "report.md").read_text()


def test_power_follows_the_pilot(tiny_run):
    power = json.loads((tiny_run / "power.json").read_text())
    pilot = pd.read_csv(tiny_run / "pilot.csv")
    assert set(pilot["method"]) == {"net-anatomical", "tv"} and (pilot["split"] == "pilot").all()
    a = pilot[pilot["method"] == "net-anatomical"].sort_values("head")["nrmse"].to_numpy()
    b = pilot[pilot["method"] == "tv"].sort_values("head")["nrmse"].to_numpy()
    d = a - b
    if d.std(ddof=1) > 0:
        assert power["pilot_cohen_dz"] == pytest.approx(d.mean() / d.std(ddof=1), rel=1e-6)
        assert power["power_at_n_test"] == pytest.approx(paired_t_power(power["pilot_cohen_dz"], power["n_test"]))
    # the pilot heads are not held-out heads
    man = json.loads((tiny_run / "manifest.json").read_text())
    assert man["fingerprints"]["pilot-anatomical"] != man["fingerprints"]["test-anatomical"]


def test_cross_family_datasets_differ_in_the_family_only():
    config = _tiny_config()
    for split in ("train", "val", "test", "pilot"):
        specs = {f: families.family_spec(config, f, split) for f in FAMILIES}
        for f, spec in specs.items():
            assert spec.family == f
            for g, other in specs.items():
                assert families.spec_differences(spec, other) == ([] if f == g else ["family"])
    # and the heads do differ
    a = families.family_spec(config, "anatomical", "val").generate()
    r = families.family_spec(config, "random_shapes", "val").generate()
    assert not np.array_equal(a.chi, r.chi)
    # splits differ in their seed (and count) only
    assert set(families.spec_differences(families.family_spec(config, "anatomical", "train"),
                                         families.family_spec(config, "anatomical", "test"))) <= {"seed", "n"}


def test_networks_differ_in_their_training_family_only(tiny_run):
    nets = {f: QSMEstimator.load(tiny_run / "networks" / families.network_name(f))
            for f in ("anatomical", "random_shapes")}
    a, r = (nets[f].train_spec_ for f in ("anatomical", "random_shapes"))
    assert a["family"] == "anatomical" and r.get("family", "random_shapes") == "random_shapes"
    diff = {k for k in set(a) | set(r) if a.get(k) != r.get(k)} - {"family", "calcification", "haemorrhage"}
    assert not diff
    pa, pr = nets["anatomical"].get_params(), nets["random_shapes"].get_params()
    assert {k for k in pa if pa[k] != pr[k] and k not in ("tv_lambda", "checkpoint_path")} == set()


def test_a_given_tv_channel_gives_the_same_chi(tiny_run):
    net = QSMEstimator.load(tiny_run / "networks" / "net-anatomical")
    data = families.family_spec(_tiny_config(), "anatomical", "test", n=2).generate()
    channel = tv(data.field, data.mask, data.voxel_size, data.orientations[0], lam=float(net.tv_lambda))
    own = net.predict(data.field, data.mask)
    given = net.predict(data.field, data.mask, tv_input=channel)
    np.testing.assert_allclose(given, own, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="tv_input shape"):
        net.predict(data.field, data.mask, tv_input=channel[0])
    without_tv = copy.copy(net)
    without_tv.inputs = ("field", "tkd")
    with pytest.raises(ValueError, match="tv_input is for a network with a 'tv' input channel"):
        without_tv.predict(data.field, data.mask, tv_input=channel)


def test_config_errors_are_named():
    wf = get_workflow("qsm_families")
    with pytest.raises(ValueError, match="primary.network"):
        wf.check(wf.merge({"primary": {"network": "net-ellipsoids", "baseline": "tv", "metric": "nrmse",
                                       "family": "anatomical"}}))
    with pytest.raises(ValueError, match="phantom.family"):
        wf.check(wf.merge({"phantom": {"family": "anatomical"}}))
    with pytest.raises(ValueError, match="train_families"):
        wf.check(wf.merge({"train_families": ["heads"]}))
