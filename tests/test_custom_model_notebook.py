"""docs/custom_model.ipynb: a model written in a notebook cell runs the whole label study."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parent.parent / "docs" / "custom_model.ipynb"


def test_custom_model_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "store no outputs"
    # the notebook uses the public face only
    sources = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
    assert "from qmri_labels." not in sources and "import qmri_labels." not in sources
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "net-self" in text and "alpha" in text and "StretchedExp" in text
    assert (tmp_path / "runs" / "custom_model" / "summary.csv").is_file()
