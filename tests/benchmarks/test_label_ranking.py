"""The label-ranking tables are read from a results folder as the study wrote it: methods in
order of mean |bias|, bias_reduced placed against GT's bias and MLE's SD, swap rates by band."""

import pandas as pd
import yaml


def _folder(tmp_path, br_bias, br_sd, swaps=True):
    rows = []
    for method, bias, sd in (("fit-mle", 0.02, 0.09), ("net-gt", 0.05, 0.03), ("net-mle", 0.01, 0.08),
                             ("net-bias_reduced", br_bias, br_sd)):
        rows.append({"snr": 60.0, "method": method, "parameter": "PDFF", "unit": "1", "varied": True,
                     "mean_abs_bias": bias, "mean_sd": sd, "rmse": (bias ** 2 + sd ** 2) ** 0.5, "sensitivity": 0.9})
        rows.append({"snr": 60.0, "method": method, "parameter": "S0", "unit": "a.u.", "varied": False,
                     "mean_abs_bias": 0.0, "mean_sd": 0.01, "rmse": 0.01, "sensitivity": float("nan")})
    folder = tmp_path / f"run-{br_bias}-{br_sd}"
    folder.mkdir()
    pd.DataFrame(rows).to_csv(folder / "summary.csv", index=False)
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": "fatwater", "n_train": 10, "max_epochs": 2,
                                                       "grid": {"points_per_axis": 3, "repeats": 4}}))
    if swaps:
        pd.DataFrame([{"method": m, "band": b, "swap_fraction": f} for m, f in (("fit-mle", 0.1), ("net-gt", 0.2))
                      for b in ("0-0.5", "0.5-1", "all")]).to_csv(folder / "swap_rates.csv", index=False)
    return folder


def test_tables_order_methods_by_bias_and_place_bias_reduced(load_benchmark, tmp_path):
    bench = load_benchmark("label_ranking")
    text = "\n".join(bench.folder_tables(_folder(tmp_path, 0.03, 0.05)))
    methods = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| net-") or
               line.startswith("| fit-")]
    assert methods[:4] == ["net-mle", "fit-mle", "net-bias_reduced", "net-gt"]
    assert "**S0**" not in text  # only the varied parameters
    assert "where Mao et al. place it" in text and "not where" not in text
    assert "| fit-mle | 0.1 | 0.1 | 0.1 |" in text  # the swap fractions by band
    assert "differs on fatwater" in text or "holds on fatwater" in text


def test_bias_reduced_outside_its_place_is_said(load_benchmark, tmp_path):
    bench = load_benchmark("label_ranking")
    text = "\n".join(bench.folder_tables(_folder(tmp_path, 0.06, 0.085, swaps=False)))
    assert "not where Mao et al. place it (bias not below GT's and SD not below MLE's)" in text
    assert "swap" not in text


def test_single_start_swaps_are_fitted_on_the_studys_heldout_voxels(load_benchmark, tmp_path):
    import json

    from qmri_labels.data import DatasetSpec
    from qmri_labels.physics import get_model

    bench = load_benchmark("label_ranking")
    model = get_model("fatwater")
    spec = DatasetSpec(model="fatwater", protocol=model.default_protocol, snr=60.0, n=40, seed=3,
                       prior={"kind": "uniform", "model": "fatwater",
                              "ranges": {"S0": [1.0, 1.0], "PDFF": [0.85, 0.95], "R2star": [80.0, 120.0]}})
    (tmp_path / "manifest.json").write_text(json.dumps({"data": {"heldout": {"spec": spec.to_dict()}}}))
    by_pdff, by_r2 = bench.fitter_swaps(tmp_path)
    rates = by_pdff.set_index(["method", "band"])["swap_fraction"]
    # fat-dominant truths: one water-dominant start lands in the water optimum, both starts do not
    assert rates[("fit-mle (1 start)", "all")] > 0.5
    assert rates[("fit-mle (default starts)", "all")] < 0.1
    # every voxel has R2* in [80, 120]: the first R2* band holds them all, the others none
    r2 = by_r2.set_index("method")
    assert r2.loc["fit-mle (1 start)", "R2* 0-250"] == rates[("fit-mle (1 start)", "all")]
    assert r2[["R2* 250-500", "R2* 500-750", "R2* 750-1000"]].isna().all().all()


def test_the_overview_says_where_ivims_ranking_holds(load_benchmark, tmp_path):
    bench = load_benchmark("label_ranking")
    folder = _folder(tmp_path, 0.03, 0.05, swaps=False)
    rows = [line for line in bench.overview([folder]) if line.startswith("| fatwater")]
    # GT: more bias and less SD than MLE in the fake folder (no self row): IVIM's ranking holds
    assert rows == [f"| fatwater | `{folder.name}` | PDFF | 0.05 / 0.03 | 0.01 / 0.08 | - / - | holds |"]


def test_the_placement_table_answers_for_each_folder(load_benchmark, tmp_path):
    bench = load_benchmark("label_ranking")
    inside, outside = _folder(tmp_path, 0.03, 0.05, swaps=False), _folder(tmp_path, 0.06, 0.05, swaps=False)
    rows = [line for line in bench.placements([inside, outside]) if line.startswith("| fatwater")]
    assert rows == ["| fatwater (10) | PDFF | 0.03 | 0.05 | 0.05 | 0.08 | 0.09 | yes |",
                    "| fatwater (10) | PDFF | 0.06 | 0.05 | 0.05 | 0.08 | 0.09 | no |"]
