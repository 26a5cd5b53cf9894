import numpy as np
import pandas as pd
import pytest

from qmri_labels.analysis.fairness import label_ranking, seed_findings, seed_summary


def frame(rows):
    return pd.DataFrame(rows, columns=["method", "parameter", "varied", "mean_abs_bias", "mean_sd", "sensitivity",
                                       "rmse"])


def test_label_ranking_orders_by_each_metric_and_sensitivity_by_distance_to_one():
    summary = frame([("a", "f", True, 0.1, 0.3, 0.5, 0.4), ("b", "f", True, 0.2, 0.1, 1.2, 0.3),
                     ("c", "f", True, 0.3, 0.2, 0.95, 0.5), ("a", "S0", False, 0, 0, np.nan, 0)])
    r = label_ranking(summary, ["a", "b", "c"]).set_index("metric")
    assert r.loc["mean_abs_bias", "ranking"] == "a > b > c"
    assert r.loc["mean_sd", "ranking"] == "b > c > a"
    assert r.loc["sensitivity", "ranking"] == "c > b > a"  # |1 - 0.95| < |1 - 1.2| < |1 - 0.5|
    assert r.loc["rmse", "best"] == "b" and set(r["parameter"]) == {"f"}


def test_seed_findings_keep_only_differences_beyond_the_seed_spread():
    rows = []
    for seed, (ra, rb, rc) in enumerate([(1.0, 2.0, 1.05), (1.1, 2.1, 0.95), (0.9, 1.9, 1.0)]):
        for method, rmse in (("a", ra), ("b", rb), ("c", rc)):
            rows.append((method, "f", True, 0.1, 0.1, 1.0, rmse))
    per_seed = frame(rows)
    per_seed["seed"] = np.repeat([0, 1, 2], 3)
    table = seed_summary(per_seed).set_index("method")
    assert table.loc["a", "rmse_mean"] == pytest.approx(1.0) and table.loc["a", "rmse_sd"] == pytest.approx(0.1)
    assert (table["n_seeds"] == 3).all()
    found = seed_findings(per_seed, [("a", "b"), ("a", "c")]).set_index(["a", "b", "metric"])
    assert found.loc[("a", "b", "rmse"), "finding"]  # difference 1.0 >> spread 0.1
    assert found.loc[("a", "b", "rmse"), "mean_diff"] == pytest.approx(-1.0)
    assert not found.loc[("a", "c", "rmse"), "finding"]  # difference 0 within the spread
    one = per_seed[per_seed["seed"] == 0]
    assert not seed_findings(one, [("a", "b")])["finding"].any()  # one seed: no spread, no finding
