"""The report's findings are made from the numbers; one colour per method in every figure;
axes that do not exaggerate small differences."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from qmri_labels.analysis import GridSpec, evaluate_grid, summarize, write_report
from qmri_labels.analysis.findings import study_findings
from qmri_labels.data import UniformPrior


def summary_table(sd_a, sd_b, sens_a=0.98, sens_b=0.30):
    """Two methods, one varied parameter f; everything but SD and sensitivity equal."""
    return pd.DataFrame({"method": ["A", "B"], "parameter": ["f", "f"], "unit": ["1", "1"], "varied": [True, True],
                         "mean_abs_bias": [0.02, 0.03], "mean_sd": [sd_a, sd_b], "rmse": [0.05, 0.06],
                         "sensitivity": [sens_a, sens_b]})


def one_sentence(lines, start):
    hits = [line for line in lines if start in line]
    assert len(hits) == 1, lines
    return hits[0]


def test_lowest_sd_sentence_names_the_method_with_the_lowest_sd():
    lines = study_findings(summary_table(sd_a=0.04, sd_b=0.01))
    first = one_sentence(lines, "**f**")
    assert "B the lowest SD (0.01)" in first and "A has the lowest mean |bias| (0.02) and RMSE (0.05)" in first
    swapped = one_sentence(study_findings(summary_table(sd_a=0.01, sd_b=0.04)), "**f**")
    assert "A has the lowest mean |bias| (0.02), SD (0.01) and RMSE (0.05)" in swapped and "B" not in swapped


def test_sensitivity_sentence_follows_the_numbers():
    kept = one_sentence(study_findings(summary_table(0.01, 0.02, sens_a=0.98, sens_b=0.30)), "sensitivity")
    assert "within 0.1 of 1 for A (0.98)" in kept and "not for B (0.3)" in kept and "pulled towards" in kept
    swapped = one_sentence(study_findings(summary_table(0.01, 0.02, sens_a=0.30, sens_b=1.05)), "sensitivity")
    assert "within 0.1 of 1 for B (1.05)" in swapped and "not for A (0.3)" in swapped
    over = one_sentence(study_findings(summary_table(0.01, 0.02, sens_a=1.5, sens_b=0.99)), "sensitivity")
    assert "not for A (1.5) (above" in over
    none = one_sentence(study_findings(summary_table(0.01, 0.02, sens_a=0.5, sens_b=0.7)), "sensitivity")
    assert none.startswith("- No method keeps") and "closest is B (0.7)" in none


def comparisons_table(mean_diff, significant, p=0.001):
    return pd.DataFrame({"parameter": ["f"], "metric": ["abs_error"], "a": ["A"], "b": ["B"], "mean_diff": [mean_diff],
                         "p_adjusted": [p], "significant": [significant], "correction": ["bonferroni"]})


def test_significance_and_seed_spread_sentences():
    summary = summary_table(0.01, 0.02)
    text = one_sentence(study_findings(summary, comparisons_table(-0.02, True)), "Paired tests")
    assert "Bonferroni-corrected" in text and "significant: A lower than B by 0.02 (p = 0.001)" in text
    text = one_sentence(study_findings(summary, comparisons_table(0.02, True)), "Paired tests")
    assert "B lower than A by 0.02" in text
    text = one_sentence(study_findings(summary, comparisons_table(0.02, False, p=0.4)), "Paired tests")
    assert "no difference is significant" in text
    # against the spread over training seeds: B's RMSE varies by 0.05 from seed to seed
    seeds = pd.DataFrame({"method": ["B"], "parameter": ["f"], "n_seeds": [3], "rmse_sd": [0.05]})
    text = one_sentence(study_findings(summary, comparisons_table(-0.02, True), seed_table=seeds), "Paired tests")
    assert "but within the seed spread (0.05)" in text
    seeds["rmse_sd"] = 0.001
    text = one_sentence(study_findings(summary, comparisons_table(-0.02, True), seed_table=seeds), "Paired tests")
    assert "larger than the seed spread (0.001)" in text
    found = pd.DataFrame({"a": ["A"], "b": ["B"], "parameter": ["f"], "metric": ["mean_sd"], "n_seeds": [3],
                          "mean_diff": [0.004], "seed_spread": [0.001], "finding": [True]})
    text = one_sentence(study_findings(summary, seed_findings=found), "training seeds")
    assert "B has the lower SD than A (by 0.004, spread 0.001)" in text
    text = one_sentence(study_findings(summary, seed_findings=found.assign(metric="abs(1 - sensitivity)", mean_diff=-0.2)),
                        "training seeds")
    assert "A keeps the sensitivity closer to 1 than B (by 0.2" in text
    text = one_sentence(study_findings(summary, seed_findings=found.assign(finding=False)), "training seeds")
    assert "no difference between the networks in f exceeds" in text


class Shrinking:
    """Estimate = w * truth + (1 - w) * prior centre plus noise; reports an SD of ``sd_scale``
    times its true noise level."""

    def __init__(self, weight, noise_sd, grid, seed, sd_scale=1.0):
        self.truth = np.repeat(grid.truth, grid.repeats, axis=0)
        self.mid = UniformPrior().support.mean(0)
        self.weight, self.noise_sd, self.seed, self.sd_scale, self.pos = weight, noise_sd, seed, sd_scale, 0

    def predict(self, signals, return_sd=False):
        n = len(signals)
        t = self.truth[self.pos:self.pos + n]
        self.pos = (self.pos + n) % len(self.truth)
        est = self.weight * t + (1 - self.weight) * self.mid
        sd = self.noise_sd * np.abs(est)
        est = est + sd * np.random.default_rng(self.seed + self.pos).standard_normal(est.shape)
        return (est, self.sd_scale * sd) if return_sd else est


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    """Every figure object a report draws, by name (save_figure intercepted)."""
    from qmri_labels.analysis import plots

    grid = GridSpec.for_prior(UniformPrior().support, (0, 10, 20, 50, 100, 200, 400, 800), points_per_axis=2,
                              repeats=6, snr=30)
    estimators = {"fit-mle": Shrinking(1.0, 0.1, grid, 0), "net-custom": Shrinking(0.3, 0.02, grid, 1, 2.0),
                  "net-gt": Shrinking(0.2, 0.01, grid, 2), "net-hybrid-0.5": Shrinking(0.6, 0.05, grid, 3, 0.5)}
    # only two of the four report an SD: the reliability figure draws a subset of the methods
    result = evaluate_grid(estimators, grid, with_sd=["net-custom", "net-hybrid-0.5"])
    drawn = {}
    original = plots.save_figure

    def keep(fig, path, fmt=None, dpi=120):
        drawn[os.path.basename(str(path))] = fig
        return original(fig, path, fmt, dpi)

    plots.save_figure = keep
    try:
        write_report(tmp_path_factory.mktemp("colours"), result, summarize(result))
    finally:
        plots.save_figure = original
    return drawn


def line_colors(fig, method):
    return {to_hex(line.get_color()) for ax in fig.axes for line in ax.get_lines() if line.get_label() == method}


def test_one_colour_per_method_in_every_figure(figures):
    assert {"bias_sd_rmse", "reliability", "alpha_sweep"} <= set(figures)
    for method in ("net-custom", "net-hybrid-0.5"):
        in_panel = line_colors(figures["bias_sd_rmse"], method)
        assert len(in_panel) == 1
        assert line_colors(figures["reliability"], method) == in_panel, method
    # the alpha sweep marks each alpha in its method's colour
    assert line_colors(figures["alpha_sweep"], "net-gt") == line_colors(figures["bias_sd_rmse"], "net-gt")
    quiver = figures["quiver_f_Dstar"]
    panel = [ax for ax in quiver.axes if ax.get_title() == "net-custom"][0]
    assert {to_hex(c) for c in panel.collections[0].get_facecolor()} == line_colors(figures["bias_sd_rmse"],
                                                                                      "net-custom")


def test_alpha_sweep_axes_start_at_zero(figures):
    fig = figures["alpha_sweep"]
    for ax in fig.axes:
        lo, hi = ax.get_ylim()
        assert lo == 0.0 and hi > 0, ax.get_ylabel()
        assert ax.get_xlim()[0] < 0.0 < 1.0 < ax.get_xlim()[1]
