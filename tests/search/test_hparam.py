"""Random hyperparameter search with a shared Optuna store, reference vs tuned on the test set."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import optuna
import pandas as pd
import pytest
import scipy.stats
import yaml
from pathlib import Path

from qmri_labels.data.registry import load_dataset
from qmri_labels.estimators import NetworkEstimator
from qmri_labels.paths import studies_dir
from qmri_labels.search import engine
from qmri_labels.search.space import check_space, suggest
from qmri_labels.workflows import hparam
from qmri_labels.workflows.common import per_sample_l2


@pytest.fixture(autouse=True)
def no_shared_storage(monkeypatch):
    """Searches here make their own store unless a test names one."""
    monkeypatch.delenv(engine.STORAGE_ENV, raising=False)


def _tiny_space():
    return check_space(yaml.safe_load((studies_dir() / "tiny_hparam.yaml").read_text())["search_space"],
                       hparam.SEARCHABLE)


def tiny_config(**changes):
    config = yaml.safe_load((studies_dir() / "tiny_hparam.yaml").read_text())
    config["network"]["max_epochs"] = 2
    config.update(changes)
    return config


def test_search_picks_by_validation_and_compares_on_test(tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    out = tmp_path / "w0"
    result = hparam.run(tiny_config(storage=storage, study_name="tiny"), out, quiet=True)
    for f in ("trials.csv", "best_params.json", "comparison.csv", "ttest.csv", "search.png", "report.md",
              "manifest.json", "networks/reference/manifest.json", "networks/tuned/manifest.json"):
        assert (out / f).is_file(), f
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 3 and trials["state"].eq("COMPLETE").all()
    best = json.loads((out / "best_params.json").read_text())
    assert best["validation_l2"] == pytest.approx(trials["value"].min())
    comparison = result["comparison"].set_index("network")
    # retraining the best trial with the same seed reproduces its validation score exactly
    assert comparison.loc["tuned", "validation_l2"] == best["validation_l2"]
    for key, value in best["params"].items():
        assert comparison.loc["tuned", key] == value
    assert comparison.loc["reference", "lr"] == 1e-3 and comparison.loc["reference", "hidden_layers"] == 3
    tt = result["ttest"]
    # the paired t-test, redone with scipy on the saved networks' per-sample errors on the test set
    test = load_dataset("tiny_ivim_snr30", "test")
    errors = {name: per_sample_l2(NetworkEstimator.load(out / "networks" / name).predict(test.signals, signal_scale=1.0), test,
                                  ["f", "D", "Dstar"]) for name in ("tuned", "reference")}
    assert tt["n"] == len(test) == 256
    expected = scipy.stats.ttest_rel(errors["tuned"], errors["reference"])
    assert tt["t"] == pytest.approx(expected.statistic, rel=1e-6)
    assert tt["p_value"] == pytest.approx(expected.pvalue, rel=1e-6, abs=0)
    assert np.isclose(tt["mean_diff"], comparison.loc["tuned", "test_l2"] - comparison.loc["reference", "test_l2"])
    # n_trials is the study's budget: a rerun with a larger budget resumes and adds only the missing trial,
    # with other draws; the best is taken over all
    result2 = hparam.run(tiny_config(storage=storage, study_name="tiny", n_trials=4), tmp_path / "w1", quiet=True)
    trials2 = pd.read_csv(tmp_path / "w1" / "trials.csv")
    assert len(trials2) == 4
    assert trials2.drop_duplicates(subset=[c for c in trials2 if c.startswith("params_")]).shape[0] == 4
    assert result2["manifest"]["optuna"]["trials_in_study"] == 4
    assert result2["manifest"]["optuna"]["trials_here"] == 1


def test_default_storage_is_sqlite_in_the_output_folder(tmp_path):
    hparam.run(tiny_config(n_trials=1), tmp_path / "run", quiet=True)
    assert (tmp_path / "run" / "optuna.db").is_file()


def test_bad_search_spaces():
    with pytest.raises(ValueError, match="cannot search over 'colour'"):
        hparam.run(tiny_config(search_space={"colour": ["red"]}), "/tmp/unused", quiet=True)
    with pytest.raises(ValueError, match="low < high"):
        hparam.run(tiny_config(search_space={"lr": {"low": 1, "high": 0.1}}), "/tmp/unused", quiet=True)
    with pytest.raises(ValueError, match="both fixed"):
        hparam.run(tiny_config(network={"lr": 0.1}), "/tmp/unused", quiet=True)
    with pytest.raises(ValueError, match="n_trials"):
        hparam.run(tiny_config(n_trials=0), "/tmp/unused", quiet=True)


def test_bad_worker_settings():
    with pytest.raises(ValueError, match="worker must be true"):
        hparam.run(tiny_config(worker=1), "/tmp/unused", quiet=True)
    with pytest.raises(ValueError, match="heartbeat_seconds must be an integer >= 1"):
        hparam.run(tiny_config(heartbeat_seconds=0), "/tmp/unused", quiet=True)
    with pytest.raises(ValueError, match="storage must be a database URL"):
        engine.open_study("optuna.db", "s", 0, 60, 1)


def _params_of(trials):
    return {t.number: t.params for t in trials}


def test_trial_draws_depend_on_seed_and_trial_number_only():
    space = _tiny_space()

    def draws(seed, numbers):
        study = optuna.create_study(sampler=engine.trial_seeded_sampler(seed))
        out = {}
        for _ in range(max(numbers) + 1):
            trial = study.ask()
            if trial.number in numbers:
                out[trial.number] = suggest(trial, space)
            study.tell(trial, 0.0)
        return out

    a, b = draws(3, {0, 1, 2, 3}), draws(3, {2, 3})
    assert a[2] == b[2] and a[3] == b[3]
    assert len({json.dumps(v, sort_keys=True) for v in a.values()}) == 4
    assert draws(4, {2})[2] != a[2]


def test_a_study_of_another_search_is_refused(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    engine.open_study(storage, "s", 0, 60, 1, {"search_space": {"lr": [0.1]}, "seed": 0})
    engine.open_study(storage, "s", 0, 60, 1, {"search_space": {"lr": [0.1]}, "seed": 0})  # the same search
    with pytest.raises(ValueError, match=r"holds another search \(differs in \['seed'\]\)"):
        engine.open_study(storage, "s", 0, 60, 1, {"search_space": {"lr": [0.1]}, "seed": 1})


def _worker(tmp_path, name, storage, *extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "qmri_labels.study", "--config", "tiny_hparam", "--storage", storage,
               "--study-name", "shared", "--worker", "--set", "network.max_epochs=2", "--out",
               str(tmp_path / name), "--quiet", *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_worker_processes_share_one_sqlite_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    workers = [_worker(tmp_path, f"w{i}", storage, "--set", "n_trials=4") for i in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="shared", storage=storage)
    trials = study.get_trials()
    # every trial recorded once, all finished; two workers finishing together may add one over the budget
    assert [t.number for t in trials] == list(range(len(trials))) and len(trials) in (4, 5)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    # the points searched are those of one process: trial i's draws depend on (seed, i) only
    space = _tiny_space()
    reference = optuna.create_study(sampler=engine.trial_seeded_sampler(0))
    for trial in trials:
        expected = suggest(reference.ask(), space)
        assert trial.params == expected, trial.number
    manifests = [json.loads((tmp_path / f"w{i}" / "manifest.json").read_text()) for i in range(2)]
    assert sum(m["optuna"]["trials_here"] for m in manifests) == len(trials)
    assert {t.user_attrs["worker"] for t in trials} <= {m["optuna"]["worker_id"] for m in manifests}
    # the finishing run (no --worker) finds the budget spent, runs nothing and compares over all trials
    result = hparam.run(tiny_config(storage=storage, study_name="shared", n_trials=4), tmp_path / "final",
                        quiet=True)
    assert result["manifest"]["optuna"]["trials_here"] == 0
    assert result["manifest"]["optuna"]["trials_in_study"] == len(trials)
    # ... the search's result is its first n_trials trials, as for one process alone
    best = json.loads((tmp_path / "final" / "best_params.json").read_text())
    assert best["validation_l2"] == min(t.value for t in trials[:4])


def test_a_killed_worker_s_trial_is_marked_failed_and_run_again(tmp_path):
    storage = f"sqlite:///{tmp_path / 'search.db'}"
    # trials long enough (10 epochs) that the poll below catches the worker inside one on an idle
    # machine too (at 2 epochs both trials could end between two polls); the finishing run uses
    # the same network settings, as a worker of the same search must
    worker = _worker(tmp_path, "killed", storage, "--set", "n_trials=2", "--set", "heartbeat_seconds=1",
                     "--set", "network.max_epochs=10")
    victim = None
    deadline = time.monotonic() + 240
    try:
        while victim is None and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.05)
            try:
                running = optuna.load_study(study_name="shared", storage=storage).get_trials(
                    states=(optuna.trial.TrialState.RUNNING,))
            except Exception:  # the worker has not created the study yet
                continue
            if running:
                os.kill(worker.pid, signal.SIGSTOP)  # frozen: the trial cannot finish any more
                try:
                    study = optuna.load_study(study_name="shared", storage=storage)
                    still = [t for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))]
                except Exception:  # frozen while holding SQLite's write lock: let it go on, catch it later
                    still = []
                if still:
                    victim = still[0]
                else:
                    os.kill(worker.pid, signal.SIGCONT)
    finally:
        worker.kill()
        worker.wait()
    assert victim is not None, "the worker never ran a trial"
    config = tiny_config(storage=storage, study_name="shared", n_trials=2, heartbeat_seconds=1)
    config["network"]["max_epochs"] = 10
    result = hparam.run(config, tmp_path / "final", quiet=True)
    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    states = {t.number: t.state for t in trials}
    assert states[victim.number] == optuna.trial.TrialState.FAIL
    assert not [t for t in trials if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)]
    # the failed trial was queued again with its hyperparameters and completed by the finishing run; the
    # point is the one trial number victim.number draws (also where the kill came before all were drawn)
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    failed = next(t for t in trials if t.number == victim.number)
    assert {k: retries[0].params[k] for k in failed.params} == failed.params
    space = _tiny_space()
    reference = optuna.create_study(sampler=engine.trial_seeded_sampler(0))
    draws = [suggest(reference.ask(), space) for _ in range(victim.number + 1)]
    assert retries[0].params == draws[victim.number]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) >= 2 and result["manifest"]["optuna"]["trials_in_study"] == len(complete)


def test_worker_flags_set_the_search_config():
    from qmri_labels.cli import study

    parse = study.build_parser().parse_args
    _, config, _, _ = study.resolve(parse(["--config", "tiny_hparam", "--storage", "sqlite:///x.db",
                                           "--study-name", "n", "--worker"]))
    assert (config["storage"], config["study_name"], config["worker"]) == ("sqlite:///x.db", "n", True)
    _, config, _, _ = study.resolve(parse(["--config", "tiny_hparam"]))
    assert config["worker"] is False and config["storage"] is None
    with pytest.raises(ValueError, match="--worker does not apply to study kind 'ivim_labels'"):
        study.resolve(parse(["--config", "tiny_ivim", "--worker"]))


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # study.ask plays the dead worker
def test_a_trial_whose_worker_died_before_its_objective_began_is_failed_and_run_again(tmp_path):
    """Killed between taking a trial and its first heartbeat: no heartbeat can go stale, the finishing run
    still fails it after the grace period and runs it again."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = engine.open_study(storage, "s", 0, 1, 1)
    # the grace period runs from the orphan's start (study.ask), so the clock starts before it
    t0 = time.monotonic()
    orphan = study.ask()  # RUNNING, as a worker that died right after taking it leaves it
    orphan.suggest_float("x", 0.0, 1.0)

    def objective(trial):
        trial.set_user_attr(engine.STARTED_ATTR, trial.number)
        return trial.suggest_float("x", 0.0, 1.0)

    ran = engine.run_trials(study, objective, n_trials=1, finish=True, poll_seconds=0.2, grace_seconds=1.0)
    assert time.monotonic() - t0 >= 1.0
    trials = study.get_trials()
    # the orphan is the budget's one trial (taken, so no fresh one is added): only its retry runs here
    assert trials[0].state == optuna.trial.TrialState.FAIL and ran == 1 and len(trials) == 2
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.COMPLETE
    assert retry[0].params == trials[0].params
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # study.ask plays the dead worker
def test_a_trial_whose_worker_died_right_after_its_objective_began_is_failed_by_its_heartbeat(tmp_path):
    """Killed after the objective marked the trial begun but before Optuna's heartbeat thread wrote its
    first beat: the finishing run used to wait for that trial forever (CI hung on the killed-worker
    test under load). mark_trial_begun records a heartbeat before the mark, so the trial goes stale."""
    import threading

    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = engine.open_study(storage, "s", 0, 1, 1)  # heartbeat every 1 s, stale after 2 s
    orphan = study.ask()
    orphan.suggest_float("x", 0.0, 1.0)
    engine.mark_trial_begun(study, orphan)  # ... and the worker dies here

    def objective(trial):
        engine.mark_trial_begun(study, trial)
        return trial.suggest_float("x", 0.0, 1.0)

    result = {}
    # grace_seconds far beyond the test: only the stale heartbeat can fail the orphan
    runner = threading.Thread(target=lambda: result.update(ran=engine.run_trials(
        study, objective, n_trials=1, finish=True, poll_seconds=0.2, grace_seconds=3600.0)), daemon=True)
    runner.start()
    runner.join(timeout=60)
    assert not runner.is_alive(), "the finishing run still waits for the dead worker's trial"
    trials = study.get_trials()
    assert trials[0].state == optuna.trial.TrialState.FAIL and result["ran"] == 1 and len(trials) == 2
    assert trials[0].user_attrs[engine.STARTED_ATTR] == orphan.number
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.COMPLETE
