"""What a user finds first: the shipped networks listed with what they were trained on, their
model cards, a shipped name accepted everywhere, --version, a quiet --quiet, progress with the
time left, and f's unit in words."""

import json
import re

import numpy as np
import pytest

import qmri_labels
from qmri_labels.cli import fit, study
from qmri_labels.estimators import NetworkEstimator, QSMEstimator, verify_bundle
from qmri_labels.estimators.shipped import MODEL_CARD, list_models, model_card
from qmri_labels.paths import models_dir
from qmri_labels.physics import display_unit
from qmri_labels.workflows.jobs import JobProgress

SHIPPED = sorted(p.name for p in models_dir().iterdir() if (p / "manifest.json").is_file())


def test_list_models_reads_every_shipped_manifest():
    models = {m["name"]: m for m in list_models()}
    assert sorted(models) == SHIPPED and len(SHIPPED) >= 5
    assert qmri_labels.list_models() == list(models.values())  # the public face has it too
    for info in models.values():
        for key in ("model", "protocol", "snr", "label", "prior", "heldout"):
            assert info[key] and "?" not in info[key], (info["name"], key, info[key])
    manifest = json.loads((models_dir() / "ivim_epstein_snr30_self" / "manifest.json").read_text())
    self_net = models["ivim_epstein_snr30_self"]
    assert f"f {manifest['metrics']['heldout']['rmse']['f']:.4g}" in self_net["heldout"]
    assert "SNR 30" in self_net["snr"] and "self-supervised" in self_net["label"]
    assert self_net["protocol"].startswith("b = 0, 10, 20, 30, 50, 80, 100, 200, 400, 800 s/mm^2")
    assert "f 0.1-0.5" in self_net["prior"] and "D* D + (0.01-0.15) mm^2/s" in self_net["prior"]
    assert "0.5 x GT + 0.5 x MLE" in models["ivim_epstein_snr30_hybrid0.5"]["label"]
    assert self_net["units"]["f"] == "fraction"
    qsm = models["qsm_unet_field-tv_residual_lrelu16"]
    assert qsm["model"].startswith("qsm") and "NRMSE 18.57 %" in qsm["heldout"] and "tkd" in qsm["heldout"]


def test_list_models_on_the_command_line_needs_no_other_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        fit.main(["--list-models"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in SHIPPED:
        assert name in out
    assert "training prior" in out and "held-out" in out and "RMSE f" in out


@pytest.mark.parametrize("main", [fit.main, study.main], ids=["qmri-fit", "qmri-study"])
def test_version_on_both_commands(main, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip().endswith(qmri_labels.__version__)


def test_a_shipped_name_loads_as_on_the_command_line():
    by_name = NetworkEstimator.load("ivim_epstein_snr30_self")
    by_path = NetworkEstimator.load(models_dir() / "ivim_epstein_snr30_self")
    signals = np.exp(-np.outer([0.5, 1.0], np.asarray(by_name.protocol) * 1e-3)).astype(np.float32)
    np.testing.assert_array_equal(by_name.predict(signals), by_path.predict(signals))
    assert QSMEstimator.load("qsm_unet_field-tv_residual_lrelu16").inputs == ("field", "tv")
    with pytest.raises(ValueError):
        NetworkEstimator.load("no_such_network")


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_bundle_has_its_card_and_still_verifies(name):
    folder = models_dir() / name
    card = (folder / MODEL_CARD).read_text(encoding="utf-8")
    # the card is exactly what its manifest gives today: regenerate with write_model_cards()
    assert card == model_card(name)
    verify_bundle(folder)  # the card beside the bundle leaves its checksum intact
    info = {m["name"]: m for m in list_models()}[name]
    assert info["heldout"] in card and info["label"] in card and f'load("{name}")' in card


def test_quiet_prints_nothing_and_otherwise_progress_with_time_left(tmp_path, capsys):
    argv = ["--config", "tiny_ivim", "--set", "labels=[gt, mle]", "--set", "alpha=[]", "--n-train", "600",
            "--set", "n_test=100"]
    assert study.main(argv + ["--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert quiet.out == "" and "mean|bias|" not in quiet.err and "trained net-" not in quiet.err
    assert study.main(argv + ["--out", str(tmp_path / "loud")]) == 0
    out = capsys.readouterr().out
    trained = [line for line in out.splitlines() if "] trained net-" in line]
    assert len(trained) == 2
    # the MLE labels' fitting speed gives the evaluation's time, so each line estimates the whole study
    assert re.search(r"training \d+ s elapsed, ~\d+ s left; then evaluation ~\d+ s, ~\d+ s left in all$", trained[0])
    assert re.search(r"none left; then evaluation ~\d+ s, ~\d+ s left in all$", trained[1])
    assert re.search(r"\] evaluating on the test grid .*, ~\d+ s$", out, re.M)
    assert "f [fraction]" in out and "f [1]" not in out


def test_job_progress_estimates_the_time_left():
    now = [100.0]
    progress = JobProgress(4, clock=lambda: now[0])
    now[0] = 110.0
    assert progress.finished() == "10 s elapsed, ~30 s left"
    now[0] = 130.0
    assert progress.finished() == "30 s elapsed, ~30 s left"
    progress.finished()
    now[0] = 160.0
    assert progress.finished() == "60 s elapsed, none left"
    with pytest.raises(ValueError):
        JobProgress(0)
    now[0] = 0.0
    then = JobProgress(2, clock=lambda: now[0], then=("evaluation", 25.0))
    now[0] = 10.0
    assert then.finished() == "10 s elapsed, ~10 s left; then evaluation ~25 s, ~35 s left in all"
    now[0] = 20.0
    assert then.finished() == "20 s elapsed, none left; then evaluation ~25 s, ~25 s left in all"


def test_fraction_prints_in_words():
    assert display_unit("1") == "fraction" and display_unit("mm^2/s") == "mm^2/s"


def test_the_study_commands_help_does_not_load_the_workflows():
    import subprocess
    import sys
    from pathlib import Path

    from qmri_labels.workflows import run

    code = ("import contextlib, io, sys\n"
            "from qmri_labels.cli import study\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n"
            "        study.main(['--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "assert '--protocol' in out.getvalue()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'optuna', 'pandas')\n"
            "             or m.startswith('qmri_labels.workflows')))")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"
    # the command's parts shared with run_study are still reachable from the command's module
    assert study.load_config is run.load_config and study.prepare_study is run.prepare_study
