"""The QSM head-family study (kind ``qsm_families``): U-Nets trained on one family of heads
(anatomical, random shapes, ...) against TKD, Tikhonov and tuned TV, on held-out heads of every
family, with a pre-named primary comparison powered by a pilot.

One U-Net is trained per family of ``train_families``; the training, validation and test heads of
every family come from one :class:`~qmri_labels.data.qsm.QSMPhantomSpec` that differs between
families in ``family`` only (same grid, voxel size, noise, number of heads and seeds), and the
networks differ in their training family only (same architecture, seed and schedule): Oh et
al. (2021)'s "test data like the training data", one factor at a time. Tikhonov's and TV's
lambdas are tuned per family on its VALIDATION heads (lowest mean demeaned NRMSE; never the
test heads); a TV input channel of a network takes the TV lambda of its training family.

The primary comparison (``primary``: a network, a baseline, a metric and a test family, named
in the configuration before anything runs) is powered in two stages: a pilot set of heads
(seed + 3) gives the effect as Cohen's d_z, :func:`~qmri_labels.analysis.power.paired_t_sample_size`
the number of held-out heads for ``power`` at ``alpha`` (two-sided paired t-test), clipped to
``[n_test_min, n_test_max]``; the held-out heads (seed + 2, never the pilot's) are then that
many, and the primary test is the paired t-test on them alone, uncorrected (it is the one
pre-named test). Every other network-baseline comparison (per family, NRMSE and XSIM) is
secondary, Bonferroni-corrected over all of them. Scores are the QSM challenge's
(:func:`~qmri_labels.analysis.qsm_challenge.challenge_metrics`: demeaned NRMSE, detrended
NRMSE, XSIM, HFEN and, on anatomical heads, the deep grey-matter scores). The generalisation
target is checked per network on each family it was not trained on: mean NRMSE below
Tikhonov's and at most ``target_tv_ratio`` times tuned TV's.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from qmri_labels.analysis.power import paired_t_power, paired_t_sample_size
from qmri_labels.analysis.qsm_challenge import challenge_metrics
from qmri_labels.analysis.stats import bonferroni, paired_effect_size
from qmri_labels.data.qsm import QSMPhantomSet, QSMPhantomSpec
from qmri_labels.data.qsm.phantom_set import FAMILIES
from qmri_labels.fileio import atomic_write_bytes, write_json
from qmri_labels.fitting.qsm_inversion import tikhonov, tkd, tv
from qmri_labels.workflows.common import check_count, markdown, merge_config, paired_test
from qmri_labels.workflows.qsm.common import FREE_FORM_KEYS, show, study_estimator, write_manifest, write_table

#: scores of every method on every held-out head (NaN where a family has no region labels)
METRICS = ("nrmse", "nrmse_detrend", "xsim", "hfen", "nrmse_dgm", "dgm_slope")
#: the direction of "better" of the metrics a comparison may name
DIRECTIONS = {"nrmse": "lower", "nrmse_detrend": "lower", "hfen": "lower", "xsim": "higher"}
BASELINES = ("tkd", "tikhonov", "tv")

DEFAULTS: dict[str, Any] = {
    "kind": "qsm_families",
    "title": "U-Nets on anatomical and random-shape heads across families",
    "seed": 0,
    "phantom": {"shape": [48, 48, 48], "voxel_size": [4.0, 4.0, 4.0], "noise_sigma": 0.005, "n_orientations": 1,
                "field_kind": "local"},
    "train_families": ["anatomical", "random_shapes"],
    "test_families": ["anatomical", "random_shapes", "ellipsoids"],
    "n_train": 12,
    "n_val": 2,
    "primary": {"network": "net-anatomical", "baseline": "tv", "metric": "nrmse", "family": "anatomical"},
    "pilot_n_test": 8,
    "power": 0.8,
    "alpha": 0.05,
    "n_test_min": 50,
    "n_test_max": 60,
    "n_test_cross": 20,
    "target_tv_ratio": 1.5,
    "training": {"preset": "graf", "unet": {"levels": 5, "init_channels": 16}, "inputs": ["field", "tv"],
                 "label": "gt", "patch_size": 32, "batch_size": 2, "samples_per_epoch": 16, "max_epochs": 50,
                 "lr": 1e-3, "weight_decay": 0.01, "max_time_s": None, "device": None},
    "tikhonov_lambdas": [0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6],
    "tv_lambdas": [4e-4, 8e-4, 1.6e-3, 3.2e-3, 6.4e-3],
    "tkd_threshold": 0.19,
}


def run(config: Mapping | None, out: Path, quiet: bool = True) -> dict:
    """Run the family study of ``config`` (merged over :data:`DEFAULTS`).

    Parameters
    ----------
    config : mapping or None
        Entries over :data:`DEFAULTS` (a key it does not have is an error).
    out : Path
        Results folder: results.csv, per_head.csv, comparisons.csv, cross_family.csv,
        power.json, report.md, manifest.json, networks/.
    quiet : bool

    Returns
    -------
    dict
        ``results``, ``primary``, ``power``, ``cross_family``, ``out``, ``timings_s``, ``summary_text``.
    """
    return run_resolved(check_config(merge_config(DEFAULTS, config, FREE_FORM_KEYS)), out, quiet)


def check_config(config: dict) -> dict:
    """Check a merged configuration (ValueError naming the bad entry); returns it."""
    for key in ("train_families", "test_families"):
        fams = list(config[key])
        if not fams or any(f not in FAMILIES for f in fams) or len(set(fams)) != len(fams):
            raise ValueError(f"{key} must be distinct names from {FAMILIES}, got {fams!r}")
    if "family" in config["phantom"]:
        raise ValueError("phantom.family is set per training and test family (train_families, test_families)")
    primary = dict(config["primary"])
    if set(primary) != {"network", "baseline", "metric", "family"}:
        raise ValueError(f"primary needs exactly network, baseline, metric and family, got {sorted(primary)}")
    nets = [network_name(f) for f in config["train_families"]]
    if primary["network"] not in nets:
        raise ValueError(f"primary.network {primary['network']!r} is not one of the study's networks {nets}")
    if primary["baseline"] not in BASELINES:
        raise ValueError(f"primary.baseline must be one of {BASELINES}, got {primary['baseline']!r}")
    if primary["metric"] not in DIRECTIONS:
        raise ValueError(f"primary.metric must be one of {sorted(DIRECTIONS)}, got {primary['metric']!r}")
    if primary["family"] not in config["test_families"]:
        raise ValueError(f"primary.family {primary['family']!r} is not a test family")
    for key, minimum in (("n_train", 1), ("n_val", 1), ("pilot_n_test", 3), ("n_test_min", 2), ("n_test_cross", 2)):
        config[key] = check_count(config[key], key, minimum)
    config["n_test_max"] = check_count(config["n_test_max"], "n_test_max", config["n_test_min"],
                                       "at least n_test_min")
    if not 0 < float(config["power"]) < 1 or not 0 < float(config["alpha"]) < 1:
        raise ValueError("power and alpha must be in (0, 1)")
    return config


def network_name(family: str) -> str:
    """The name of the network trained on ``family`` in the study's tables."""
    return f"net-{family}"


