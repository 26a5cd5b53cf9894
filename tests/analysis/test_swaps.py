"""Fat/water swap rates and the label ranking against IVIM's, on constructed numbers."""

import numpy as np
import pandas as pd
import pytest

from qmri_labels.analysis.findings import label_ranking, ranking_sentences
from qmri_labels.analysis.swaps import swap_rates, swap_section, swap_table, swap_text, swapped


def test_swapped_is_the_other_side_of_one_half():
    truth = np.array([0.05, 0.05, 0.95, 0.95, 0.5, 0.2])
    est = np.array([0.9, 0.1, 0.1, 0.8, 0.9, np.nan])
    assert swapped(est, truth).tolist() == [True, False, True, False, False, False]


def test_swap_rates_by_band_on_constructed_voxels():
    truth = np.array([0.05] * 10 + [0.95] * 10 + [1.0] * 2)
    # method a swaps 3 of the 10 water-dominant voxels and every fat-dominant one
    a = np.concatenate([np.r_[[0.95] * 3, [0.05] * 7], [0.05] * 10, [0.0, 0.0]])
    b = truth.copy()
    rates = swap_rates({"a": a, "b": b}, truth)
    by = rates.set_index(["method", "band"])
    assert by.loc[("a", "0-0.1"), "n"] == 10 and by.loc[("a", "0-0.1"), "swap_fraction"] == pytest.approx(0.3)
    # PDFF exactly 1 falls in the last, closed band
    assert by.loc[("a", "0.9-1"), "n"] == 12 and by.loc[("a", "0.9-1"), "swap_fraction"] == pytest.approx(1.0)
    assert by.loc[("a", "all"), "swap_fraction"] == pytest.approx(15 / 22)
    assert by.loc[("b", "all"), "swap_fraction"] == 0
    assert np.isnan(by.loc[("a", "0.3-0.5"), "swap_fraction"])
    table = swap_table(rates)
    assert list(table["method"]) == ["a", "b"] and list(table.columns)[-1] == "all"
    assert "0.300" in swap_text(rates)
    section = swap_section(rates)
    assert "Lowest overall: b (0)" in section and "a 0.682" in section


def test_swap_rates_refuse_mismatched_lengths():
    with pytest.raises(ValueError, match="estimates for"):
        swap_rates({"a": np.zeros(3)}, np.zeros(4))


def _summary(gt_bias, gt_sd):
    rows = [("net-gt", gt_bias, gt_sd), ("net-mle", 0.01, 0.05), ("net-self", 0.012, 0.06), ("fit-mle", 0.0, 0.07)]
    return pd.DataFrame([{"method": m, "parameter": "T2", "mean_abs_bias": b, "mean_sd": s, "varied": True}
                         for m, b, s in rows])


def test_label_ranking_holds_and_differs():
    assert label_ranking(_summary(0.05, 0.01))["holds"]
    broken = label_ranking(_summary(0.05, 0.09))
    assert not broken["holds"] and broken["bias_holds"] and not broken["sd_holds"]
    assert "holds on t2" in ranking_sentences(_summary(0.05, 0.01), "t2")[0]
    assert "differs on t2 (GT's lower SD not seen)" in ranking_sentences(_summary(0.05, 0.09), "t2")[0]
    assert ranking_sentences(_summary(0.05, 0.01).query("method != 'net-gt'"), "t2") == []
