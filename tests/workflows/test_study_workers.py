"""A label study spread over worker processes gives the same bytes as one run in order."""

import hashlib
import json

import pandas as pd
import pytest

from qmri_labels.cli import study
from qmri_labels.threads import usable_cores
from qmri_labels.workflows.jobs import JobRunner, resolve_workers


def _weights(folder):
    return {p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((folder / "networks").glob("*/weights.safetensors"))}


def _without_seconds(record):
    """A record without what differs between runs of one search: times, and where the search lived."""
    if isinstance(record, dict):
        return {k: _without_seconds(v) for k, v in record.items() if k not in ("seconds", "storage")}
    return record


def test_two_workers_give_the_same_networks_and_tables_as_one(tmp_path):
    import torch

    # the serial run's process has another torch thread count than the spawned workers: what a
    # job computes must not depend on it (trial scores once did, by 1e-10)
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    try:
        _compare_one_and_two_workers(tmp_path)
    finally:
        torch.set_num_threads(before)


def _compare_one_and_two_workers(tmp_path):
    # tuning and seeds: the jobs that follow a search are submitted while other jobs run, and
    # finish in another order than in the serial run; the searches of the two-worker run live in
    # a shared Optuna storage (as on several machines), those of the serial run in memory
    common = ["--config", "tiny_ivim", "--alpha", "0.5", "--set", "labels=[gt, self]", "--tune", "2",
              "--seeds", "2", "--quiet"]
    assert study.main([*common, "--workers", "1", "--out", str(tmp_path / "w1")]) == 0
    assert study.main([*common, "--workers", "2", "--out", str(tmp_path / "w2"), "--storage",
                       f"sqlite:///{tmp_path / 'tune.db'}", "--study-name", "tiny"]) == 0
    one, two = tmp_path / "w1", tmp_path / "w2"
    weights = _weights(one)
    # 3 labels x (default, tuned) x 2 seeds
    assert len(weights) == 12 and weights == _weights(two)
    for table in ("summary.csv", "heldout.csv", "tuned_vs_default.csv", "seeds.csv"):
        assert (one / table).read_bytes() == (two / table).read_bytes(), table
    # every trial of every search, with what it cost
    trials = [pd.read_csv(f / "tuning_trials.csv") for f in (one, two)]
    assert len(trials[0]) == 6 and {"pruned", "epochs", "seconds", "lr", "val_loss", "param_rmse"} <= set(trials[0])
    pd.testing.assert_frame_equal(trials[0].drop(columns="seconds"), trials[1].drop(columns="seconds"))
    manifests = [json.loads((f / "manifest.json").read_text()) for f in (one, two)]
    assert [m["determinism"]["workers"] for m in manifests] == [1, 2]
    assert manifests[1]["tuning"]["net-gt"]["storage"]["study_name"] == "tiny-net-gt"
    assert _without_seconds(manifests[0]["tuning"]) == _without_seconds(manifests[1]["tuning"])
    # the report's order is the designs' order, not the order in which the jobs finished
    methods = list(dict.fromkeys(pd.read_csv(two / "summary.csv")["method"]))
    assert methods[:4] == ["fit-mle", "net-gt", "net-gt@s1", "net-self"]


def test_workers_setting_is_checked(capsys, tmp_path):
    assert resolve_workers(3, "cpu", 1) == 3
    assert resolve_workers("auto", "cpu", 1, busy=0.0) == usable_cores()
    assert resolve_workers("auto", "cpu", 10_000) == 1
    assert resolve_workers("auto", "cuda:0", 1) == 1
    for bad in (0, -1, 1.5, "two", True, None):
        with pytest.raises(ValueError, match="workers must be a positive integer or 'auto'"):
            resolve_workers(bad, "cpu", 1)
    with pytest.raises(ValueError, match="CPU only"):
        resolve_workers(2, "cuda:0", 1)
    with pytest.raises(ValueError, match="num_threads"):
        resolve_workers(2, "cpu", None)
    with pytest.raises(SystemExit):
        study.main(["--config", "tiny_ivim", "--set", "workers=0", "--out", str(tmp_path / "run")])
    assert "workers must be a positive integer or 'auto', got 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(SystemExit):
        study.main(["--config", "tiny_ivim", "--workers", "many"])


def _square(x):
    return x * x


def _fail(x):
    raise RuntimeError(f"job {x} failed")


@pytest.mark.parametrize("workers", [1, 2])
def test_runner_runs_jobs_submitted_while_others_run_and_raises_a_jobs_error(workers):
    seen = {}
    with JobRunner(workers) as runner:
        runner.submit("a", _square, 3)
        for key, result, seconds in runner.completed():
            seen[key] = result
            assert seconds >= 0
            if key == "a":
                runner.submit("b", _square, result)
    assert seen == {"a": 9, "b": 81}
    with pytest.raises(RuntimeError, match="job 7 failed"):
        with JobRunner(workers) as runner:
            runner.submit("x", _fail, 7)
            list(runner.completed())