def family_spec(config: Mapping, family: str, split: str, n: int | None = None) -> QSMPhantomSpec:
    """The spec of one family's split: the same for every family but ``family``.

    Parameters
    ----------
    config : mapping
        The study's configuration.
    family : str
    split : {"train", "val", "test", "pilot"}
        Seeds ``seed``, +1, +2, +3.
    n : int or None
        Heads (default: the split's count in ``config``; the test split's depends on the pilot).

    Returns
    -------
    QSMPhantomSpec
    """
    offsets = {"train": 0, "val": 1, "test": 2, "pilot": 3}
    counts = {"train": config["n_train"], "val": config["n_val"], "pilot": config["pilot_n_test"],
              "test": config["n_test_min"]}
    if split not in offsets:
        raise ValueError(f"split must be one of {sorted(offsets)}, got {split!r}")
    return QSMPhantomSpec.from_dict({**config["phantom"], "family": family, "n": int(counts[split] if n is None else n),
                                     "seed": int(config["seed"]) + offsets[split]})


def spec_differences(a: QSMPhantomSpec, b: QSMPhantomSpec) -> list[str]:
    """The fields in which two specs differ."""
    da, db = asdict(a), asdict(b)
    return sorted(k for k in da if da[k] != db[k])


def _tune(method: str, data: QSMPhantomSet, lambdas) -> tuple[float, list[float]]:
    """The lambda of ``method`` with the lowest mean demeaned NRMSE on ``data`` (validation heads)."""
    lambdas = [float(v) for v in lambdas]
    scores = []
    for lam in lambdas:
        est = _baseline(method, data, lam)
        scores.append(float(np.mean([challenge_metrics(e, c, m)["nrmse"]
                                     for e, c, m in zip(est, data.chi, data.mask)])))
    return lambdas[int(np.argmin(scores))], scores


