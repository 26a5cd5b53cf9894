"""Reproducibility study: the sources of irreproducibility of Oh et al. (2022), one at a time.

1. **Baseline.** Every source fixed (seed, mini-batch order, weight init, deterministic
   algorithms on, cuDNN benchmark off, float32, one device): the baseline is trained twice and
   the study checks that the training loss of the first ``steps`` steps, the weights and the
   inference output are bit-identical.
2. **Training.** For each repeat (a different base seed) and each training source, a network
   is trained with that one source changed; all networks are evaluated under the baseline
   inference settings (float32, CPU), which isolates the effect of training.
3. **Inference.** Each repeat's baseline network is run under each inference source changed.

Sources are given as ``init_seed`` / ``shuffle_seed`` (a different seed for that stream alone)
or ``name=value`` (``dtype=float64``, ``dtype=bf16-mixed``, ``deterministic=false``,
``cudnn_benchmark=true``, ``num_threads=2``, ``device=cuda``). Sources that cannot run here
(no GPU; cuDNN flags on a CPU) are skipped and the reason is written in the report.

Outputs under ``out``: ``baseline.json`` (the bitwise checks), ``training.csv`` and
``inference.csv`` (one row per source: bitwise agreement, test-error change, paired t-test
across repeats with Bonferroni over the sources), ``per_repeat.csv`` (paired t-tests over the
test samples of every repeat, Bonferroni within training and within inference),
``skipped.csv``, ``test_error.png``, ``loss_divergence.png``, ``report.md``, ``manifest.json``.

Run by name: ``python -m qmri_labels.study --config reproducibility``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import yaml

from qmri_labels.analysis.plots import save_figure
from qmri_labels.data.registry import load_dataset
from qmri_labels.estimators import train_network
from qmri_labels.fileio import write_json, write_text
from qmri_labels.training.reproducibility import (
    SOURCES,
    DeterminismSettings,
    bitwise_equal,
    device_name,
    run_inference,
    weights_equal,
)
from qmri_labels.workflows.common import (
    add_correction,
    markdown,
    merge_config,
    paired_test,
    per_sample_l2,
    run_manifest,
    say,
    write_csv,
)

DEFAULTS: dict = {
    "kind": "reproducibility",
    "title": "Sources of irreproducibility",
    "dataset": "ivim_epstein_snr30",
    "n_train": 2000,
    "n_test": 5000,
    "parameters": ["f", "D", "Dstar"],
    # early stopping is off (patience 0) so that every run trains for the same number of steps
    "network": {"label": "gt", "hidden_layers": 3, "width": None, "activation": "elu", "lr": 1e-3,
                "batch_size": 64, "val_fraction": 0.1},
    "steps": 1000,
    "repeats": 5,
    "baseline": {"seed": 0, "dtype": "float32", "deterministic": True, "cudnn_benchmark": False, "device": "cpu",
                 "num_threads": 1},
    "training_sources": ["init_seed", "shuffle_seed", "dtype=float64", "dtype=bf16-mixed", "deterministic=false",
                         "cudnn_benchmark=true", "num_threads=2", "device=cuda"],
    "inference_sources": ["dtype=float64", "dtype=bf16-mixed", "deterministic=false", "cudnn_benchmark=true",
                          "num_threads=2", "device=cuda"],
    "alpha": 0.05,
    "correction": "bonferroni",
}

#: sub-mappings of the config checked by their consumer (NetworkEstimator, DeterminismSettings), not against DEFAULTS
FREE_FORM_KEYS = ("network", "baseline")

#: offset of the "other" seed when a seed source is varied
SEED_OFFSET = 10_007


def parse_source(source: str) -> tuple[str, object]:
    """``"init_seed"`` -> ``("init_seed", None)``; ``"dtype=float64"`` -> ``("dtype", "float64")``."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"a source must be a non-empty string, got {source!r}")
    key, _, raw = source.partition("=")
    key = key.strip()
    if key not in SOURCES:
        raise ValueError(f"unknown source {key!r}; known: {', '.join(SOURCES)}")
    if key in ("init_seed", "shuffle_seed"):
        if raw:
            raise ValueError(f"{key} takes no value (a different seed is used for that stream)")
        return key, None
    if not raw:
        raise ValueError(f"source {key!r} needs a value, e.g. '{key}=...'")
    value = yaml.safe_load(raw)
    return key, value


