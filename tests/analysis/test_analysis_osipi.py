"""The OSIPI placement benchmark: reference loading, simulation, Pareto counting, a tiny MLE run."""

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="module")
def osipi(load_benchmark):
    return load_benchmark("osipi_reference")


def test_reference_files_load(osipi):
    regions, bvalues, published = osipi.load_reference()
    assert len(regions) == 27 and bvalues.shape == (18,) and bvalues[0] == 0 and bvalues[-1] == 1000
    assert published["method"].nunique() == 19
    assert sorted(published["snr"].unique()) == [10, 30, 50, 100, 200]
    assert len(published) == 19 * 27 * 5 * 3
    liver = published[(published.region == "Liver") & (published.parameter == "Dstar")]
    assert np.allclose(liver["truth"], 0.1)
    np.testing.assert_allclose(liver["bias"], liver["mean"] - liver["truth"])


def test_simulation_is_deterministic_with_requested_noise(osipi):
    regions, bvalues, _ = osipi.load_reference()
    a = osipi.simulate(regions.iloc[:3], bvalues, 50, 400, seed=0)
    b = osipi.simulate(regions.iloc[:3], bvalues, 50, 400, seed=0)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 400, 18)
    clean_b0 = 1.0  # S0 = 1
    assert a[:, :, 0].mean() == pytest.approx(clean_b0, abs=0.01)
    assert a[:, :, 0].std() == pytest.approx(1 / 50, rel=0.1)


def test_pareto_counting(osipi):
    rows = [
        # cell 1: X (|bias| 0.2, SD 0.2) dominated by A (0.1, 0.1); A dominated by nobody, B by A
        ("A", "t", 10, "f", 0.1, 0.1), ("B", "t", 10, "f", 0.3, 0.3), ("X", "t", 10, "f", -0.2, 0.2),
        # cell 2: X has the lowest bias: not dominated; A has lower SD but larger bias
        ("A", "t", 30, "f", 0.1, 0.1), ("B", "t", 30, "f", 0.05, 0.5), ("X", "t", 30, "f", 0.01, 0.4),
        # cell 3: X failed (NaN) -> dominated; ties are not domination
        ("A", "t", 50, "f", 0.1, 0.1), ("B", "t", 50, "f", 0.1, 0.1), ("X", "t", 50, "f", np.nan, np.nan),
    ]
    cells = pd.DataFrame(rows, columns=["method", "region", "snr", "parameter", "bias", "sd"])
    counts = osipi.dominated_counts(cells, ["A", "B"]).set_index("method")
    assert counts.loc["X", "dominated"] == 2 and counts.loc["X", "cells"] == 3
    assert counts.loc["A", "dominated"] == 0
    assert counts.loc["B", "dominated"] == 1  # cell 1 only (cell 2: B has the lower bias; cell 3: tie)


def test_tiny_mle_run(osipi):
    cells, counts, _, published = osipi.run(repeats=8, snrs=(200,), networks=False, quiet=True)
    ours = cells[cells.method == "fit-mle"].set_index(["region", "parameter"])
    # at SNR 200 the MLE recovers a liver-like tissue closely
    assert abs(ours.loc[("Liver", "f"), "bias"]) < 0.02
    assert abs(ours.loc[("Liver", "D"), "bias"]) < 1e-4
    # OSIPI masks: D only where f < 0.8, D* only where f > 0.03
    regions, _, _ = osipi.load_reference()
    fit_counts = counts[counts.method == "fit-mle"].set_index("parameter")["cells"]
    assert fit_counts["f"] == 27
    assert fit_counts["D"] == int((regions.f < 0.8).sum())
    assert fit_counts["Dstar"] == int((regions.f > 0.03).sum())
    assert len(published) == 19
    text = osipi.render_markdown(cells, counts, published, "python benchmarks/osipi_reference.py", 8, 1.0)
    assert "| **fit-mle** |" in text and "Liver" in text