def _baseline(method: str, data: QSMPhantomSet, lam: float, tkd_threshold: float = 0.19):
    b0 = data.orientations[0]
    if method == "tkd":
        return tkd(data.field, data.voxel_size, b0, tkd_threshold, mask=data.mask)
    if method == "tikhonov":
        return tikhonov(data.field, data.voxel_size, b0, lam=float(lam), mask=data.mask)
    # the TV defaults (iterations, tolerance) are those of a network's TV input channel, so that
    # one TV map serves both where the weights agree
    return tv(data.field, data.mask, data.voxel_size, b0, lam=float(lam))


def _score(estimates: Mapping[str, np.ndarray], data: QSMPhantomSet, family: str, split: str) -> list[dict]:
    rows = []
    for method, est in estimates.items():
        for i in range(len(data)):
            labels = None if data.labels is None else data.labels[i]
            m = challenge_metrics(est[i], data.chi[i], data.mask[i], labels)
            rows.append({"split": split, "family": family, "head": i, "method": method,
                         **{k: float(m[k]) for k in METRICS}})
    return rows


def _evaluate(data: QSMPhantomSet, family: str, split: str, networks, lambdas: Mapping[str, float],
              config: Mapping, methods=None) -> list[dict]:
    """Per-head scores of the baselines and networks (or only ``methods``) on ``data``."""
    estimates = {}
    tv_maps: dict[float, np.ndarray] = {}  # TV by weight: the baseline's and the networks' TV channels

    def tv_map(lam: float) -> np.ndarray:
        if float(lam) not in tv_maps:
            tv_maps[float(lam)] = _baseline("tv", data, float(lam))
        return tv_maps[float(lam)]

    for method in BASELINES:
        if methods is None or method in methods:
            estimates[method] = (tv_map(lambdas["tv"]) if method == "tv" else
                                 _baseline(method, data, lambdas.get(method, 0.0), float(config["tkd_threshold"])))
    for name, net in networks.items():
        if methods is None or name in methods:
            channel = tv_map(net.tv_lambda) if "tv" in tuple(net.inputs) else None
            estimates[name] = net.predict(data.field, data.mask, tv_input=channel)
    return _score(estimates, data, family, split)


def _values(rows, family: str, method: str, metric: str, split: str = "test") -> np.ndarray:
    sel = sorted((r for r in rows if r["family"] == family and r["method"] == method and r["split"] == split),
                 key=lambda r: r["head"])
    return np.array([r[metric] for r in sel], dtype=np.float64)


