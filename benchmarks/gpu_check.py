"""Everything the toolkit claims for CUDA, checked and timed in one run on one GPU.

    python benchmarks/gpu_check.py --out results/          # on a machine with CUDA
    python benchmarks/gpu_check.py --dry-run --out /tmp/x  # every step at toy size on the CPU

``benchmarks/gpu_check.sh`` is the same with the install in front of it (for a fresh clone on a
GPU machine). Steps, in the order they run (the most telling first, so that a run cut short by
its time limit still says the most):

``tests``            the tests marked ``gpu`` (``pytest -m gpu``): pass/fail/skip counts.
``fit_mle``          ``fit_mle`` on Rician IVIM voxels (Epstein's protocol, SNR 30) on the GPU,
                     and the same call on this machine's CPU on fewer voxels, in voxels/s and
                     their ratio.
``unet``             the shipped QSM design (``graf`` preset, 16 channels, 2 input channels) on a
                     160^3 volume: whole-volume inference (float32), and one training epoch of
                     the shipped recipe (24 patches of 32^3 in batches of 2, AdamW).
``qsm_sources``      Oh et al. (2022) on the U-Net: with every source at its baseline (seeded
                     init and batch order, deterministic algorithms, cuDNN benchmark off,
                     float32) two trainings give identical losses step by step; then one source
                     changed at a time (cuDNN benchmark on, deterministic off, bfloat16 and
                     float16 autocast) over ``repeats`` seeds, with paired t-tests of the
                     held-out NRMSE against the baseline (Bonferroni over the sources).
``qsm_study``        the tiny QSM label study (U-Nets trained through the toolkit's own QSM
                     training) with ``--device cuda``: that it runs, and its wall time.
``study``            the default label study with ``--device cuda``: wall time, and whether
                     ``summary.csv`` is byte-identical to a second identical run.
``reproducibility``  the IVIM reproducibility study with its baseline on the GPU
                     (``--config reproducibility --set baseline.device=cuda``).

Every figure goes to ``gpu_check.json`` and ``gpu_check.md`` under ``--out``; both are rewritten
after each step, so a run stopped early keeps what it measured. A step that fails records its
error and the next one runs. Without CUDA (and without ``--dry-run``) it exits at once with
status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = ("tests", "fit_mle", "unet", "study", "qsm_sources", "reproducibility", "qsm_study")

#: full size on a GPU, toy size for the CPU dry run
SIZES = {
    "full": {"fit_voxels": 1_000_000, "cpu_fit_voxels": 100_000, "unet_size": 160, "unet_channels": 16,
             "patch": 32, "epoch_samples": 24, "baseline_steps": 1000, "source_steps": 200, "source_size": 48, "source_repeats": 3,
             "study_config": None, "study_timeout": 240, "repro_repeats": 2, "repro_timeout": 240},
    "dry": {"fit_voxels": 2_000, "cpu_fit_voxels": 500, "unet_size": 32, "unet_channels": 4,
            "patch": 16, "epoch_samples": 4, "baseline_steps": 6, "source_steps": 4, "source_size": 16, "source_repeats": 2,
            "study_config": "tiny_ivim", "study_timeout": 240, "repro_repeats": 2, "repro_timeout": 240},
}

TARGETS = {"fit_mle_voxels_per_s": 2e6, "unet_inference_s": 0.5, "study_wall_s": 60.0}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_tests(ctx: dict) -> dict:
    """Runs every test marked ``gpu`` and reads pytest's closing counts."""
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                   if "pytest.mark.gpu" in p.read_text() or "needs_cuda" in p.read_text())
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=ctx["budget_s"])
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    # pytest's closing line: "5 passed, 10 deselected in 29.6s"
    counts = {word: int(n) for line in tail[-3:]
              for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)\b", line)}
    return {"files": files, "returncode": proc.returncode, "counts": counts, "seconds": time.perf_counter() - t0,
            "tail": tail}


