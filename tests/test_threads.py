"""CPU threads: ``threads="auto"`` leaves the cores other processes use to them, ``--threads N``
sets the count on both commands and in the Python API, and the MLE's maps do not depend on it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from qmri_labels import fit_volume, run_study
from qmri_labels.cli import fit as fit_cli
from qmri_labels.threads import busy_cores, resolve_threads, torch_threads, usable_cores
from qmri_labels.workflows.jobs import resolve_workers

BVALS = np.array([0, 10, 20, 30, 50, 80, 100, 200, 400, 800.0])


@pytest.fixture()
def one_busy_core():
    """Another process that keeps one core busy while the test runs."""
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)  # let it reach the CPU
    try:
        yield burner
    finally:
        burner.kill()
        burner.wait()


def test_explicit_counts_are_taken_and_bad_ones_refused():
    assert resolve_threads(1) == 1
    assert resolve_threads(3) == 3
    for bad in (0, -2, 1.5, "two", True, None):
        with pytest.raises(ValueError, match="threads must be a positive integer or 'auto'"):
            resolve_threads(bad)


def test_auto_takes_the_free_cores_within_torchs_setting():
    cores = usable_cores()
    assert resolve_threads("auto", busy=0.0) == min(cores, torch.get_num_threads())
    assert resolve_threads("auto", busy=float(cores)) == 1  # never fewer than one
    assert resolve_threads("auto", busy=cores + 5.0) == 1
    with torch_threads(1):  # a count the caller set (or OMP_NUM_THREADS) caps auto
        assert resolve_threads("auto", busy=0.0) == 1


def test_busy_cores_sees_another_process(one_busy_core):
    assert busy_cores(0.5) > 0.6


def test_busy_cores_leaves_out_this_processs_own_use(monkeypatch):
    from qmri_labels import threads

    # two cores sampled over 100 ticks each: 200 busy ticks, 120 of them this process's
    samples = iter([(1000, 5000), (1200, 5200)])
    own = iter([40, 160])
    monkeypatch.setattr(threads, "_cpu_busy_ticks", lambda cpus: next(samples))
    monkeypatch.setattr(threads, "_own_ticks", lambda: next(own))
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    assert busy_cores(0.0) == pytest.approx(0.8)


@pytest.mark.skipif(usable_cores() < 2, reason="needs two usable cores")
def test_auto_gives_one_thread_fewer_beside_a_busy_process(one_busy_core):
    cores = usable_cores()
    with torch_threads(cores):
        assert resolve_threads("auto") <= cores - 1
        assert resolve_workers("auto", "cpu", 1) <= cores - 1


def test_fit_volume_runs_with_the_given_threads_and_restores_them(monkeypatch):
    seen = []
    real = fit_volume.__globals__["_fit_volume"]

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setitem(fit_volume.__globals__, "_fit_volume", spy)
    signals = np.exp(-np.outer(np.linspace(0.5e-3, 2e-3, 20), BVALS)) * 1000.0
    before = torch.get_num_threads()
    one = fit_volume(signals, protocol=BVALS, estimator="mle", model="monoexp", sigma=10.0, threads=1)
    assert seen == [1] and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be a positive integer or 'auto'"):
        fit_volume(signals, protocol=BVALS, model="monoexp", sigma=10.0, threads=0)
    if usable_cores() >= 2:
        two = fit_volume(signals, protocol=BVALS, estimator="mle", model="monoexp", sigma=10.0, threads=2)
        assert seen[-1] == 2
        assert one.params.tobytes() == two.params.tobytes()  # the MLE's bytes do not depend on threads


def _dwi(folder):
    import nibabel as nib

    rng = np.random.default_rng(0)
    d = rng.uniform(0.5e-3, 2.5e-3, (4, 4, 2, 1))
    signals = 1000.0 * np.exp(-d * BVALS) + rng.normal(0, 5.0, (4, 4, 2, BVALS.size))
    nib.save(nib.Nifti1Image(np.abs(signals).astype(np.float32), np.eye(4)), str(folder / "dwi.nii.gz"))
    np.savetxt(folder / "dwi.bval", BVALS[None], fmt="%g")
    return folder / "dwi.nii.gz", folder / "dwi.bval"


def test_fit_command_threads_flag_is_used_and_recorded(tmp_path, capsys):
    dwi, bval = _dwi(tmp_path)
    common = ["--dwi", str(dwi), "--bval", str(bval), "--model", "monoexp", "--sigma", "5", "--quiet"]
    assert fit_cli.main(common + ["--threads", "1", "--out", str(tmp_path / "one")]) == 0
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert manifest["threads"] == {"requested": 1, "used": 1}
    assert manifest["device"]["torch_threads"] == 1
    assert fit_cli.main(common + ["--out", str(tmp_path / "auto")]) == 0
    auto = json.loads((tmp_path / "auto" / "manifest.json").read_text())
    assert auto["threads"]["requested"] == "auto" and 1 <= auto["threads"]["used"] <= usable_cores()
    for name, digest in manifest["output_sha256"].items():
        if name.endswith(".nii.gz"):
            assert auto["output_sha256"][name] == digest, name
    with pytest.raises(SystemExit) as exc:
        fit_cli.main(common + ["--threads", "0", "--out", str(tmp_path / "zero")])
    assert exc.value.code == 2
    assert "--threads: give a positive integer or 'auto', got '0'" in capsys.readouterr().err
    assert not (tmp_path / "zero").exists()


TINY = dict(alpha=[], n_train=400, n_test=100, batch_size=128, max_epochs=1, patience=0, mle={"n_starts": 1},
            grid={"points_per_axis": 2, "repeats": 2}, figures=False, labels=["gt"])


def test_run_study_threads_bound_the_workers_and_are_recorded(tmp_path):
    result = run_study("tiny_ivim", out=tmp_path / "run", threads=1, **TINY)
    assert result.manifest["threads"] == {"requested": 1, "used": 1}
    assert result.manifest["determinism"]["workers"] == 1
    with pytest.raises(ValueError, match="workers 2 x num_threads 1 would use more than the 1 CPU threads"):
        run_study("tiny_ivim", out=tmp_path / "refused", threads=1, workers=2, **TINY)
    assert not (tmp_path / "refused").exists()


def test_a_studys_tables_do_not_depend_on_its_threads(tmp_path, monkeypatch):
    from qmri_labels.workflows import ivim

    # a network's float32 sums depend on the thread count (the default study's summary.csv
    # differed between 1 and 2 threads): the evaluation runs at the training jobs' num_threads
    seen = []
    real = ivim.evaluate_snrs

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(ivim, "evaluate_snrs", spy)
    result = run_study("tiny_ivim", out=tmp_path / "run", threads=2, workers=1, num_threads=1, **TINY)
    assert result.manifest["threads"]["used"] == 2 and seen == [1]