def _comparison(a: np.ndarray, b: np.ndarray, metric: str, network: str, baseline: str) -> dict:
    test = paired_test(a, b, network, baseline)
    better = DIRECTIONS[metric]
    sign = -1.0 if better == "lower" else 1.0
    return {"network": network, "baseline": baseline, "metric": metric, "better": better, "n": int(test["n"]),
            "network_mean": float(a.mean()), "baseline_mean": float(b.mean()), "mean_diff": float(test["mean_diff"]),
            "ci_low": float(test["ci_low"]), "ci_high": float(test["ci_high"]),
            "cohen_dz": float(paired_effect_size(a, b)["cohen_dz"]), "wins": int(np.sum(sign * (a - b) > 0)),
            "t": float(test["t"]), "p_value": float(test["p_value"])}


def _verdict(row: Mapping, p: float, alpha: float) -> str:
    sign = -1.0 if row["better"] == "lower" else 1.0
    if not (np.isfinite(p) and p < alpha):
        return "tie"
    return "network" if sign * row["mean_diff"] > 0 else "baseline"


def run_resolved(config: Mapping, out: Path, quiet: bool = True) -> dict:
    """:func:`run` of a merged and checked configuration.

    Parameters
    ----------
    config : mapping
    out : Path
    quiet : bool

    Returns
    -------
    dict
        As :func:`run`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    primary = dict(config["primary"])
    train_fams, test_fams = list(config["train_families"]), list(config["test_families"])
    val_sets = {f: family_spec(config, f, "val").generate() for f in dict.fromkeys(train_fams + test_fams)}
    fingerprints = {f"val-{f}": d.fingerprint for f, d in val_sets.items()}

    # baselines tuned per family on its validation heads
    t1 = time.perf_counter()
    lambdas, tuning = {}, {}
    for fam in val_sets:
        lam_tik, s_tik = _tune("tikhonov", val_sets[fam], config["tikhonov_lambdas"])
        lam_tv, s_tv = _tune("tv", val_sets[fam], config["tv_lambdas"])
        lambdas[fam] = {"tikhonov": lam_tik, "tv": lam_tv}
        tuning[fam] = {"tikhonov": dict(zip(map(str, config["tikhonov_lambdas"]), s_tik)),
                       "tv": dict(zip(map(str, config["tv_lambdas"]), s_tv))}
        show(quiet, f"[qsm_families] {fam}: Tikhonov lambda {lam_tik:g}, TV lambda {lam_tv:g} (validation heads)")
    timings["tuning"] = time.perf_counter() - t1

    networks, histories = {}, {}
    for fam in train_fams:
        name = network_name(fam)
        train = family_spec(config, fam, "train").generate()
        fingerprints[f"train-{fam}"] = train.fingerprint
        show(quiet, f"[qsm_families] training {name} on {len(train)} {fam} heads")
        t1 = time.perf_counter()
        est = study_estimator(config, int(config["seed"]), tv_lambda=lambdas[fam]["tv"]).fit(train,
                                                                                             validation=val_sets[fam])
        timings[f"train-{name}"] = time.perf_counter() - t1
        networks[name] = est
        histories[name] = est.history_
        # test_spec and model_config make the bundle one that ``python -m qmri_labels.workflows.qsm
        # evaluate-model`` scores (after BFR too) on its own family's held-out heads
        est.save(out / "networks" / name, {
            "workflow": "qmri_labels.workflows.qsm.families", "family": fam,
            "test_spec": family_spec(config, fam, "test").to_dict(),
            "model_config": {k: config[k] for k in ("tkd_threshold", "tikhonov_lambdas", "tv_lambdas")}})

    # pilot: the primary comparison's effect on heads that are never scored again
    t1 = time.perf_counter()
    pfam = primary["family"]
    pilot = family_spec(config, pfam, "pilot").generate()
    fingerprints[f"pilot-{pfam}"] = pilot.fingerprint
    pilot_rows = _evaluate(pilot, pfam, "pilot", networks, lambdas[pfam], config,
                           methods=(primary["network"], primary["baseline"]))
    a = _values(pilot_rows, pfam, primary["network"], primary["metric"], "pilot")
    b = _values(pilot_rows, pfam, primary["baseline"], primary["metric"], "pilot")
    pilot_effect = paired_effect_size(a, b)
    dz = float(pilot_effect["cohen_dz"])
    n_required = paired_t_sample_size(dz, float(config["power"]), float(config["alpha"]),
                                      n_max=max(100_000, int(config["n_test_max"])))
    n_test = int(np.clip(n_required if n_required is not None else config["n_test_max"], config["n_test_min"],
                         config["n_test_max"]))
    power = {"pilot_n": len(pilot), "pilot_seed": int(pilot.spec.seed), "pilot_network_mean": float(a.mean()),
             "pilot_baseline_mean": float(b.mean()), "pilot_mean_diff": float(pilot_effect["mean_diff"]),
             "pilot_sd_diff": float(pilot_effect["sd_diff"]), "pilot_cohen_dz": dz,
             "target_power": float(config["power"]), "alpha": float(config["alpha"]), "n_required": n_required,
             "n_test": n_test, "power_at_n_test": paired_t_power(dz, n_test, float(config["alpha"]))
             if np.isfinite(dz) else 1.0}
    timings["pilot"] = time.perf_counter() - t1
    show(quiet, f"[qsm_families] pilot ({len(pilot)} heads): d_z {dz:.3f}, {n_required} heads needed for "
                f"{config['power']:g} power; testing on {n_test}")

    # held-out heads of every family (seed + 2): the primary family's are the powered count
    rows: list[dict] = []
    test_counts = {}
    for fam in test_fams:
        t1 = time.perf_counter()
        n = n_test if fam == pfam else int(config["n_test_cross"])
        data = family_spec(config, fam, "test", n=n).generate()
        fingerprints[f"test-{fam}"] = data.fingerprint
        test_counts[fam] = len(data)
        rows += _evaluate(data, fam, "test", networks, lambdas[fam], config)
        timings[f"test-{fam}"] = time.perf_counter() - t1
        show(quiet, f"[qsm_families] scored {len(data)} held-out {fam} heads")

    a = _values(rows, pfam, primary["network"], primary["metric"])
    b = _values(rows, pfam, primary["baseline"], primary["metric"])
    prim = _comparison(a, b, primary["metric"], primary["network"], primary["baseline"])
    prim.update(family=pfam, verdict=_verdict(prim, prim["p_value"], float(config["alpha"])),
                power_at_observed_dz=paired_t_power(prim["cohen_dz"], prim["n"], float(config["alpha"]))
                if np.isfinite(prim["cohen_dz"]) else 1.0)

    secondary = []
    for fam in test_fams:
        for net in networks:
            for base in BASELINES:
                for metric in ("nrmse", "xsim"):
                    if (fam, net, base, metric) == (pfam, primary["network"], primary["baseline"], primary["metric"]):
                        continue
                    row = _comparison(_values(rows, fam, net, metric), _values(rows, fam, base, metric), metric,
                                      net, base)
                    secondary.append({"family": fam, **row})
    for row, p_adj in zip(secondary, bonferroni([r["p_value"] for r in secondary]) if secondary else []):
        row["p_adjusted"] = float(p_adj)
        row["verdict"] = _verdict(row, float(p_adj), float(config["alpha"]))

    per_head = pd.DataFrame(rows)
    means = (per_head.groupby(["family", "method"], sort=False)[list(METRICS)].mean().reset_index())
    means.insert(2, "n_heads", [test_counts[f] for f in means["family"]])
    means["lambda"] = [lambdas[f].get(m, np.nan) for f, m in zip(means["family"], means["method"])]
    cross = _cross_family(means, train_fams, test_fams, float(config["target_tv_ratio"]))
    write_table(out / "per_head.csv", per_head)
    write_table(out / "pilot.csv", pd.DataFrame(pilot_rows))
    write_table(out / "results.csv", means)
    write_table(out / "comparisons.csv", pd.DataFrame([{"role": "primary", **prim}]
                                                      + [{"role": "secondary", **r} for r in secondary]))
    write_table(out / "cross_family.csv", cross)
    write_table(out / "history.csv", pd.DataFrame([{"method": n, **r} for n, h in histories.items() for r in h]))
    write_json(out / "power.json", power)
    timings["total"] = time.perf_counter() - t0
    report = _report(config, means, prim, secondary, cross, power, lambdas, tuning, test_counts, networks, timings)
    atomic_write_bytes(out / "report.md", report.encode())
    manifest = write_manifest(config, out, {}, timings,
                              {"fingerprints": fingerprints, "lambdas": lambdas, "tuning_nrmse": tuning,
                               "power": power, "primary": prim,
                               "best_epochs": {n: int(e.best_epoch_) for n, e in networks.items()},
                               "epochs_run": {n: len(e.history_) for n, e in networks.items()}})
    summary = means[["family", "method", "n_heads", "nrmse", "xsim"]].to_string(
        index=False, float_format=lambda v: f"{v:.3f}")
    summary += (f"\nprimary: {prim['network']} vs {prim['baseline']} on {pfam} heads, {prim['metric']} "
                f"{prim['network_mean']:.2f} vs {prim['baseline_mean']:.2f}, p = {prim['p_value']:.3g} "
                f"(n = {prim['n']}): {prim['verdict']}")
    show(quiet, summary)
    return {"results": means.to_dict("records"), "primary": prim, "power": power,
            "cross_family": cross.to_dict("records"), "out": str(out), "timings_s": timings,
            "manifest": manifest, "summary_text": summary}


def _cross_family(means: pd.DataFrame, train_fams, test_fams, ratio: float) -> pd.DataFrame:
    """Per network and test family: its NRMSE beside Tikhonov's and TV's, and the target's verdict."""
    table = {(f, m): r for f, m, r in zip(means["family"], means["method"], means["nrmse"])}
    rows = []
    for fam in test_fams:
        for tf in train_fams:
            net = network_name(tf)
            nrmse, tik, tv_ = table[(fam, net)], table[(fam, "tikhonov")], table[(fam, "tv")]
            rows.append({"network": net, "trained_on": tf, "test_family": fam, "seen": tf == fam,
                         "nrmse": nrmse, "tikhonov_nrmse": tik, "tv_nrmse": tv_, "tkd_nrmse": table[(fam, "tkd")],
                         "ratio_to_tv": nrmse / tv_, "below_tikhonov": bool(nrmse < tik),
                         "within_ratio_of_tv": bool(nrmse <= ratio * tv_),
                         "target_holds": bool(nrmse < tik and nrmse <= ratio * tv_)})
    return pd.DataFrame(rows)