def _ivim_data(n: int, seed: int = 0):
    from qmri_labels.data import EPSTEIN_BVALUES, DatasetSpec

    return DatasetSpec(model="ivim", protocol=EPSTEIN_BVALUES, snr=30.0, noise="rician", n=n, seed=seed).generate()


def _time_fit(data, device: str, repeats: int) -> float:
    from qmri_labels.fitting import fit_mle

    fit_mle(data.signals[:2000], data.protocol, sigma=data.sigma[:2000], device=device)  # warm-up
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fit = fit_mle(data.signals, data.protocol, sigma=data.sigma, device=device)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    if not fit.valid.mean() > 0.99:
        raise RuntimeError(f"fit_mle on {device}: only {fit.valid.mean():.3f} of the voxels are valid")
    return best


def step_fit_mle(ctx: dict) -> dict:
    import torch

    size = ctx["size"]
    data = _ivim_data(size["fit_voxels"])
    gpu_s = _time_fit(data, ctx["device"], repeats=2)
    cpu_n = size["cpu_fit_voxels"]
    cpu_data = _ivim_data(cpu_n, seed=1)
    cpu_s = _time_fit(cpu_data, "cpu", repeats=1)
    gpu_rate, cpu_rate = size["fit_voxels"] / gpu_s, cpu_n / cpu_s
    return {"voxels": size["fit_voxels"], "seconds": gpu_s, "voxels_per_s": gpu_rate,
            "cpu_voxels": cpu_n, "cpu_seconds": cpu_s, "cpu_voxels_per_s": cpu_rate,
            "cpu_threads": torch.get_num_threads(), "ratio_gpu_over_cpu": gpu_rate / cpu_rate,
            "target_voxels_per_s": TARGETS["fit_mle_voxels_per_s"],
            "target_met": bool(gpu_rate >= TARGETS["fit_mle_voxels_per_s"]) if not ctx["dry"] else None}


def _unet(channels: int, in_channels: int = 2):
    from qmri_labels.nets.unet3d import UNet3D, unet3d_preset

    return UNet3D(unet3d_preset("graf", init_channels=channels, in_channels=in_channels))


def _random_heads(n: int, size: int, seed: int):
    """Smooth random susceptibility in a spherical brain mask and its local field, (n, 1, s, s, s)."""
    import torch

    from qmri_labels.physics.qsm import forward_field

    g = torch.Generator().manual_seed(seed)
    chi = torch.randn(n, 1, size, size, size, generator=g)
    kernel = torch.ones(1, 1, 5, 5, 5) / 125.0
    chi = torch.nn.functional.conv3d(chi, kernel, padding=2) * 0.5
    axis = torch.linspace(-1, 1, size)
    zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
    mask = ((xx ** 2 + yy ** 2 + zz ** 2) < 0.8).float().expand_as(chi).contiguous()
    chi = chi * mask
    field = torch.from_numpy(forward_field(chi[:, 0].numpy())).float().reshape_as(chi) * mask
    return field, chi, mask


