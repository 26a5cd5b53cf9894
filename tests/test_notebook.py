"""docs/analysis.ipynb runs end to end on a tiny results folder.

The folder is built with the analysis API (evaluate_grid + write_report + summary.csv), the same
files the study command writes, so that this test does not depend on training networks.
"""

from pathlib import Path

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from qmri_labels.analysis import GridSpec, evaluate_grid, summarize, write_report  # noqa: E402
from qmri_labels.data import UniformPrior  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parent.parent / "docs" / "analysis.ipynb"


def tiny_results(folder: Path) -> None:
    grid = GridSpec.for_prior(UniformPrior().support, (0, 20, 50, 100, 200, 800), points_per_axis=3, repeats=8)
    centre = UniformPrior().support.mean(0)
    truth = np.repeat(grid.truth, grid.repeats, axis=0)

    def shrink(weight, noise_sd, seed):
        state = {"pos": 0}

        def predict(signals):
            t = truth[state["pos"]:state["pos"] + len(signals)]
            state["pos"] += len(signals)
            est = weight * t + (1 - weight) * centre
            return est * (1 + noise_sd * np.random.default_rng(seed).standard_normal(est.shape))

        return predict

    estimators = {"fit-mle": shrink(1.0, 0.1, 0), "net-gt": shrink(0.2, 0.01, 1), "net-mle": shrink(0.9, 0.08, 2),
                  "net-hybrid-0.5": shrink(0.6, 0.05, 3)}
    result = evaluate_grid(estimators, grid)
    summary = summarize(result)
    summary.to_csv(folder / "summary.csv", index=False)
    write_report(folder, result, summary, config={"alpha": [0.5]}, figures=False)


def test_analysis_notebook_executes(tmp_path, monkeypatch):
    tiny_results(tmp_path)
    monkeypatch.setenv("QMRI_LABELS_RESULTS", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "store no outputs"
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # 3x3 panel, quiver, hist2d, alpha sweep
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "net-hybrid-0.5" in text and "sensitivity" in text


def test_analysis_notebook_finds_the_newest_study_folder_from_docs(tmp_path, monkeypatch):
    """Opened from docs/ with no QMRI_LABELS_RESULTS, the notebook reads the newest label-study
    folder that the study command wrote into runs/ of the folder above (the repository root)."""
    import os

    old, new = tmp_path / "runs" / "default-20260101-000000", tmp_path / "runs" / "default-20260102-000000"
    for folder in (old, new):
        folder.mkdir(parents=True)
        tiny_results(folder)
    os.utime(old / "grid_spec.json", (1, 1))  # the choice goes by time, not by name or order
    (tmp_path / "docs").mkdir()
    monkeypatch.delenv("QMRI_LABELS_RESULTS", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = nb.cells[:2]  # the title and the cell that finds and reads the folder
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path / "docs")}})
    client.execute()
    text = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    assert f"{os.path.join('..', 'runs', new.name)}: methods" in text
