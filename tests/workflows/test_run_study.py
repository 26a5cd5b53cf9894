"""run_study: a study from Python, for a model defined outside the package (a notebook's class,
or a configuration naming an importable class), and the model defaults a study takes by name."""

import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml

from qmri_labels import run_study
from qmri_labels.physics import Parameter, SignalModel, get_model
from qmri_labels.workflows.run import parse_protocol, prepare_study

TINY = dict(alpha=[], n_train=600, n_test=100, batch_size=128, max_epochs=2, patience=0, mle={"n_starts": 1},
            grid={"points_per_axis": 2, "repeats": 4}, figures=False, workers=1)


class StretchedExp(SignalModel):
    """S0 * exp(-(b D)^alpha), as a notebook would write it (not registered)."""

    name = "stretched_exp_test"
    parameters = (Parameter("S0", "a.u.", 0.0, 2.0), Parameter("D", "mm^2/s", 0.0, 5e-3),
                  Parameter("alpha", "1", 0.3, 1.0))
    scale_index = 0

    def forward(self, params, protocol):
        s0, d, alpha = params[..., 0:1], params[..., 1:2], params[..., 2:3]
        return s0 * torch.exp(-(protocol * d).clamp_min(1e-12) ** alpha)


PRIOR = {"S0": (0.8, 1.2), "D": (0.5e-3, 2.5e-3), "alpha": (0.5, 1.0)}
PROTOCOL = [0, 50, 100, 200, 400, 800, 1500]


def test_run_study_with_a_model_defined_outside_the_package(tmp_path):
    model = StretchedExp()
    result = run_study(model=model, protocol=PROTOCOL, prior=PRIOR, labels=["gt", "mle", "self"],
                       out=tmp_path / "run", **TINY)
    summary = result.summary
    assert set(summary["method"]) == {"fit-mle", "net-gt", "net-mle", "net-self"}
    assert set(summary["parameter"]) == {"S0", "D", "alpha"}
    assert np.isfinite(summary.loc[summary["parameter"] == "alpha", "rmse"]).all()
    # the instance itself reached the study (not a fresh one of a registered class)
    assert get_model("stretched_exp_test") is model
    recorded = result.manifest["model"]
    assert recorded["class"].endswith(":StretchedExp") and recorded["parameters"] == ["S0", "D", "alpha"]
    assert result.manifest["data"]["train"]["spec"]["protocol"] == [float(b) for b in PROTOCOL]
    assert "alpha" in result.report and "stretched_exp_test" in result.report
    assert result.network("net-self").predict(np.ones((3, len(PROTOCOL)), np.float32)).shape == (3, 3)


