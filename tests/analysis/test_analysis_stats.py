"""Paired comparisons, multiple-comparison correction and effect sizes."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from qmri_labels.analysis import (
    GridSpec,
    bonferroni,
    evaluate_grid,
    paired_comparisons,
    paired_effect_size,
)
from qmri_labels.analysis.stats import compare_on_grid
from qmri_labels.data import UniformPrior


def test_paired_t_matches_scipy_and_detects_shift():
    rng = np.random.default_rng(0)
    base = rng.normal(size=60)
    data = {"a": base + rng.normal(0, 0.1, 60), "b": base + 0.5 + rng.normal(0, 0.1, 60),
            "c": base + rng.normal(0, 0.1, 60)}
    table = paired_comparisons(data).set_index(["a", "b"])
    assert len(table) == 3
    ref = sps.ttest_rel(data["a"], data["b"])
    row = table.loc[("a", "b")]
    assert row["t"] == pytest.approx(ref.statistic, rel=1e-10)
    assert row["p_value"] == pytest.approx(ref.pvalue, rel=1e-8)
    assert row["p_adjusted"] == pytest.approx(min(1.0, 3 * ref.pvalue))
    assert row["significant"] and row["mean_diff"] < 0 and row["ci_low"] < row["mean_diff"] < row["ci_high"]
    assert row["cohen_dz"] == pytest.approx(row["mean_diff"] / np.std(data["a"] - data["b"], ddof=1))
    assert not table.loc[("a", "c"), "significant"]


def test_reference_pairs_dataframe_input_and_nan_pairs():
    frame = pd.DataFrame({"ref": [1.0, 2, 3, 4, np.nan], "x": [1.1, 2.3, 2.9, 4.2, 5], "y": [2.0, 3, 4, 5, 6]})
    table = paired_comparisons(frame, reference="ref")
    assert list(zip(table.a, table.b)) == [("ref", "x"), ("ref", "y")]
    assert list(table.n) == [4, 4]
    # y - ref is exactly 1 everywhere: no variability, p = 0, effect size infinite
    row = table.iloc[1]
    assert row["p_value"] == 0.0 and np.isinf(row["cohen_dz"]) and row["significant"]


def test_bonferroni_and_holm():
    p = np.array([0.01, 0.04, 0.03, np.nan])
    np.testing.assert_allclose(bonferroni(p), [0.03, 0.12, 0.09, np.nan])
    np.testing.assert_allclose(bonferroni(p, "holm"), [0.03, 0.06, 0.06, np.nan])
    np.testing.assert_allclose(bonferroni(p[:3], "none"), p[:3])
    with pytest.raises(ValueError, match="correction"):
        bonferroni(p, "fdr")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bonferroni([1.5])


def test_effect_size_and_validation():
    eff = paired_effect_size([1, 2, 3, 4], [0, 1, 2, 4])
    assert eff["n"] == 4 and eff["mean_diff"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="same length"):
        paired_effect_size([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="two methods"):
        paired_comparisons({"a": [1, 2, 3]})
    with pytest.raises(ValueError, match="not in the data"):
        paired_comparisons({"a": [1, 2], "b": [2, 3]}, pairs=[("a", "z")])
    with pytest.raises(ValueError, match="alpha"):
        paired_comparisons({"a": [1, 2], "b": [2, 3]}, alpha=2)
    with pytest.raises(ValueError, match="same number"):
        paired_comparisons({"a": [1, 2], "b": [2, 3, 4]})


def test_compare_on_grid_corrects_over_all_parameters():
    grid = GridSpec.for_prior(UniformPrior().support, (0, 50, 200, 800), points_per_axis=3, repeats=10,
                              noise="gaussian")
    truth_mid = UniformPrior().support.mean(0)
    estimators = {"mid": lambda s: np.tile(truth_mid, (len(s), 1)),
                  "noisy": lambda s: np.tile(truth_mid, (len(s), 1)) * (1 + 0.1 * (s[:, :1] - s[:, :1].mean()))}
    table = compare_on_grid(evaluate_grid(estimators, grid, crlb=False), metric="sd")
    assert list(table.parameter) == ["f", "D", "Dstar"]
    np.testing.assert_allclose(table.p_adjusted, np.minimum(1, 3 * table.p_value))
    assert table.significant.all()  # the constant has SD 0, the other does not
