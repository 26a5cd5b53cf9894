"""Figures, report.md and reading a results folder back."""

import os
import shutil

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np
import pandas as pd
import pytest

from qmri_labels import load_results
from qmri_labels.analysis import (
    GridSpec,
    evaluate_grid,
    summarize,
    write_report,
)
from qmri_labels.analysis.plots import (
    alpha_sweep_table,
    method_colors,
    plot_alpha_sweep,
    plot_bias_quiver,
    plot_bias_sd_rmse,
    plot_error_hist2d,
    save_figure,
)
from qmri_labels.data import UniformPrior
from qmri_labels.physics import display_unit

MID = UniformPrior().support.mean(0)


def shrinking(weight, noise_sd, grid, seed):
    """Estimate = weight * truth + (1 - weight) * prior centre, times multiplicative noise."""
    truth = np.repeat(grid.truth, grid.repeats, axis=0)
    state = {"pos": 0}

    def predict(signals):
        n = len(signals)
        t = truth[state["pos"]:state["pos"] + n]
        state["pos"] += n
        est = weight * t + (1 - weight) * MID
        est[:, 0] = t[:, 0]
        return est * (1 + noise_sd * np.random.default_rng(seed + state["pos"]).standard_normal(est.shape))

    return predict


@pytest.fixture(scope="module")
def study():
    grid = GridSpec.for_prior(UniformPrior().support, (0, 10, 20, 50, 100, 200, 400, 800), points_per_axis=3,
                              repeats=12, snr=30)
    estimators = {"fit-mle": shrinking(1.0, 0.10, grid, 0), "net-gt": shrinking(0.2, 0.01, grid, 1),
                  "net-hybrid-0.5": shrinking(0.6, 0.05, grid, 2)}
    result = evaluate_grid(estimators, grid)
    return result, summarize(result)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, study):
    result, summary = study
    folder = tmp_path_factory.mktemp("report")
    path = write_report(folder, result, summary, config={"alpha": [0.5], "snr": 30.0, "bvalues": np.arange(3)})
    assert path == folder / "report.md"
    return folder


def test_write_report_and_load_back(report_dir, study):
    result, summary = study
    text = (report_dir / "report.md").read_text()
    for method in result.methods:
        assert method in text
    assert "sensitivity" in text and "efficiency" in text and "Bonferroni" in text
    assert "bvalues: [0, 1, 2]" in text  # the config, numpy converted to plain YAML
    units = ", ".join(f"{n} in {display_unit(result.units[n])}" for n in result.grid.varied)
    assert f"Units are the parameters' own ({units})." in text  # the model's own units, not IVIM's
    # every figure the report links exists and is a PNG
    links = [line.split("(")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert len(links) >= 5  # 3x3 panel, two quivers, two hist2d (+ alpha sweep)
    for link in links:
        data = (report_dir / link).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert "figures/alpha_sweep.png" in links  # hybrid + net-gt form a sweep
    best = text.split("### Best per parameter")[1]
    assert "net-gt" in best.split("\n\n")[1]  # the GT-like estimator has the lowest SD somewhere
    grid_table = pd.read_csv(report_dir / "grid.csv")
    assert len(grid_table) == len(result.methods) * result.grid.n_points * 4

    loaded = load_results(report_dir)
    assert loaded.methods == result.methods and loaded.config == {}  # the study writes config files
    pd.testing.assert_frame_equal(loaded.summary.reset_index(drop=True), summary, check_exact=False, rtol=1e-7)
    np.testing.assert_allclose(loaded.grid.sd["net-gt"], result.sd["net-gt"], rtol=1e-8)
    assert set(loaded.tables["comparisons"]["b"]) == {"net-gt", "net-hybrid-0.5"}


def test_load_results_prefers_study_files(tmp_path, report_dir, study):
    _, summary = study
    folder = tmp_path / "copy"
    shutil.copytree(report_dir, folder)
    custom = summary.assign(extra=1.0)
    custom.to_csv(folder / "summary.csv", index=False)
    (folder / "config.yaml").write_text("alpha: [0.5]\nsnr: 30\n")
    (folder / "manifest.json").write_text('{"seed": 0}')
    loaded = load_results(folder)
    assert "extra" in loaded.summary and loaded.config == {"alpha": [0.5], "snr": 30}
    assert loaded.manifest == {"seed": 0}


def test_bad_inputs(tmp_path, study):
    result, summary = study
    with pytest.raises(FileNotFoundError, match="not a results folder"):
        load_results(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a results folder"):
        load_results(tmp_path / "missing")
    with pytest.raises(ValueError, match="lacks columns"):
        write_report(tmp_path, result, summary.drop(columns=["mean_sd"]))
    with pytest.raises(ValueError, match="GridResult"):
        write_report(tmp_path, summary, summary)
    with pytest.raises(ValueError, match="reference"):
        write_report(tmp_path, result, summary, reference="net-self")


def test_panel_figure_structure_and_formats(tmp_path, study):
    result, _ = study
    fig = plot_bias_sd_rmse(result)
    axes = fig.axes
    assert len(axes) == 9
    for ax in axes[:3]:  # bias row centred on 0
        lo, hi = ax.get_ylim()
        assert lo == pytest.approx(-hi)
    sd_labels = axes[3].get_legend_handles_labels()[1]
    assert "CRLB (unbiased floor)" in sd_labels and set(result.methods) <= set(sd_labels)
    assert "10^{-3}" in axes[4].get_xlabel()  # diffusivities shown in 1e-3 mm^2/s
    # same colour per method in every figure
    colors = {line.get_label(): line.get_color() for line in axes[0].get_lines() if line.get_label() in result.methods}
    assert colors == {m: c for m, c in method_colors(result.methods).items()}
    quiver = plot_bias_quiver(result, "f", "D", methods=["net-gt"])
    pdf = save_figure(quiver, tmp_path / "quiver", fmt="pdf")
    assert pdf.name == "quiver.pdf" and pdf.read_bytes()[:4] == b"%PDF"
    dotted = save_figure(quiver, tmp_path / "quiver_net-hybrid-0.5")
    assert dotted.name == "quiver_net-hybrid-0.5.png" and dotted.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="format"):
        save_figure(fig, tmp_path / "x", fmt="bmp")
    with pytest.raises(ValueError, match="not varied"):
        plot_bias_quiver(result, "S0", "f")
    with pytest.raises(ValueError, match="not in the result"):
        plot_error_hist2d(result, "fit-mle", "net-self")
    with pytest.raises(ValueError, match="quantity"):
        plot_error_hist2d(result, "fit-mle", "net-gt", quantity="mae")


def test_alpha_sweep_table_and_plot(study):
    _, summary = study
    sweep = alpha_sweep_table(summary)
    assert set(sweep["alpha"]) == {0.0, 0.5}  # net-gt is alpha 0; no net-mle in this study
    assert alpha_sweep_table(summary[summary.method != "net-hybrid-0.5"]).empty
    fig = plot_alpha_sweep(sweep[sweep.varied])
    assert len(fig.axes) == 9 and "f" in fig.axes[0].get_ylabel()
    with pytest.raises(ValueError, match="lacks columns"):
        plot_alpha_sweep(sweep.drop(columns=["alpha"]))
    colors = method_colors(["net-hybrid-0.25", "net-hybrid-0.75", "net-gt", "custom"])
    assert colors["net-gt"] == "#0173b2" and colors["net-hybrid-0.25"] != colors["net-hybrid-0.75"]