def test_a_config_names_an_importable_model_class(tmp_path, monkeypatch):
    package = tmp_path / "mymodels"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "decays.py").write_text(textwrap.dedent('''
        import torch
        from qmri_labels.physics import Parameter, SignalModel

        class ScaledDecay(SignalModel):
            name = "scaled_decay_test"
            parameters = (Parameter("S0", "a.u.", 0.0, 2.0), Parameter("R", "1/ms", 0.0, 0.2))
            scale_index = 0
            protocol_name = "echo_times"
            protocol_unit = "ms"

            def __init__(self, offset=0.0):
                self.offset = offset

            @property
            def config(self):
                return {"name": self.name, "offset": self.offset}

            def forward(self, params, protocol):
                return params[..., 0:1] * torch.exp(-params[..., 1:2] * (protocol + self.offset))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = {"kind": "ivim_labels", "model": {"class": "mymodels.decays:ScaledDecay", "offset": 1.0},
              "protocol": [5, 10, 20, 40, 80], "prior": {"S0": [0.8, 1.2], "R": [0.01, 0.1]},
              "labels": ["gt", "self"], **TINY}
    result = run_study(config, out=tmp_path / "run")
    assert result.manifest["model"]["class"] == "mymodels.decays:ScaledDecay"
    assert result.manifest["model"]["config"]["offset"] == 1.0
    # config.yaml names the class, so that the study can be run again from it
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["class"] == \
        "mymodels.decays:ScaledDecay"
    assert set(result.summary["method"]) == {"fit-mle", "net-gt", "net-self"}
    with pytest.raises(ValueError, match="takes its protocol .* in ms, not s/mm\\^2"):
        run_study({**config, "protocol": {"values": [5, 10, 20], "unit": "s/mm^2"}}, out=tmp_path / "bad")
    sys.modules.pop("mymodels.decays", None)
    sys.modules.pop("mymodels", None)


def test_a_model_name_of_the_package_cannot_be_taken_over():
    class Impostor(StretchedExp):
        name = "ivim"

    with pytest.raises(ValueError, match="taken by the registered model"):
        run_study(model=Impostor(), protocol=PROTOCOL, prior=PRIOR, **TINY)


@pytest.mark.parametrize("model", ["t2", "fatwater"])
def test_a_model_by_name_takes_its_own_defaults(model):
    study = prepare_study(model=model)
    signal_model = get_model(model)
    assert study.config["model"] == model
    assert study.config["bvalues"] == list(signal_model.default_protocol)
    assert study.config["snr"] == (signal_model.default_snr or 30.0)
    assert set(study.config["prior"]["ranges"]) == set(signal_model.param_names)
    # the report is titled for the model studied, not for IVIM
    assert study.config["title"] == f"Training labels for the {model} model: gt, mle, self and hybrid"
    assert "IVIM" in prepare_study(model="ivim").config["title"]
    assert prepare_study(model=model, overrides=[("title", "mine", "--set title")]).config["title"] == "mine"


class SizedStretchedExp(StretchedExp):
    """The notebook model with study sizes of its own."""

    name = "stretched_exp_sized_test"
    default_study_sizes = {"n_train": 1234, "max_epochs": 7, "grid": {"points_per_axis": 3, "repeats": 11}}


def test_a_model_brings_its_study_sizes_and_given_entries_keep_theirs():
    sizes = SizedStretchedExp.default_study_sizes
    study = prepare_study(model=SizedStretchedExp(), overrides=[("prior", PRIOR, "prior="), ("protocol", PROTOCOL, "p=")])
    assert study.config["n_train"] == sizes["n_train"] and study.config["max_epochs"] == sizes["max_epochs"]
    assert study.config["grid"]["points_per_axis"] == 3 and study.config["grid"]["repeats"] == 11
    given = prepare_study(model=SizedStretchedExp(), overrides=[("prior", PRIOR, "prior="), ("protocol", PROTOCOL, "p="), ("n_train", 99, "n="),
                                                                ("grid.repeats", 5, "r=")])
    assert given.config["n_train"] == 99 and given.config["max_epochs"] == sizes["max_epochs"]
    assert given.config["grid"]["repeats"] == 5 and given.config["grid"]["points_per_axis"] == 3
    assert sizes["grid"] == {"points_per_axis": 3, "repeats": 11}  # the class's entry is not written into


@pytest.mark.parametrize("model", ["t2", "fatwater"])
def test_shipped_models_study_sizes_are_taken_and_ivims_default_study_is_not_touched(model):
    from qmri_labels.workflows.run import load_config

    sizes = get_model(model).default_study_sizes
    assert sizes, f"{model} has no study sizes of its own"
    config = prepare_study(model=model).config
    for key, value in sizes.items():
        if isinstance(value, dict):
            assert {k: config[key][k] for k in value} == value
        else:
            assert config[key] == value
    assert not get_model("ivim").default_study_sizes
    ivim, named = prepare_study(model="ivim").config, load_config("default")[0]
    assert all(ivim[key] == named[key] for key in ("n_train", "max_epochs", "n_test"))
    assert {k: ivim["grid"][k] for k in named["grid"]} == named["grid"]


def test_protocol_units_are_checked():
    assert parse_protocol([10, 20, "ms"], "t2") == [10.0, 20.0]
    assert parse_protocol({"values": [0, 500], "unit": "s/mm2"}, "ivim") == [0.0, 500.0]
    with pytest.raises(ValueError, match="model 't2' takes its protocol \\(echo_times\\) in ms, not s"):
        parse_protocol([0.01, 0.02, "s"], "t2")
    with pytest.raises(ValueError, match="in s/mm\\^2, not ms/um\\^2"):
        parse_protocol([0, 0.5, 1.0, "ms/um^2"], "ivim")


def _cli_args(*argv):
    from qmri_labels.cli import study

    return study.build_parser().parse_args(list(argv))


@pytest.mark.parametrize("model", ["t2", "fatwater"])
def test_the_model_flag_runs_a_model_with_its_defaults(model, tmp_path):
    from qmri_labels.cli import study

    kind, config, _, name = study.resolve(_cli_args("--model", model))
    signal_model = get_model(model)
    assert kind == "ivim_labels" and name == f"{model}_labels"
    assert config["bvalues"] == list(signal_model.default_protocol)
    assert config["snr"] == (signal_model.default_snr or 30.0)
    argv = ["--model", model, "--labels", "gt", "mle", "--set", "alpha=[]", "--out", str(tmp_path / model), "--quiet",
            "--set", "n_train=400", "--set", "n_test=200", "--set", "max_epochs=1", "--set", "figures=false",
            "--set", "grid={points_per_axis: 2, repeats: 2}", "--set", "mle.n_starts=2", "--workers", "1"]
    assert study.main(argv) == 0
    written = yaml.safe_load((tmp_path / model / "config.yaml").read_text())
    assert written["model"] == model and written["labels"] == ["gt", "mle"]
    report = (tmp_path / model / "report.md").read_text()
    assert "Label ranking against IVIM's" in report
    if model == "fatwater":
        rates = (tmp_path / model / "swap_rates.csv").read_text()
        assert "net-gt" in rates and "fit-mle" in rates and "## Fat/water swaps" in report


def test_the_protocol_flag_refuses_another_unit():
    from qmri_labels.cli import study

    with pytest.raises(ValueError, match="takes its protocol \\(echo_times\\) in ms, not s/mm\\^2"):
        study.resolve(_cli_args("--model", "t2", "--protocol", "0", "100", "500", "s/mm^2"))
    with pytest.raises(ValueError, match="--bvalues is for diffusion models"):
        study.resolve(_cli_args("--model", "t2", "--bvalues", "10", "20"))
    _, config, _, _ = study.resolve(_cli_args("--model", "t2", "--protocol", "10", "20", "40", "ms"))
    assert config["bvalues"] == [10.0, 20.0, 40.0]
    help_text = " ".join(study.build_parser().format_help().split())
    for name in ("ivim", "monoexp", "t2", "t2star", "fatwater", "fatwater_1.5t", "echo times in ms"):
        assert name in help_text