def step_unet(ctx: dict) -> dict:
    import torch

    size, device = ctx["size"], ctx["device"]
    s = size["unet_size"]
    torch.manual_seed(0)
    net = _unet(size["unet_channels"]).to(device).eval()
    x = torch.randn(1, 2, s, s, s, device=device)
    with torch.no_grad():
        for _ in range(2):
            net(x)  # warm-up (cuDNN picks its kernels)
        _sync(device)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            net(x)
            _sync(device)
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    # one epoch of the shipped recipe: samples_per_epoch patches, batches of 2, AdamW 1e-3 / 0.01
    p, n_samples = size["patch"], size["epoch_samples"]
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    field, chi, mask = _random_heads(2, p, seed=1)
    inputs = torch.cat([field, field], 1).to(device)
    chi, mask = chi.to(device), mask.to(device)

    def epoch():
        for _ in range(n_samples // 2):
            opt.zero_grad(set_to_none=True)
            loss = ((net(inputs) - chi).abs() * mask).mean()
            loss.backward()
            opt.step()

    epoch()  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    epoch()
    _sync(device)
    epoch_s = time.perf_counter() - t0
    inference_s = float(sorted(times)[len(times) // 2])
    return {"size": s, "init_channels": size["unet_channels"], "parameters": sum(q.numel() for q in net.parameters()),
            "inference_s_median": inference_s, "inference_s_min": min(times), "inference_peak_gib": peak,
            "epoch_patches": n_samples, "patch": p, "epoch_s": epoch_s,
            "target_inference_s": TARGETS["unet_inference_s"],
            "target_met": bool(inference_s <= TARGETS["unet_inference_s"]) if not ctx["dry"] else None}


# --- Oh et al. (2022) sources on the U-Net -----------------------------------------------------

SOURCES = {
    "baseline": {},
    "cudnn_benchmark=true": {"benchmark": True},
    "deterministic=false": {"deterministic": False},
    "dtype=bfloat16": {"autocast": "bfloat16"},
    "dtype=float16": {"autocast": "float16"},
}


def _train_source(ctx: dict, seed: int, deterministic=True, benchmark=False, autocast=None, steps=None):
    """Trains the U-Net for ``steps`` (default ``source_steps``) steps under one setting;
    (losses, held-out NRMSE per head)."""
    import numpy as np
    import torch

    size, device = ctx["size"], ctx["device"]
    prev = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic)
    # warn_only: an op without a deterministic kernel (max-pooling's backward on CUDA) warns
    # instead of stopping the run; the warnings are recorded and the bitwise check says the rest
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cudnn.deterministic = deterministic
    caught = warnings.catch_warnings(record=True)
    log = caught.__enter__()
    warnings.simplefilter("always")
    try:
        s = size["source_size"]
        heads = ctx.setdefault("_heads", {})  # one set of heads per volume size, shared by every source
        if s not in heads:
            heads[s] = _random_heads(8, s, 7)
        field, chi, mask = heads[s]
        train_idx, test_idx = torch.arange(6), torch.arange(6, 8)
        torch.manual_seed(seed)
        net = _unet(size["unet_channels"], in_channels=1).to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
        order = torch.Generator().manual_seed(seed + 1)
        losses = []
        f, c, m = field.to(device), chi.to(device), mask.to(device)
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(autocast)
        scaler = torch.amp.GradScaler("cuda", enabled=autocast == "float16" and device.startswith("cuda"))
        for _ in range(steps or size["source_steps"]):
            batch = train_idx[torch.randperm(6, generator=order)[:2]].to(device)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.split(":")[0], dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = ((net(f[batch]) - c[batch]).abs() * m[batch]).mean()
            scaler.scale(loss.float()).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(float(loss.detach().float()))
        net.eval()
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        torch.use_deterministic_algorithms(True)
        with torch.no_grad():
            pred = net(f[test_idx]).float()
        err = ((pred - c[test_idx]) * m[test_idx]).flatten(1).norm(dim=1) / (c[test_idx] * m[test_idx]).flatten(1).norm(dim=1)
        nondeterministic = sorted({str(w.message).split(" does not have")[0] for w in log
                                   if "deterministic" in str(w.message)})
        ctx.setdefault("_nondeterministic_ops", set()).update(nondeterministic)
        return np.array(losses), (100.0 * err).cpu().numpy()
    finally:
        caught.__exit__(None, None, None)
        torch.use_deterministic_algorithms(prev[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = prev[1], prev[2]


def step_qsm_sources(ctx: dict) -> dict:
    import numpy as np
    from scipy import stats

    size = ctx["size"]
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    a_loss, a_err = _train_source(ctx, seed=0, steps=size["baseline_steps"])
    b_loss, b_err = _train_source(ctx, seed=0, steps=size["baseline_steps"])
    baseline = {"steps": size["baseline_steps"], "losses_identical": bool(np.array_equal(a_loss, b_loss)),
                "outputs_identical": bool(np.array_equal(a_err, b_err)),
                "max_abs_loss_diff": float(np.max(np.abs(a_loss - b_loss)))}
    rows, errors = [], {name: [] for name in SOURCES}
    for r in range(size["source_repeats"]):
        base_loss = None
        for name, change in SOURCES.items():
            try:
                loss, err = _train_source(ctx, seed=100 + r, **change)
            except Exception as exc:  # a dtype the device lacks: recorded, the other sources run
                rows.append({"source": name, "repeat": r, "error": f"{type(exc).__name__}: {exc}"})
                continue
            if name == "baseline":
                base_loss = loss
            errors[name].append(err)
            rows.append({"source": name, "repeat": r, "final_loss": float(loss[-1]),
                         "losses_identical_to_baseline": bool(base_loss is not None and np.array_equal(loss, base_loss)),
                         "first_divergent_step": int(np.argmax(loss != base_loss)) if base_loss is not None
                         and not np.array_equal(loss, base_loss) else None,
                         "nrmse_mean": float(err.mean())})
    tests = []
    base = np.concatenate(errors["baseline"]) if errors["baseline"] else np.array([])
    n_tests = len(SOURCES) - 1
    for name in SOURCES:
        if name == "baseline" or len(errors[name]) != len(errors["baseline"]) or base.size < 2:
            continue
        other = np.concatenate(errors[name])
        t, p = stats.ttest_rel(other, base)
        same = sum(bool(r.get("losses_identical_to_baseline")) for r in rows if r["source"] == name)
        tests.append({"source": name, "n_pairs": int(base.size), "repeats_with_identical_losses": same, "nrmse_diff_mean": float((other - base).mean()),
                      "p": float(p) if np.isfinite(p) else None,
                      "p_bonferroni": float(min(1.0, p * n_tests)) if np.isfinite(p) else None,
                      "significant": bool(np.isfinite(p) and p * n_tests < 0.05)})
    return {"baseline": baseline, "runs": rows, "paired_tests": tests, "volume": size["source_size"],
            "source_steps": size["source_steps"],
            "ops_without_deterministic_kernel": sorted(ctx.get("_nondeterministic_ops", ())),
            "repeats": size["source_repeats"]}


def _run_cli(args: list[str], out: Path, timeout: float, env_extra: dict | None = None) -> tuple[float, int, str]:
    env = {**os.environ, "QMRI_LABELS_CACHE": str(out / "cache"), **(env_extra or {})}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "qmri_labels.study", *args], cwd=out, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return time.perf_counter() - t0, proc.returncode, (proc.stdout + proc.stderr)[-3000:]


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def step_study(ctx: dict) -> dict:
    size, work = ctx["size"], ctx["work"]
    args = ["--alpha", "0.5", "--device", ctx["device"], "--quiet"]
    if size["study_config"]:
        args = ["--config", size["study_config"], *args]
    runs = []
    for k in (1, 2):
        out = work / f"study{k}"
        out.mkdir(parents=True, exist_ok=True)
        wall, rc, tail = _run_cli([*args, "--out", str(out / "run")], out, size["study_timeout"])
        runs.append({"wall_s": wall, "returncode": rc, "summary_sha256": _sha256(out / "run" / "summary.csv"),
                     "tail": tail if rc else ""})
        if rc or (k == 1 and wall > ctx["deadline"] - time.time() - 60):
            break  # a failed run, or no time left for the second: say so rather than be cut off
    identical = len(runs) == 2 and runs[0]["summary_sha256"] is not None and \
        runs[0]["summary_sha256"] == runs[1]["summary_sha256"]
    return {"args": args, "runs": runs, "summary_identical": identical if len(runs) == 2 else None,
            "wall_s": runs[0]["wall_s"], "target_wall_s": TARGETS["study_wall_s"],
            "target_met": bool(runs[0]["wall_s"] <= TARGETS["study_wall_s"] and runs[0]["returncode"] == 0)
            if not ctx["dry"] else None}


def step_qsm_study(ctx: dict) -> dict:
    out = ctx["work"] / "qsm_study"
    out.mkdir(parents=True, exist_ok=True)
    args = ["--config", "tiny_qsm", "--device", ctx["device"], "--quiet", "--out", str(out / "run")]
    wall, rc, tail = _run_cli(args, out, min(300.0, ctx["budget_s"]), {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"})
    return {"args": args, "wall_s": wall, "returncode": rc, "results_sha256": _sha256(out / "run" / "results.csv"),
            "tail": tail if rc else ""}


def step_reproducibility(ctx: dict) -> dict:
    import pandas as pd

    size, work = ctx["size"], ctx["work"]
    out = work / "reproducibility"
    out.mkdir(parents=True, exist_ok=True)
    config = "tiny_reproducibility" if ctx["dry"] else "reproducibility"
    device = ctx["device"]
    args = ["--config", config, "--quiet", "--out", str(out / "run"), "--set", f"repeats={size['repro_repeats']}",
            "--set", f"baseline.device={device}"]
    if not ctx["dry"]:
        # the sources that are not the device itself, now relative to a GPU baseline
        args += ["--set", "training_sources=[init_seed, shuffle_seed, dtype=float64, dtype=bf16-mixed, "
                          "deterministic=false, cudnn_benchmark=true]",
                 "--set", "inference_sources=[dtype=float64, dtype=bf16-mixed, deterministic=false, "
                          "cudnn_benchmark=true]"]
    wall, rc, tail = _run_cli(args, out, size["repro_timeout"], {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"})
    result = {"args": args, "wall_s": wall, "returncode": rc, "tail": tail if rc else ""}
    run = out / "run"
    if rc == 0:
        result["baseline"] = json.loads((run / "baseline.json").read_text())
        for name in ("training", "inference", "skipped"):
            if (run / f"{name}.csv").is_file():
                result[name] = pd.read_csv(run / f"{name}.csv").to_dict(orient="records")
    return result


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "cpu_count": os.cpu_count(), "machine": platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    try:
        from qmri_labels import __version__

        info["qmri_labels"] = __version__
    except ImportError:
        pass
    return info


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(results: dict) -> str:
    """The figures as one markdown page (the part of docs/performance.md this run updates)."""
    env = results["environment"]
    lines = [f"# GPU check ({'dry run on the CPU' if results['dry_run'] else env.get('gpu', '?')})", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, {env['cpu_count']} CPU cores; "
             f"`{results['command']}`", "", "| step | figure | value | target | met |", "| --- | --- | --- | --- | --- |"]

    def row(step, figure, value, target="", met=""):
        lines.append(f"| {step} | {figure} | {_fmt(value)} | {_fmt(target)} | {'' if met is None else _fmt(met)} |")

    steps = results["steps"]
    for name in STEPS:
        r = steps.get(name)
        if r is None:
            row(name, "not run", "", "", "")
            continue
        if "error" in r:
            row(name, "error", r["error"].replace("|", "/")[:200])
            continue
        if name == "tests":
            row(name, "pytest -m gpu", ", ".join(f"{v} {k}" for k, v in r["counts"].items()) or r["tail"][-1:])
        elif name == "fit_mle":
            row(name, f"voxels/s ({r['voxels']:,} voxels)", r["voxels_per_s"], r["target_voxels_per_s"], r["target_met"])
            row(name, f"CPU voxels/s ({r['cpu_voxels']:,} voxels, {r['cpu_threads']} threads)", r["cpu_voxels_per_s"])
            row(name, "GPU / CPU", r["ratio_gpu_over_cpu"])
        elif name == "unet":
            row(name, f"inference {r['size']}^3, s (median of 5)", r["inference_s_median"], r["target_inference_s"],
                r["target_met"])
            row(name, "inference peak GPU memory, GiB", r["inference_peak_gib"])
            row(name, f"one epoch ({r['epoch_patches']} patches of {r['patch']}^3), s", r["epoch_s"])
        elif name == "qsm_sources":
            b = r["baseline"]
            row(name, f"baseline twice, {b['steps']} steps: losses identical", b["losses_identical"], True,
                b["losses_identical"])
            row(name, "baseline twice: held-out outputs identical", b["outputs_identical"], True, b["outputs_identical"])
            for t in r["paired_tests"]:
                row(name, f"{t['source']} ({r['source_steps'] if 'source_steps' in r else ''} steps): repeats with "
                    f"losses identical to the baseline's, of {r['repeats']}", t["repeats_with_identical_losses"])
                row(name, f"{t['source']}: NRMSE change % (p Bonferroni, n={t['n_pairs']})",
                    f"{t['nrmse_diff_mean']:+.3f} (p {_fmt(t['p_bonferroni'])})", "", t["significant"])
            for run in r["runs"]:
                if "error" in run:
                    row(name, f"{run['source']} (repeat {run['repeat']})", run["error"][:120])
        elif name == "qsm_study":
            row(name, f"tiny QSM label study on {'cpu' if results['dry_run'] else 'cuda'}: wall time, s (rc {r['returncode']})",
                r["wall_s"], "", r["returncode"] == 0)
        elif name == "study":
            for k, run in enumerate(r["runs"], 1):
                row(name, f"run {k} wall time, s (rc {run['returncode']})", run["wall_s"],
                    r["target_wall_s"] if k == 1 else "", r["target_met"] if k == 1 else "")
            row(name, "summary.csv byte-identical over two runs", r["summary_identical"], True, r["summary_identical"])
        elif name == "reproducibility":
            row(name, f"wall time, s (rc {r['returncode']})", r["wall_s"])
            if "baseline" in r:
                for key, value in r["baseline"].items():
                    if isinstance(value, bool):
                        row(name, f"baseline: {key}", value, True, value)
                for t in r.get("training", []):
                    row(name, f"training {t.get('source')}: repeats with identical losses, of {t.get('repeats')}; "
                        "RMSE change (p Bonferroni)",
                        f"{t.get('losses_identical')}; {_fmt(t.get('mean_rmse_diff'))} ({_fmt(t.get('p_repeats_adjusted'))})",
                        "", t.get("significant_repeats"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"),
                        help="folder for gpu_check.json and gpu_check.md (default: $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="every step at toy size on the CPU")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 480)")
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); "
              "run it on a GPU machine, or use --dry-run for the CPU toy run", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    ctx = {"dry": args.dry_run, "device": "cpu" if args.dry_run else "cuda", "work": out / "work",
           "size": SIZES["dry" if args.dry_run else "full"], "deadline": start + args.budget}
    ctx["work"].mkdir(exist_ok=True)
    results = {"command": "python benchmarks/gpu_check.py" + (" --dry-run" if args.dry_run else ""),
               "dry_run": args.dry_run, "environment": environment(), "steps": {}}

    def save():
        results["elapsed_s"] = time.time() - start
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "gpu_check.md").write_text(markdown(results))

    for name in args.steps:
        left = ctx["deadline"] - time.time()
        if left < 20:
            results["steps"][name] = {"error": f"skipped: {left:.0f} s of the budget left"}
            save()
            continue
        ctx["budget_s"] = left
        print(f"[gpu_check] {name} ({left:.0f} s left)", flush=True)
        t0 = time.time()
        try:
            results["steps"][name] = globals()[f"step_{name}"](ctx)
        except Exception as exc:  # recorded: the remaining steps still run
            results["steps"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        results["steps"][name]["step_seconds"] = time.time() - t0
        save()
        print(json.dumps({k: v for k, v in results["steps"][name].items() if k not in ("runs", "tail", "training",
                          "inference", "skipped")}, default=str)[:1500], flush=True)
    print((out / "gpu_check.md").read_text())
    failed = [n for n, r in results["steps"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
