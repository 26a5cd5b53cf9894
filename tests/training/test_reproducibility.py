"""Determinism controls: with every source fixed, two trainings give bit-identical losses for
1000 steps and bit-identical inference; varying one source changes the result."""

import numpy as np
import pytest
import torch

from qmri_labels.data.registry import load_dataset
from qmri_labels.estimators import train_network
from qmri_labels.training.reproducibility import (
    DeterminismSettings,
    bitwise_equal,
    determinism_scope,
    device_available,
    record_determinism,
    run_inference,
    weights_equal,
)

# 1000 training rows, 10 % validation -> 900 rows in batches of 9 -> 100 steps per epoch
TINY = {"name": "repro_tiny", "base": "tiny_ivim_snr30", "splits": {"train": {"n": 1000}, "test": {"n": 200}}}
# one thread: the test machine's cores are shared, and intra-op threads then mostly wait
NET = {"label": "gt", "batch_size": 9, "patience": 0, "hidden_layers": 2, "width": 10}


@pytest.fixture(scope="module")
def data():
    return load_dataset(TINY, "train"), load_dataset(TINY, "test")


def test_baseline_is_bitwise_reproducible_for_1000_steps(data):
    train, test = data
    baseline = DeterminismSettings(seed=3, num_threads=1)
    a = train_network(train, baseline, max_epochs=10, **NET)
    b = train_network(train, baseline, max_epochs=10, **NET)
    assert a.step_losses.size == 1000 and b.step_losses.size == 1000
    assert np.all(np.isfinite(a.step_losses)) and a.step_losses[-100:].mean() < a.step_losses[:100].mean()
    assert bitwise_equal(a.step_losses, b.step_losses)
    assert weights_equal(a.network, b.network)
    pred_a = run_inference(a.network, test.signals, baseline)
    pred_b = run_inference(b.network, test.signals, baseline)
    assert bitwise_equal(pred_a, pred_b)
    assert bitwise_equal(a.estimator.predict(test.signals), b.estimator.predict(test.signals))
    assert a.record["use_deterministic_algorithms"] is True and a.record["cudnn_benchmark"] is False
    assert a.record["settings"]["dtype"] == "float32"


@pytest.mark.parametrize("change", [{"init_seed": 99}, {"shuffle_seed": 99}, {"dtype": "float64"}])
def test_varying_one_source_changes_training(data, change):
    train, _ = data
    baseline = DeterminismSettings(seed=3, num_threads=1)
    a = train_network(train, baseline, max_epochs=1, **NET)
    b = train_network(train, baseline.replace(**change), max_epochs=1, **NET)
    assert a.step_losses.size == b.step_losses.size == 100
    assert not bitwise_equal(a.step_losses, b.step_losses)
    if "shuffle_seed" in change:
        # same init, other batch order: the weights start equal, so only the batches differ
        assert a.estimator.seeds_["init_seed"] == b.estimator.seeds_["init_seed"]
    if "dtype" in change:
        # float64 follows the float32 trajectory closely but not bit for bit
        np.testing.assert_allclose(a.step_losses, b.step_losses, rtol=1e-3)


def test_inference_under_other_dtypes(data):
    train, test = data
    run = train_network(train, DeterminismSettings(seed=1, num_threads=1), max_epochs=1, **NET)
    f32 = run_inference(run.network, test.signals)
    f64 = run_inference(run.network, test.signals, DeterminismSettings(dtype="float64"))
    bf16 = run_inference(run.network, test.signals, DeterminismSettings(dtype="bf16-mixed"))
    assert next(run.network.parameters()).dtype == torch.float32  # the caller's network is untouched
    scale = np.abs(f32).max(axis=0)
    assert np.max(np.abs(f64 - f32) / scale) < 1e-5
    assert 0 < np.max(np.abs(bf16 - f32) / scale) < 0.1


def test_settings_validation_and_scope_restores_flags():
    with pytest.raises(ValueError, match="dtype must be one of"):
        DeterminismSettings(dtype="float16")
    with pytest.raises(ValueError, match="device must be"):
        DeterminismSettings(device="tpu")
    with pytest.raises(ValueError, match="init_seed"):
        DeterminismSettings(init_seed=-1)
    with pytest.raises(ValueError, match="unknown determinism settings"):
        DeterminismSettings.from_dict({"seed": 1, "colour": "red"})
    s = DeterminismSettings(seed=5, init_seed=7)
    assert s.resolved_init_seed == 7 and s.resolved_shuffle_seed == 5
    assert s.estimator_kwargs()["precision"] == "32-true"
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark, torch.get_num_threads())
    with determinism_scope(DeterminismSettings(deterministic=True, cudnn_benchmark=True, num_threads=1)):
        rec = record_determinism(DeterminismSettings(deterministic=True, cudnn_benchmark=True, num_threads=1))
        assert rec["use_deterministic_algorithms"] and rec["cudnn_benchmark"] and rec["num_threads"] == 1
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
            torch.get_num_threads()) == before


NO_CUDA = "no CUDA device on this machine: the GPU half (cuDNN benchmark, device effects) did not run"


