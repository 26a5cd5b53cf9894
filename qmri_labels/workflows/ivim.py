"""Label comparison for voxel-wise models (IVIM by default): which training label is best?

One run of :func:`run`:

1. simulates the training set (Epstein et al.'s prior and protocol, Rician noise) and a
   held-out test set from the same prior;
2. computes MLE labels of the noisy training signals (cached by dataset fingerprint);
3. trains one network per label: ``gt``, ``mle``, ``self`` and ``hybrid`` for each alpha,
   all from the same initial weights and batch order, so that only the label differs;
4. evaluates every network and the MLE fitter on a grid of true parameters with noise
   repeats (bias, SD, RMSE, sensitivity, ...; :mod:`qmri_labels.analysis`), the calibration
   of the SDs they report (the MLE's Fisher SEs, the networks' heteroscedastic heads or
   ensembles; coverage, interval width, CRPS, z_rms; :mod:`qmri_labels.analysis.calibration`)
   in the same pass, and the held-out set;
5. writes ``summary.csv``, ``heldout.csv``, ``report.md`` with figures, ``grid.csv``, the
   trained networks as model bundles under ``networks/``, and ``manifest.json``.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch

from qmri_labels.analysis import GridSpec, summarize, write_report
from qmri_labels.analysis.fairness import seed_findings, seed_summary, tuned_vs_default
from qmri_labels.analysis.grid import evaluate_snrs, grid_snrs
from qmri_labels.analysis.report import add_calibration
from qmri_labels.data.datasets import EPSTEIN_BVALUES, DatasetSpec, snr_setting
from qmri_labels.data.priors import UniformPrior
from qmri_labels.estimators import UNCERTAINTY_KINDS, MLEEstimator, NetworkEstimator
from qmri_labels.fileio import atomic_write_bytes, write_json
from qmri_labels.physics import display_unit
from qmri_labels.provenance import device_info, package_versions
from qmri_labels.training import ParameterNormalisation, compute_mle_labels, method_name, uses_shared_mle_labels
from qmri_labels.training.labels import STUDY_LABELS
from qmri_labels.threads import torch_threads
from qmri_labels.workflows.common import merge_config
from qmri_labels.workflows.jobs import resolve_workers
from qmri_labels.workflows.label_fairness import (
    NETWORK_DEFAULTS,
    TUNE_DEFAULTS,
    check_seeds,
    check_tune,
    resolve_network,
    seeds_section,
    train_designs,
    trials_table,
    tuning_section,
)

DEFAULTS: dict[str, Any] = {
    "kind": "ivim_labels",
    "title": "Training labels for IVIM: GT, MLE, self-supervised and hybrid",
    "model": "ivim",
    "bvalues": list(EPSTEIN_BVALUES),
    # a number, or a per-voxel range [low, high] / {low, high, distribution: uniform|loguniform}
    "snr": 30.0,
    "noise": "rician",
    # parameter prior of the training and test data (None: Epstein et al.'s uniform prior)
    "prior": None,
    "n_train": 100_000,
    "n_test": 5_000,
    "seed": 0,
    # labels trained besides one hybrid network per alpha
    "labels": ["gt", "mle", "self"],
    "alpha": [0.5],
    # network design (NetworkEstimator keywords; preset: a named design such as "ivimnet")
    "network": dict(NETWORK_DEFAULTS),
    "lr": 1e-3,
    "batch_size": 256,
    "max_epochs": 100,
    "patience": 10,
    "val_fraction": 0.1,
    # reported SDs of the networks, for the calibration section: "variance_head" (default: a
    # log-variance branch trained with the label's likelihood at the detached mean; the point
    # estimates stay bit-identical to plain networks', so the label comparison is unchanged and
    # every method reports SDs), None (plain networks; only the MLE reports SDs),
    # "heteroscedastic" (the likelihood trains the mean too, which reweights the voxels and so
    # changes the point estimates); n_members: deep-ensemble members per method (each one a training)
    "uncertainty": "variance_head",
    "n_members": 1,
    # fitter of the MLE labels and of the fit-mle reference: sigma ("known": the simulated one),
    # n_starts (None: fit_mle's default), bounds ((2, P) list in the model's order; None: defaults)
    "mle": {"sigma": "known", "n_starts": None, "bounds": None},
    # evaluation grid over (f, D, Dstar) spanning the prior, S0 = 1; snr: one or a list of test
    # SNRs (null: the training SNR, or the ends of a training SNR range)
    "grid": {"points_per_axis": 10, "repeats": 200, "margin": 0.05, "snr": None},
    # per-label tuning with an equal budget (n_trials 0: none); see qmri_labels.search.tuning
    "tune": dict(TUNE_DEFAULTS),
    # training runs per method with different weight init and batch order
    "seeds": 1,
    "device": "cpu",
    "num_threads": 1,
    # processes that train networks side by side ("auto": the usable CPU cores / num_threads; 1 on
    # a GPU); the results do not depend on it
    "workers": "auto",
    "deterministic": True,
    "save_networks": True,
    "figures": True,
    # figure files: "png" or "pdf"
    "figure_format": "png",
}

#: sub-mappings of the config checked by their consumer (NetworkEstimator), not against DEFAULTS
FREE_FORM_KEYS = ("network",)


def resolve_config(config: Mapping | None) -> dict:
    """Defaults merged with ``config`` (the one merge), checked; raises ``ValueError`` naming a bad entry."""
    return check_config(merge_config(DEFAULTS, config, FREE_FORM_KEYS))


def check_config(config: Mapping) -> dict:
    """A configuration merged over :data:`DEFAULTS`, checked and normalised (a new dict; ``config``
    is left as it is); raises ``ValueError`` naming a bad entry."""
    cfg = copy.deepcopy(dict(config))
    if cfg["figure_format"] not in ("png", "pdf"):
        raise ValueError(f"figure_format must be 'png' or 'pdf', got {cfg['figure_format']!r}")
    if cfg["kind"] != "ivim_labels":
        raise ValueError(f"kind must be 'ivim_labels' for this workflow, got {cfg['kind']!r}")
    alphas = cfg["alpha"]
    alphas = [] if alphas is None else list(np.atleast_1d(alphas).tolist())
    for a in alphas:
        if not (isinstance(a, (int, float)) and 0.0 <= float(a) <= 1.0):
            raise ValueError(f"alpha values must lie in [0, 1], got {a!r}")
    cfg["alpha"] = [float(a) for a in dict.fromkeys(alphas)]
    labels = list(cfg["labels"] or [])
    bad = [lab for lab in labels if lab not in STUDY_LABELS]
    if bad:
        raise ValueError(f"labels must be among {STUDY_LABELS} (hybrids come from alpha), got {bad}")
    cfg["labels"] = list(dict.fromkeys(labels))
    if not cfg["labels"] and not cfg["alpha"]:
        raise ValueError("nothing to train: labels and alpha are both empty")

    if cfg["uncertainty"] not in UNCERTAINTY_KINDS:
        raise ValueError(f"uncertainty must be one of {UNCERTAINTY_KINDS}, got {cfg['uncertainty']!r}")
    for key in ("n_train", "n_test", "batch_size", "max_epochs", "n_members"):
        if int(cfg[key]) != cfg[key] or cfg[key] < 1:
            raise ValueError(f"{key} must be a positive integer, got {cfg[key]!r}")
        cfg[key] = int(cfg[key])

    cfg["snr"] = snr_setting(cfg["snr"])
    unknown = set(cfg["grid"]) - set(DEFAULTS["grid"])
    if unknown:
        raise ValueError(f"unknown grid options {sorted(unknown)}; known: {sorted(DEFAULTS['grid'])}")
    if cfg["grid"]["snr"] is None:
        cfg["grid"]["snr"] = ([cfg["snr"]] if not isinstance(cfg["snr"], dict)
                              else [cfg["snr"]["low"], cfg["snr"]["high"]])
    cfg["grid"]["snr"] = grid_snrs(cfg["grid"]["snr"])
    cfg["tune"] = check_tune(cfg)
    cfg["seeds"] = check_seeds(cfg["seeds"])

    # the value is checked here (the device when the study runs); the free cores are measured only then
    resolve_workers(cfg["workers"], "cpu", cfg["num_threads"], busy=0.0)
    resolve_network(cfg, DEFAULTS)  # checks the network options
    cfg["bvalues"] = [float(b) for b in np.atleast_1d(cfg["bvalues"])]
    cfg["seed"] = int(cfg["seed"])
    return cfg


def _device(name: str | None) -> tuple[str, Any, str]:
    """(Lightning accelerator, devices, torch device) for a device string."""
    name = (name or "cpu").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") or name == "gpu":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        return "gpu", [index], f"cuda:{index}"
    if name != "cpu":
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {name!r}")
    return "cpu", 1, "cpu"


def _needs_mle(estimator) -> bool:
    return uses_shared_mle_labels(estimator.label, estimator.alpha, estimator.weights)


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, flush=True)


def heldout_metrics(pred: np.ndarray, dataset) -> dict:
    """RMSE, mean absolute error and bias per parameter, plus the normalised RMSE averaged over
    the parameters other than the signal scale, of ``pred`` on ``dataset``."""
    names = list(dataset.param_names)
    norm = ParameterNormalisation.from_support(dataset.prior_support, names)
    err = pred.astype(np.float64) - dataset.theta_true.astype(np.float64)
    ok = np.all(np.isfinite(err), axis=1)
    err = err[ok]
    out = {"n": int(ok.sum()), "valid_fraction": float(ok.mean()),
           "rmse": {n: float(np.sqrt(np.mean(err[:, i] ** 2))) for i, n in enumerate(names)},
           "mae": {n: float(np.mean(np.abs(err[:, i]))) for i, n in enumerate(names)},
           "bias": {n: float(np.mean(err[:, i])) for i, n in enumerate(names)}}
    # RMSE / mean truth: the NRMSE of IVIM-NET's tables (Kaandorp et al. 2021)
    truth_mean = np.mean(dataset.theta_true.astype(np.float64)[ok], axis=0)
    out["nrmse_mean"] = {n: float(out["rmse"][n] / truth_mean[i]) if truth_mean[i] != 0 else float("nan")
                         for i, n in enumerate(names)}
    scale_index = dataset.model.scale_index
    tissue = [i for i in range(len(names)) if i != scale_index]
    nrmse = [out["rmse"][names[i]] / norm.scale[i] for i in tissue]
    out["mean_nrmse"] = float(np.mean(nrmse))
    return out


def summary_text(summary: pd.DataFrame, parameters=None) -> str:
    """Every method side by side, one block per parameter (the varied ones by default)."""
    frame = summary
    if parameters is None and "varied" in frame:
        parameters = list(dict.fromkeys(frame.loc[frame["varied"].astype(bool), "parameter"]))
    parameters = parameters or list(dict.fromkeys(frame["parameter"]))
    metrics = [m for m in ("mean_abs_bias", "mean_sd", "rmse", "sensitivity") if m in frame]
    headers = {"mean_abs_bias": "mean|bias|", "mean_sd": "mean SD", "rmse": "RMSE", "sensitivity": "sensitivity"}
    methods = list(dict.fromkeys(frame["method"]))
    width = max(len(m) for m in methods + ["method"]) + 2
    lines = []
    for p in parameters:
        sub = frame[frame["parameter"] == p].set_index("method")
        unit = sub["unit"].iloc[0] if "unit" in sub and len(sub) else ""
        lines.append(f"{p} [{display_unit(unit)}]".ljust(width) + "".join(f"{headers[m]:>13s}" for m in metrics))
        for method in methods:
            if method in sub.index:
                lines.append(method.ljust(width) + "".join(f"{sub.loc[method, m]:13.4g}" for m in metrics))
        lines.append("")
    return "\n".join(lines).rstrip()


def build_datasets(cfg: Mapping):
    """The training and held-out datasets of a resolved config."""
    prior = cfg["prior"] if cfg["prior"] is not None else UniformPrior(model=cfg["model"]).to_dict()
    spec = DatasetSpec(model=cfg["model"], protocol=tuple(cfg["bvalues"]), prior=prior, snr=cfg["snr"],
                       noise=cfg["noise"], n=cfg["n_train"], seed=cfg["seed"])
    # the held-out set draws from another seed stream of the same prior and noise
    heldout = spec.replace(n=cfg["n_test"], seed=cfg["seed"] + 1_000_003)
    return spec.generate(), heldout.generate()


def _evaluation_estimate(mle_labels, n_train: int, n_signals: int) -> float | None:
    """Seconds the evaluation will take, at the speed the MLE labels were fitted (the MLE fit of
    every grid and held-out signal dominates it); None without a timed MLE fit."""
    if mle_labels is None or not mle_labels.fit_seconds or n_train < 1:
        return None
    return float(mle_labels.fit_seconds) / n_train * n_signals


def make_estimators(cfg: Mapping, quiet: bool = True) -> dict:
    """Unfitted network estimators of a resolved config, by method name."""
    accelerator, devices, _ = _device(cfg["device"])
    common = resolve_network(cfg, DEFAULTS)
    common.update(val_fraction=cfg["val_fraction"], seed=cfg["seed"], uncertainty=cfg["uncertainty"],
                  n_members=cfg["n_members"],
                  accelerator=accelerator, devices=devices, deterministic=cfg["deterministic"],
                  num_threads=cfg["num_threads"], progress=not quiet,
                  mle_options=dict(cfg["mle"]))
    out = {}
    for label in cfg["labels"]:
        out[method_name(label)] = NetworkEstimator(label=label, **common)
    for alpha in cfg["alpha"]:
        out[method_name("hybrid", alpha)] = NetworkEstimator(label="hybrid", alpha=alpha, **common)
    return out


def run(config: Mapping | None, out: Path, quiet: bool = False) -> dict:
    """Run the label comparison described by ``config`` (merged over :data:`DEFAULTS`) and write
    the results into ``out``.

    Parameters
    ----------
    config : mapping or None
        Entries over :data:`DEFAULTS` (a key it does not have is an error).
    out : Path
        Results folder.
    quiet : bool

    Returns
    -------
    dict with ``summary`` (DataFrame), ``heldout`` (DataFrame), ``manifest`` (dict),
    ``summary_text`` (str), ``estimators`` (dict of fitted estimators) and ``out``.
    """
    return run_resolved(resolve_config(config), out, quiet)


def run_resolved(cfg: Mapping, out: Path, quiet: bool = False) -> dict:
    """:func:`run` of a configuration that :func:`resolve_config` (or :func:`check_config` of a
    merged one) made: nothing is merged again.

    Parameters
    ----------
    cfg : mapping
        The complete configuration.
    out : Path
        Results folder.
    quiet : bool

    Returns
    -------
    dict
        As :func:`run`.
    """
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    accelerator, devices, torch_device = _device(cfg["device"])
    defaults = make_estimators(cfg, quiet)
    tuning = cfg["tune"]["n_trials"] > 0
    n_seeds = cfg["seeds"]
    # datasets, MLE labels, a search per label, the trainings, evaluation, writing
    n_steps = 4 + len(defaults) * ((2 if tuning else 1) * n_seeds + int(tuning))
    step = 0

    def begin(message):
        nonlocal step
        step += 1
        _say(quiet, f"[{step}/{n_steps}] {message}")
        return time.perf_counter()

    snr_text = (f"SNR {cfg['snr']:g}" if not isinstance(cfg["snr"], dict) else
                f"SNR {cfg['snr']['low']:g}-{cfg['snr']['high']:g} ({cfg['snr']['distribution']} per voxel)")
    t = begin(f"simulating {cfg['n_train']:,} training and {cfg['n_test']:,} held-out signals "
              f"({cfg['model']}, {snr_text}, {cfg['noise']})")
    train, heldout = build_datasets(cfg)
    timings["datasets"] = time.perf_counter() - t

    needs_mle = any(_needs_mle(e) for e in defaults.values())
    mle_labels = None
    t = begin("MLE labels of the training signals" if needs_mle else "MLE labels not needed (no mle/hybrid net)")
    if needs_mle:
        mle_labels = compute_mle_labels(train, **cfg["mle"],
                                        device=torch_device, progress=not quiet)
        _say(quiet, f"      {'read from cache' if mle_labels.from_cache else 'fitted'}; "
                    f"{mle_labels.n_invalid} invalid fits left out")
    timings["mle_labels"] = time.perf_counter() - t

    workers = resolve_workers(cfg["workers"], str(torch_device), cfg["num_threads"])
    _say(quiet, f"      {workers} worker process{'es' if workers > 1 else ''} "
                f"({cfg['num_threads']} torch thread{'s' if cfg['num_threads'] != 1 else ''} each)")

    def report(message, detail=None):
        begin(message)
        if detail:
            _say(quiet, detail)

    grid_cfg = dict(cfg["grid"])
    snrs = grid_cfg["snr"]
    primary = min(snrs, key=lambda x: abs(np.log(x) - np.log(_centre_snr(cfg["snr"]))))
    grid = GridSpec.for_prior(train.prior_support, cfg["bvalues"], model=cfg["model"],
                              points_per_axis=grid_cfg["points_per_axis"], margin=grid_cfg.get("margin", 0.0),
                              repeats=grid_cfg["repeats"], snr=primary, noise=cfg["noise"],
                              seed=cfg["seed"] + 2_000_003)
    evaluation = _evaluation_estimate(mle_labels, len(train), grid.n_points * grid.repeats * len(snrs) + len(heldout))

    t = time.perf_counter()
    designs, fitted, tuning_records, job_seconds = train_designs(
        defaults, train, mle_labels, cfg["tune"] if tuning else None, n_seeds, cfg["seed"], workers,
        needs_mle=_needs_mle, report=report, then=None if evaluation is None else ("evaluation", evaluation))
    timings.update(job_seconds)
    timings["training"] = time.perf_counter() - t
    main_names = list(designs)

    t = begin(f"evaluating on the test grid (SNR {', '.join(f'{x:g}' for x in cfg['grid']['snr'])}) "
              "and the held-out set" + ("" if evaluation is None else f", ~{evaluation:.0f} s"))
    # a network's float32 sums depend on the torch thread count: the evaluation runs at the training
    # jobs' count, so that the tables do not depend on the study's threads or the machine's cores
    # (the MLE gives the same bytes at any count)
    with torch_threads(cfg["num_threads"]):
        known = cfg["mle"].get("sigma", "known") == "known"
        fitter_options = {k: v for k, v in cfg["mle"].items() if k != "sigma"}

        def fitter(sigma):
            return MLEEstimator(model=cfg["model"], protocol=cfg["bvalues"], noise=cfg["noise"], sigma=sigma,
                                device=torch_device, **fitter_options)

        # every method that reports SDs is also checked for calibration, in the same pass
        with_sd = ["fit-mle", *(n for n, e in fitted.items() if e.reports_sd)]
        # the grid and the held-out set are simulated at the training data's S0 reference
        simulated = {n: e.at_training_scale() for n, e in fitted.items()}
        results_all = evaluate_snrs(
            lambda g: {"fit-mle": fitter(g.sigma if known else cfg["mle"].get("sigma")), **simulated}, grid, snrs,
            progress=not quiet, with_sd=with_sd)
        shown = ["fit-mle", *main_names]
        results = {x: r.select(shown) for x, r in results_all.items()}
        result = results[primary]
        grid = result.grid
        summaries = []
        for x, r in results_all.items():
            frame = add_calibration(summarize(r), r)
            frame.insert(0, "snr", x)
            summaries.append(frame)
        summary_all = pd.concat(summaries, ignore_index=True)
        summary = add_calibration(summarize(result), result)
        summary.insert(0, "snr", primary)
        mle = fitter(heldout.sigma if known else cfg["mle"].get("sigma"))
        methods = {"fit-mle": mle, **{n: simulated[n] for n in main_names}}
        heldout_rows, heldout_by_method, heldout_predictions = [], {}, {}
        for name, est in methods.items():
            heldout_predictions[name] = est.predict(heldout.signals)
            metrics = heldout_metrics(heldout_predictions[name], heldout)
            heldout_by_method[name] = metrics
            for p in heldout.param_names:
                heldout_rows.append({"method": name, "parameter": p, "rmse": metrics["rmse"][p],
                                     "mae": metrics["mae"][p],
                                     "bias": metrics["bias"][p], "nrmse_mean": metrics["nrmse_mean"][p],
                                     "valid_fraction": metrics["valid_fraction"]})
        heldout_table = pd.DataFrame(heldout_rows)
    timings["evaluation"] = time.perf_counter() - t

    sections, extra_text = model_sections(cfg["model"], summary, heldout, heldout_predictions)
    seed_tables = {}
    if tuning:
        comparison = tuned_vs_default(summary, result, {n: f"{n}-tuned" for n in defaults})
        sections.append(tuning_section(tuning_records, comparison))
        seed_tables["tuned_vs_default.csv"] = comparison["table"]
        seed_tables["label_ranking.csv"] = comparison["ranking"]
        seed_tables["tuned_vs_default_tests.csv"] = comparison["tests"]
        seed_tables["tuning_trials.csv"] = trials_table(tuning_records)
    if n_seeds > 1:
        per_seed = summary_all[summary_all["snr"] == primary].copy()
        per_seed = per_seed[per_seed["method"] != "fit-mle"]
        base = per_seed["method"].str.split("@s").str[0]
        per_seed["seed"] = per_seed["method"].str.extract(r"@s(\d+)$")[0].fillna("0").astype(int).to_numpy()
        per_seed["method"] = base.to_numpy()
        table = seed_summary(per_seed)
        pairs = [(a, b) for i, a in enumerate(main_names) for b in main_names[i + 1:]]
        findings = seed_findings(per_seed, pairs)
        sections.append(seeds_section(table, findings, n_seeds))
        seed_tables["seeds.csv"] = table
        seed_tables["seed_findings.csv"] = findings

    t = begin("writing results")
    atomic_write_bytes(out / "summary.csv", summary_all.to_csv(index=False).encode())
    atomic_write_bytes(out / "heldout.csv", heldout_table.to_csv(index=False).encode())
    if "swaps" in extra_text:
        atomic_write_bytes(out / "swap_rates.csv", extra_text["swaps"][1].to_csv(index=False).encode())
    for file, table in seed_tables.items():
        atomic_write_bytes(out / file, table.to_csv(index=False).encode())
    data_record = {
        "train": {"fingerprint": train.fingerprint, "spec": train.spec.to_dict()},
        "heldout": {"fingerprint": heldout.fingerprint, "spec": heldout.spec.to_dict()},
        "grid": {"fingerprint": grid.fingerprint, "spec": grid.to_dict(), "snr": snrs},
    }
    if cfg["save_networks"]:
        for name, est in fitted.items():
            grid_rows = summary[summary["method"] == name].drop(columns=["method"]).to_dict(orient="records")
            metrics = {"grid": {"fingerprint": data_record["grid"]["fingerprint"], "summary": grid_rows}}
            if name in heldout_by_method:
                metrics["heldout"] = {"spec": heldout.spec.to_dict(), "fingerprint": heldout.fingerprint,
                                      **heldout_by_method[name]}
            est.save(out / "networks" / name, metrics=metrics,
                     extra={"study": {"kind": "ivim_labels", "title": cfg["title"]}})

    notes = (f"Networks trained on {train.spec.n:,} signals (fingerprint `{train.fingerprint[:12]}`); "
             f"held-out RMSE per parameter in `heldout.csv` (`nrmse_mean`: RMSE / mean truth); "
             f"trained networks in `networks/`.")
    write_report(out, result, summary, config=cfg, title=cfg["title"], figures=bool(cfg["figures"]), notes=notes,
                 fmt=cfg["figure_format"], results_by_snr=results, sections=sections,
                 seed_table=seed_tables.get("seeds.csv"), seed_findings=seed_tables.get("seed_findings.csv"))
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    manifest = {
        "kind": "ivim_labels",
        "seeds": {"seed": cfg["seed"], "train_data": train.spec.seed, "heldout_data": heldout.spec.seed,
                  "grid": grid.seed, "networks": {n: e.seeds_ for n, e in fitted.items()}},
        "data": data_record,
        "mle_labels": mle_labels.info() if mle_labels is not None else None,
        "methods": list(methods),
        "networks": {n: {"bundle": f"networks/{n}" if cfg["save_networks"] else None, "epochs": e.n_epochs_,
                         "best_epoch": e.best_epoch_, "best_val_loss": e.best_val_loss_} for n, e in fitted.items()},
        "tuning": {n: {k: v for k, v in r.items() if k != "trials"} for n, r in tuning_records.items()} or None,
        "versions": package_versions(),
        "device": device_info(torch_device),
        "determinism": {"deterministic": cfg["deterministic"], "num_threads_training": cfg["num_threads"],
                        "workers": workers},
        "timings": timings,
        "heldout": heldout_by_method,
    }
    write_json(out / "manifest.json", manifest, sort_keys=True)
    text = "\n\n".join([summary_text(summary), *(v[0] for v in extra_text.values())])
    return {"summary": summary, "heldout": heldout_table, "manifest": manifest, "summary_text": text,
            "estimators": methods, "result": result, "results_by_snr": results, "out": out,
            "summary_all": summary_all}


def model_sections(model: str, summary: pd.DataFrame, heldout, predictions: Mapping) -> tuple[list, dict]:
    """The report sections and printed summaries that depend on the model: the fat/water swap
    rates of every method on the held-out set (a model with a PDFF), and whether IVIM's label
    ranking holds (any model but IVIM).

    Returns
    -------
    (list of Markdown sections, dict name -> (printed text, table or None))
    """
    from qmri_labels.analysis.findings import ranking_sentences
    from qmri_labels.analysis.swaps import swap_rates, swap_section, swap_text

    sections, texts = [], {}
    names = list(heldout.param_names)
    if "PDFF" in names:
        i = names.index("PDFF")
        rates = swap_rates({m: np.asarray(p)[:, i] for m, p in predictions.items()}, heldout.theta_true[:, i])
        sections.append(swap_section(rates))
        texts["swaps"] = (swap_text(rates), rates)
    if model != "ivim":
        lines = ranking_sentences(summary, model)
        if lines:
            sections.append("\n".join(["## Label ranking against IVIM's", "",
                                        "On IVIM (Epstein et al., MELBA 2024) GT labels give the lowest SD and the "
                                        "highest bias, MLE and self-supervised labels the lowest bias and the "
                                        "highest SD. Here:", "", *lines]))
            texts["ranking"] = ("\n".join(line.removeprefix("- ").replace("**", "") for line in lines), None)
    return sections, texts


def _centre_snr(snr) -> float:
    """The training SNR, or the geometric centre of a training SNR range."""
    return float(snr) if not isinstance(snr, dict) else float(np.sqrt(snr["low"] * snr["high"]))
