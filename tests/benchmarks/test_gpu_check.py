"""benchmarks/gpu_check.py cannot rot: its CPU dry run runs every step at toy size, and without
CUDA the real run stops at once with a clear message."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the no-CUDA refusal cannot run here")
def test_without_cuda_the_check_refuses_at_once(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_json_and_markdown(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    errors = {k: v["error"] for k, v in results["steps"].items() if "error" in v}
    assert proc.returncode == 0 and not errors, (errors, proc.stdout[-2000:], proc.stderr[-2000:])
    steps = results["steps"]
    assert list(steps) == ["tests", "fit_mle", "unet", "study", "qsm_sources", "reproducibility", "qsm_study"]
    assert steps["tests"]["returncode"] == 0 and steps["tests"]["counts"].get("failed", 0) == 0
    assert steps["fit_mle"]["voxels_per_s"] > 0 and steps["fit_mle"]["cpu_voxels_per_s"] > 0
    assert steps["unet"]["inference_s_median"] > 0 and steps["unet"]["epoch_s"] > 0
    # the same seed twice gives the same bytes: the study's summary and the U-Net baseline
    assert steps["study"]["summary_identical"] is True
    assert steps["qsm_sources"]["baseline"]["losses_identical"] is True
    assert {t["source"] for t in steps["qsm_sources"]["paired_tests"]} >= {"cudnn_benchmark=true", "dtype=float16"}
    assert steps["reproducibility"]["returncode"] == 0 and steps["reproducibility"]["baseline"]["training_loss_identical"]
    assert steps["qsm_study"]["returncode"] == 0
    table = (tmp_path / "gpu_check.md").read_text()
    for name in steps:
        assert f"| {name} |" in table