def _fmt(v) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"


def _report(config, means, prim, secondary, cross, power, lambdas, tuning, counts, networks, timings) -> str:
    ratio = float(config["target_tv_ratio"])
    ph = config["phantom"]
    lines = [f"# {config['title']}", "",
             f"Heads: {'x'.join(map(str, ph['shape']))} voxels of {'x'.join(f'{v:g}' for v in ph['voxel_size'])} mm, "
             f"masked local fields, field noise {ph.get('noise_sigma', 0.005)} ppm; families differ in `family` only "
             f"(same grid, noise, counts and seeds: training seed {config['seed']}, validation +1, held-out +2, "
             f"pilot +3). Networks: {', '.join(networks)} (one per training family, same architecture, seed and "
             f"schedule; {config['n_train']} training heads, {config['n_val']} validation heads). Tikhonov and TV "
             "lambdas tuned per family on its validation heads (lowest mean demeaned NRMSE).", "",
             "## Primary comparison (named in the configuration before the run)", "",
             f"{prim['network']} vs {prim['baseline']} on held-out {prim['family']} heads, {prim['metric']} "
             f"({prim['better']} is better), two-sided paired t-test over heads at alpha {config['alpha']:g}.", "",
             f"- Pilot ({power['pilot_n']} heads, seed {power['pilot_seed']}): {prim['network']} "
             f"{power['pilot_network_mean']:.3f}, {prim['baseline']} {power['pilot_baseline_mean']:.3f}, "
             f"mean difference {power['pilot_mean_diff']:.3f} (SD {power['pilot_sd_diff']:.3f}), "
             f"d_z = {power['pilot_cohen_dz']:.3f}.",
             f"- Power: a two-sided paired t-test at alpha {power['alpha']:g} needs "
             f"{power['n_required'] if power['n_required'] is not None else 'more than the cap of'} heads for "
             f"{power['target_power']:g} power at that d_z (noncentral t, df = n - 1, noncentrality d_z sqrt(n)); "
             f"held-out heads used: {power['n_test']} (clipped to [{config['n_test_min']}, {config['n_test_max']}]), "
             f"power there {power['power_at_n_test']:.3f}.",
             f"- Held-out ({prim['n']} heads): {prim['network']} {prim['network_mean']:.3f}, {prim['baseline']} "
             f"{prim['baseline_mean']:.3f}, difference {prim['mean_diff']:.3f} (95 % CI {prim['ci_low']:.3f} to "
             f"{prim['ci_high']:.3f}), d_z {prim['cohen_dz']:.3f}, network better on {prim['wins']} of {prim['n']}, "
             f"t = {prim['t']:.3f}, p = {prim['p_value']:.3g}: **{prim['verdict']}**.", "",
             "## Mean scores per test family", "",
             markdown(means.round(4)), "",
             "## Cross-family table (Oh 2021's \"test data like the training data\")", "",
             f"Target on a family a network was not trained on: NRMSE below Tikhonov's and at most {ratio:g} x tuned "
             "TV's.", "",
             markdown(cross.round(4)), ""]
    for row in cross.itertuples():
        if not row.seen:
            lines.append(f"- {row.network} on {row.test_family} heads: NRMSE {row.nrmse:.1f} vs Tikhonov "
                         f"{row.tikhonov_nrmse:.1f} and TV {row.tv_nrmse:.1f} ({row.ratio_to_tv:.2f} x TV): target "
                         f"{'holds' if row.target_holds else 'does not hold'}.")
    sec = pd.DataFrame(secondary)
    if len(sec):
        keys = ["family", "network", "baseline", "metric", "network_mean", "baseline_mean", "wins", "n", "p_value",
                "p_adjusted", "verdict"]
        lines += ["", f"## Secondary comparisons (paired t-tests, Bonferroni over {len(sec)})", "",
                  markdown(sec[keys].round(5))]
    lines += ["", "## Lambdas (validation heads)", ""]
    for fam, lam in lambdas.items():
        edges = [m for m in ("tikhonov", "tv") if len(config[f"{m}_lambdas"]) > 1
                 and lam[m] in (min(config[f"{m}_lambdas"]), max(config[f"{m}_lambdas"]))]
        lines.append(f"- {fam}: Tikhonov {lam['tikhonov']:g}, TV {lam['tv']:g}; validation NRMSE per TV lambda "
                     + ", ".join(f"{k}: {_fmt(v)}" for k, v in tuning[fam]["tv"].items())
                     + (f". **At the edge of its grid: {', '.join(edges)}** (a wider grid may do better)" if edges
                        else ""))
    lines += ["", "## Training", ""]
    for name, est in networks.items():
        lines.append(f"- {name}: {len(est.history_)} epochs, best {est.best_epoch_}, "
                     f"{timings.get('train-' + name, float('nan')):.0f} s")
    lines += ["", f"Wall time {timings['total']:.0f} s; held-out heads per family: "
              + ", ".join(f"{f} {n}" for f, n in counts.items()) + ".", ""]
    return "\n".join(lines)