def varied_settings(base: DeterminismSettings, source: str) -> DeterminismSettings:
    key, value = parse_source(source)
    if key == "init_seed":
        return base.replace(init_seed=base.resolved_init_seed + SEED_OFFSET)
    if key == "shuffle_seed":
        return base.replace(shuffle_seed=base.resolved_shuffle_seed + SEED_OFFSET)
    return base.replace(**{key: value})


def skip_reason(base: DeterminismSettings, varied: DeterminismSettings, source: str) -> str:
    """Why a variation cannot (or need not) run here; empty if it can."""
    ok, reason = varied.available()
    if not ok:
        return reason
    if varied == base:
        return "identical to the baseline settings"
    key, _ = parse_source(source)
    if key == "cudnn_benchmark" and varied.device == "cpu":
        return "cuDNN is not used on a CPU device: the flag has no effect there (needs a CUDA GPU)"
    return ""


def _max_epochs(n_train: int, network: Mapping, steps: int) -> int:
    val_fraction = float(network.get("val_fraction", 0.1))
    n_val = int(round(n_train * val_fraction))
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    rows = n_train - n_val
    per_epoch = -(-rows // int(network["batch_size"]))
    return max(1, -(-int(steps) // per_epoch))


def _rmse(errors: np.ndarray) -> float:
    return float(np.sqrt(np.nanmean(errors)))


def _first_divergence(a: np.ndarray, b: np.ndarray) -> float:
    n = min(a.size, b.size)
    diff = np.nonzero(a[:n] != b[:n])[0]
    return float(diff[0]) if diff.size else math.nan


def run(config: Mapping | None, out: Path, quiet: bool = False) -> dict:
    """Run the reproducibility study (see the module docstring).

    Parameters
    ----------
    config : mapping or None
        Entries over :data:`DEFAULTS` (a key it does not have is an error).
    out : Path
        Results folder.
    quiet : bool

    Returns
    -------
    dict
        ``baseline``, ``training``, ``inference``, ``per_repeat``, ``skipped``, ``figures``,
        ``summary_text``, ``manifest`` and ``out``.
    """
    return run_resolved(merge_config(DEFAULTS, config, FREE_FORM_KEYS), out, quiet)


def run_resolved(config: Mapping, out: Path, quiet: bool = False) -> dict:
    """:func:`run` of a configuration merged over :data:`DEFAULTS`: nothing is merged again.

    Parameters
    ----------
    config : mapping
        The complete configuration.
    out : Path
        Results folder.
    quiet : bool

    Returns
    -------
    dict
        As :func:`run`.
    """
    t0, started = time.perf_counter(), time.time()
    steps, repeats = int(config["steps"]), int(config["repeats"])
    if steps < 1 or repeats < 1:
        raise ValueError(f"steps and repeats must be >= 1, got {steps} and {repeats}")
    network = {k: v for k, v in dict(config["network"]).items() if k not in ("max_epochs", "patience")}
    base = DeterminismSettings.from_dict(dict(config["baseline"]))
    for source in list(config["training_sources"]) + list(config["inference_sources"]):
        parse_source(source)
    ok, reason = base.available()
    if not ok:
        raise ValueError(f"the baseline settings cannot run here: {reason}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)

    overrides = {"n": int(config["n_train"])} if config["n_train"] else {}
    train = load_dataset(config["dataset"], "train", **overrides)
    test = load_dataset(config["dataset"], "test", **({"n": int(config["n_test"])} if config["n_test"] else {}))
    network["max_epochs"] = _max_epochs(len(train), network, steps)
    network["patience"] = 0
    params = config["parameters"]
    infer_base = base.replace(seed=0)

    def train_run(settings):
        run_ = train_network(train, settings, **network)
        if run_.step_losses.size < steps:
            raise ValueError(f"training ran {run_.step_losses.size} steps, fewer than the {steps} compared")
        return run_

    def errors(net, settings=infer_base):
        pred = run_inference(net, test.signals, settings)
        return pred, per_sample_l2(pred, test, params)

    # 1. the baseline, twice
    say(quiet, f"baseline: two runs of {steps} steps ({network['max_epochs']} epochs) on {len(train)} rows")
    first, second = train_run(base), train_run(base)
    pred_1, _ = errors(first.network)
    pred_2, _ = errors(second.network)
    pred_1b, _ = errors(first.network)
    baseline_check = {
        "steps_compared": steps,
        "training_loss_identical": bitwise_equal(first.step_losses[:steps], second.step_losses[:steps]),
        "weights_identical": weights_equal(first.network, second.network),
        "inference_identical_between_runs": bitwise_equal(pred_1, pred_2),
        "inference_identical_repeated": bitwise_equal(pred_1, pred_1b),
        "first_divergent_step": _first_divergence(first.step_losses, second.step_losses),
        "final_loss": float(first.step_losses[steps - 1]),
        "settings": base.to_dict(),
        "determinism_record": first.record,
    }
    write_json(out / "baseline.json", baseline_check)
    say(quiet, f"  bit-identical: training loss {baseline_check['training_loss_identical']}, weights "
               f"{baseline_check['weights_identical']}, inference {baseline_check['inference_identical_between_runs']}")

    # which sources run here
    skipped, train_sources, infer_sources = [], [], []
    for phase, sources, keep in (("training", config["training_sources"], train_sources),
                                 ("inference", config["inference_sources"], infer_sources)):
        reference = base if phase == "training" else infer_base
        for source in sources:
            why = skip_reason(reference, varied_settings(reference, source), source)
            if why:
                skipped.append({"phase": phase, "source": source, "reason": why})
            else:
                keep.append(source)

    # 2. training sources and 3. inference sources, repeat by repeat
    train_rows, infer_rows, curves = [], [], {}
    for r in range(repeats):
        base_r = base.replace(seed=base.seed + r)
        baseline_run = first if r == 0 else train_run(base_r)
        base_pred, base_err = errors(baseline_run.network)
        say(quiet, f"repeat {r + 1}/{repeats}: baseline test RMSE {_rmse(base_err):.5f}")
        for source in train_sources:
            settings = varied_settings(base_r, source)
            varied = train_run(settings)
            pred, err = errors(varied.network)
            if r == 0:
                curves[source] = np.abs(varied.step_losses[:steps] - baseline_run.step_losses[:steps])
            train_rows.append({
                "source": source, "repeat": r, "baseline_rmse": _rmse(base_err), "varied_rmse": _rmse(err),
                "loss_identical": bitwise_equal(varied.step_losses[:steps], baseline_run.step_losses[:steps]),
                "weights_identical": weights_equal(varied.network, baseline_run.network),
                "output_identical": bitwise_equal(pred, base_pred),
                "first_divergent_step": _first_divergence(varied.step_losses, baseline_run.step_losses),
                "final_loss_diff": float(varied.step_losses[steps - 1] - baseline_run.step_losses[steps - 1]),
                **_per_sample_test(err, base_err, source),
                "device_name": varied.record["device_name"],
            })
            say(quiet, f"  train  {source:22s} test RMSE {_rmse(err):.5f}")
        for source in infer_sources:
            settings = varied_settings(infer_base, source)
            pred, err = errors(baseline_run.network, settings)
            scale = np.abs(base_pred).max(axis=0)
            infer_rows.append({
                "source": source, "repeat": r, "baseline_rmse": _rmse(base_err), "varied_rmse": _rmse(err),
                "output_identical": bitwise_equal(pred, base_pred),
                "max_rel_output_diff": float(np.max(np.abs(pred - base_pred) / np.where(scale > 0, scale, 1))),
                **_per_sample_test(err, base_err, source),
                "device_name": device_name(settings.device),
            })
            say(quiet, f"  infer  {source:22s} test RMSE {_rmse(err):.5f}")

    alpha, correction = float(config["alpha"]), config["correction"]
    per_repeat = []
    for phase, rows in (("training", train_rows), ("inference", infer_rows)):
        frame = pd.DataFrame(rows)
        if len(frame):
            frame = add_correction(frame, alpha, correction)
            frame.insert(0, "phase", phase)
        per_repeat.append(frame)
    per_repeat = pd.concat(per_repeat, ignore_index=True) if any(len(f) for f in per_repeat) else pd.DataFrame()
    training = _summarise(per_repeat, "training", alpha, correction)
    inference = _summarise(per_repeat, "inference", alpha, correction)
    skipped = pd.DataFrame(skipped, columns=["phase", "source", "reason"])

    write_csv(out / "per_repeat.csv", per_repeat)
    write_csv(out / "training.csv", training)
    write_csv(out / "inference.csv", inference)
    write_csv(out / "skipped.csv", skipped)
    figures = _figures(per_repeat, curves, out)
    report = _report_text(config, baseline_check, training, inference, skipped, steps, repeats, len(train), len(test))
    write_text(out / "report.md", report)
    manifest = run_manifest("reproducibility", config, started, t0,
                            data_fingerprints={"train": train.fingerprint, "test": test.fingerprint},
                            baseline=baseline_check, skipped=skipped.to_dict("records"))
    write_json(out / "manifest.json", manifest)
    summary = _summary_text(baseline_check, training, inference, skipped)
    say(quiet, summary)
    return {"out": str(out), "baseline": baseline_check, "training": training, "inference": inference,
            "per_repeat": per_repeat, "skipped": skipped, "figures": [str(f) for f in figures], "summary_text": summary,
            "manifest": manifest}


def _per_sample_test(err: np.ndarray, base_err: np.ndarray, source: str) -> dict:
    """Paired t-test over the test samples: varied minus baseline per-sample error."""
    stats = paired_test(err, base_err, source, "baseline")
    return {"n_test": stats["n"], "mean_diff": stats["mean_diff"], "t": stats["t"], "p_value": stats["p_value"]}


def _summarise(per_repeat: pd.DataFrame, phase: str, alpha: float, correction: str) -> pd.DataFrame:
    """One row per source: agreement counts, test-error change, paired t-test across repeats."""
    if not len(per_repeat):
        return pd.DataFrame()
    frame = per_repeat[per_repeat["phase"] == phase]
    rows = []
    for source, group in frame.groupby("source", sort=False):
        row = {"source": source, "repeats": len(group),
               "outputs_identical": int(group["output_identical"].sum()),
               "baseline_rmse": float(group["baseline_rmse"].mean()), "varied_rmse": float(group["varied_rmse"].mean()),
               "mean_rmse_diff": float((group["varied_rmse"] - group["baseline_rmse"]).mean()),
               "mean_abs_rmse_diff": float((group["varied_rmse"] - group["baseline_rmse"]).abs().mean()),
               "repeats_sig_per_sample": int(group["significant"].sum())}
        if phase == "training":
            row["losses_identical"] = int(group["loss_identical"].sum())
            row["weights_identical"] = int(group["weights_identical"].sum())
            row["median_first_divergent_step"] = float(np.nanmedian(group["first_divergent_step"])) \
                if np.isfinite(group["first_divergent_step"]).any() else math.nan
        else:
            row["max_rel_output_diff"] = float(group["max_rel_output_diff"].max())
        stats = paired_test(group["varied_rmse"].to_numpy(), group["baseline_rmse"].to_numpy(), source, "baseline")
        row.update(t_repeats=stats["t"], p_repeats=stats["p_value"])
        rows.append(row)
    table = pd.DataFrame(rows)
    table = table.rename(columns={"p_repeats": "p_value"})
    table = add_correction(table, alpha, correction)
    return table.rename(columns={"p_value": "p_repeats", "p_adjusted": "p_repeats_adjusted",
                                 "significant": "significant_repeats"})


def _figures(per_repeat: pd.DataFrame, curves: dict, out: Path) -> list:
    # pyplot is imported when a figure is drawn, after the backend is chosen
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    written = []
    if len(per_repeat):
        phases = [p for p in ("training", "inference") if (per_repeat["phase"] == p).any()]
        fig, axes = plt.subplots(1, len(phases), figsize=(5.5 * len(phases), 4), squeeze=False)
        for ax, phase in zip(axes[0], phases):
            frame = per_repeat[per_repeat["phase"] == phase]
            sources = list(dict.fromkeys(frame["source"]))
            diffs = [(frame[frame.source == s]["varied_rmse"] - frame[frame.source == s]["baseline_rmse"]).to_numpy()
                     for s in sources]
            for i, d in enumerate(diffs):
                ax.scatter(np.full(d.size, i), d, s=18, alpha=0.8)
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xticks(range(len(sources)), sources, rotation=30, ha="right")
            ax.set_ylabel("test RMSE (varied - baseline)")
            ax.set_title(f"{phase}: one source varied, per repeat", fontsize=10)
        fig.tight_layout()
        written.append(save_figure(fig, out / "test_error.png"))
        plt.close(fig)
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for source, diff in curves.items():
            steps = np.arange(1, diff.size + 1)
            ax.plot(steps, np.where(diff > 0, diff, np.nan), lw=0.8, label=source)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("|loss - baseline loss| (0 not drawn)")
        ax.set_title("Divergence of the training loss from the baseline (repeat 1)", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(save_figure(fig, out / "loss_divergence.png"))
        plt.close(fig)
    return written


def _report_text(config, check, training, inference, skipped, steps, repeats, n_train, n_test) -> str:
    yes = lambda v: "yes" if v else "NO"  # noqa: E731
    lines = [f"# {config['title']}", "",
             f"Dataset `{config['dataset']}` ({n_train} training rows, {n_test} test rows); {steps} training steps; "
             f"{repeats} repeats (base seeds {config['baseline']['seed']}..{config['baseline']['seed'] + repeats - 1}). "
             "Test error: normalised RMSE over "
             f"{config['parameters']}; every network is evaluated under the baseline inference settings.", "",
             "## Baseline (everything fixed), two runs", "",
             f"- training loss of the first {steps} steps bit-identical: {yes(check['training_loss_identical'])}",
             f"- weights bit-identical: {yes(check['weights_identical'])}",
             f"- inference output bit-identical: {yes(check['inference_identical_between_runs'])}",
             f"- settings: `{check['settings']}` on {check['determinism_record']['device_name']}", ""]
    cols_t = ["source", "repeats", "losses_identical", "weights_identical", "outputs_identical",
              "median_first_divergent_step", "baseline_rmse", "varied_rmse", "mean_rmse_diff", "mean_abs_rmse_diff",
              "t_repeats", "p_repeats", "p_repeats_adjusted", "repeats_sig_per_sample"]
    cols_i = ["source", "repeats", "outputs_identical", "max_rel_output_diff", "baseline_rmse", "varied_rmse",
              "mean_rmse_diff", "t_repeats", "p_repeats", "p_repeats_adjusted", "repeats_sig_per_sample"]
    lines += ["## Training: one source varied", "",
              "`p_repeats`: paired t-test of the test RMSE across repeats (varied vs baseline), "
              f"{config['correction']} over the sources; `repeats_sig_per_sample`: repeats in which a paired t-test "
              "over the test samples is significant after correction over all repeats and sources.", "",
              markdown(training[[c for c in cols_t if c in training]]) if len(training) else "(no source ran)", "",
              "## Inference: the baseline network run with one source varied", "",
              markdown(inference[[c for c in cols_i if c in inference]]) if len(inference) else "(no source ran)", ""]
    if len(skipped):
        lines += ["## Skipped", ""] + [f"- {r.phase} `{r.source}`: {r.reason}" for r in skipped.itertuples()] + [""]
    return "\n".join(lines) + "\n"


def _summary_text(check, training, inference, skipped) -> str:
    lines = [f"baseline bit-identical over {check['steps_compared']} steps: loss {check['training_loss_identical']}, "
             f"weights {check['weights_identical']}, inference {check['inference_identical_between_runs']}"]
    for name, table in (("training", training), ("inference", inference)):
        for r in table.itertuples():
            lines.append(f"  {name:9s} {r.source:22s} identical outputs {r.outputs_identical}/{r.repeats}, "
                         f"mean |dRMSE| {abs(r.mean_rmse_diff):.2e}, p(repeats) {r.p_repeats:.3g}, "
                         f"significant per-sample in {r.repeats_sig_per_sample}/{r.repeats} repeats")
    for r in skipped.itertuples():
        lines.append(f"  skipped {r.phase} {r.source}: {r.reason}")
    return "\n".join(lines)