def needs_cuda(test):
    """Marked ``gpu`` (run by ``pytest -m gpu`` and benchmarks/gpu_check.py) and skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)(test))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the no-CUDA error path cannot run here")
def test_cuda_settings_without_cuda_are_a_clear_error():
    ok, reason = device_available("cuda")
    assert not ok and "no CUDA" in reason
    with pytest.raises(ValueError, match="no CUDA"):
        with determinism_scope(DeterminismSettings(device="cuda")):
            pass


@needs_cuda
def test_cudnn_benchmark_flag_is_in_force_on_the_gpu(data):
    train, test = data
    settings = DeterminismSettings(seed=3, device="cuda", cudnn_benchmark=True, deterministic=False)
    with determinism_scope(settings):
        assert torch.backends.cudnn.benchmark is True and torch.backends.cudnn.deterministic is False
        record = record_determinism(settings)
    assert record["cudnn_benchmark"] is True and record["device_name"] == torch.cuda.get_device_name(0)
    run = train_network(train, settings, max_epochs=1, **NET)
    assert run.record["flags_in_fit"]["cudnn_benchmark"] is True
    assert torch.backends.cudnn.benchmark is False  # restored after the fit
    assert run.record["device"] == "cuda"
    assert np.all(np.isfinite(run.step_losses)) and run.step_losses.size == 100


@needs_cuda
def test_gpu_training_is_reproducible_and_close_to_the_cpu(data):
    train, test = data
    gpu = DeterminismSettings(seed=3, device="cuda")
    a = train_network(train, gpu, max_epochs=1, **NET)
    b = train_network(train, gpu, max_epochs=1, **NET)
    # with every source fixed the GPU repeats itself bit for bit
    assert bitwise_equal(a.step_losses, b.step_losses) and weights_equal(a.network, b.network)
    cpu = train_network(train, DeterminismSettings(seed=3, num_threads=1), max_epochs=1, **NET)
    # the device is a source: same seeds, other kernels; the trajectories stay close
    np.testing.assert_allclose(a.step_losses, cpu.step_losses, rtol=1e-3)
    # inference of one network on both devices: nearly equal outputs
    on_gpu = run_inference(cpu.network, test.signals, DeterminismSettings(device="cuda"))
    on_cpu = run_inference(cpu.network, test.signals)
    scale = np.abs(on_cpu).max(axis=0)
    assert np.max(np.abs(on_gpu - on_cpu) / scale) < 1e-4
    assert bitwise_equal(on_gpu, run_inference(cpu.network, test.signals, DeterminismSettings(device="cuda")))


def test_train_network_rejects_conflicting_parameters(data):
    with pytest.raises(ValueError, match="set by the DeterminismSettings"):
        train_network(data[0], DeterminismSettings(), seed=4, max_epochs=1)


@pytest.mark.gpu  # runs everywhere; with CUDA its device=cuda rows are measured
def test_reproducibility_study_tiny(tmp_path, data):
    import pandas as pd
    import yaml

    from qmri_labels.paths import studies_dir
    from qmri_labels.workflows import reproducibility as study

    config = yaml.safe_load((studies_dir() / "tiny_reproducibility.yaml").read_text())
    config.update(training_sources=["init_seed", "dtype=float64", "device=cuda"],
                  inference_sources=["dtype=bf16-mixed", "cudnn_benchmark=true"], steps=40)
    result = study.run(config, tmp_path / "rep", quiet=True)
    out = tmp_path / "rep"
    for f in ("baseline.json", "training.csv", "inference.csv", "per_repeat.csv", "skipped.csv", "report.md",
              "manifest.json", "test_error.png", "loss_divergence.png"):
        assert (out / f).is_file(), f
    check = result["baseline"]
    assert check["training_loss_identical"] and check["weights_identical"] and check["inference_identical_between_runs"]
    training = result["training"].set_index("source")
    assert training.loc["init_seed", "losses_identical"] == 0 and training.loc["init_seed", "repeats"] == 2
    assert training.loc["dtype=float64", "outputs_identical"] == 0
    inference = result["inference"].set_index("source")
    assert 0 < inference.loc["dtype=bf16-mixed", "max_rel_output_diff"] < 0.1
    skipped = pd.read_csv(out / "skipped.csv")
    assert "inference" in set(skipped.phase) and any("cuDNN" in r for r in skipped.reason)
    if torch.cuda.is_available():
        # the GPU rows ran: device and cuDNN benchmark were measured, not skipped
        assert "device=cuda" not in set(skipped.source) and "device=cuda" in set(training.index)
        assert training.loc["device=cuda", "repeats"] >= 1
    else:
        assert any("no CUDA GPU" in r for r in skipped[skipped.source == "device=cuda"].reason)
    assert "bit-identical: yes" in (out / "report.md").read_text()
    with pytest.raises(ValueError, match="unknown source"):
        study.run({**config, "training_sources": ["colour=red"]}, tmp_path / "bad", quiet=True)


def test_flags_in_force_during_training_are_recorded(data):
    # Lightning would reset cuDNN benchmarking to off under deterministic=True; the setting must hold
    run = train_network(data[0], DeterminismSettings(num_threads=1, cudnn_benchmark=True), max_epochs=1, **NET)
    assert run.record["flags_in_fit"]["cudnn_benchmark"] is True
    assert run.record["flags_in_fit"]["use_deterministic_algorithms"] is True
    assert torch.backends.cudnn.benchmark is False  # restored after the fit


def test_determinism_record_uses_the_bundle_description_of_versions_and_device():
    from qmri_labels.provenance import device_info, package_versions

    record = record_determinism(DeterminismSettings(num_threads=1))
    assert record["versions"] == package_versions()
    info = device_info("cpu")
    assert {k: v for k, v in record["device_info"].items() if k != "torch_threads"} == \
        {k: v for k, v in info.items() if k != "torch_threads"}
    assert record["device_name"] == info["processor"]
    # one description of packages and devices: no second copy of the version/platform fields
    assert not {"torch", "numpy", "platform", "cuda_version"} & set(record)
