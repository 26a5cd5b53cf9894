"""A study's results folder, read back as one object: :func:`load_results` -> :class:`StudyResult`.

Every study kind writes a folder with a ``manifest.json`` (what ran, with which seeds, data
fingerprints, versions and timings), its configuration (``config.yaml``), tables as CSV, a
``report.md`` and figures as PNG; label studies also write their trained networks as bundles
under ``networks/``. :class:`StudyResult` gives all of these by name, so that a notebook does
not need to know the folder's layout::

    result = load_results("runs/default")
    result.summary                      # summary.csv as a DataFrame
    result.tables["comparisons"]        # any other table, read when first asked for
    result.figures["bias_sd_rmse"]      # path of a figure
    result.grid                         # the evaluation grid rebuilt (GridResult), for the plots
    result.network("net-gt").predict(signals)

A folder written by :func:`qmri_labels.analysis.write_report` alone (a grid, no study around it)
reads back too: its manifest and config are then empty and its summary is computed from the grid.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterator

import pandas as pd
import yaml

from qmri_labels.analysis import GridResult, summarize
from qmri_labels.analysis.report import read_grid_results
from qmri_labels.estimators import NetworkEstimator

__all__ = ["StudyResult", "load_results"]


class _Tables(Mapping):
    """The folder's CSV tables by stem, each read once, when first asked for (grids can be large)."""

    def __init__(self, paths: Mapping[str, Path]):
        self._paths = dict(paths)
        self._frames: dict[str, pd.DataFrame] = {}

    def __getitem__(self, name: str) -> pd.DataFrame:
        if name not in self._paths:
            raise KeyError(f"no table {name!r} in this results folder; tables: {sorted(self._paths)}")
        if name not in self._frames:
            self._frames[name] = pd.read_csv(self._paths[name])
        return self._frames[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __repr__(self) -> str:
        return f"tables({', '.join(sorted(self._paths))})"


@dataclass(eq=False)
class StudyResult:
    """What one study wrote, by name.

    Attributes
    ----------
    folder : Path
        The results folder.
    kind : str
        The study kind (``ivim_labels``, ``qsm_labels``, ``mismatch``, ...), from the manifest.
    manifest : dict
        ``manifest.json``: command, seeds, dataset fingerprints, versions, device, timings.
    config : dict
        ``config.yaml``: the configuration the study ran with (empty if the kind writes none).
    tables : Mapping[str, DataFrame]
        Every ``*.csv`` of the folder (not of its subfolders) by file stem, read when first used.
    figures : dict[str, Path]
        Every ``*.png`` of the folder and of ``figures/`` by file stem.
    networks : dict[str, Path]
        Trained network bundles under ``networks/`` by name.
    report : str
        ``report.md`` (empty if absent).
    """

    folder: Path
    kind: str
    manifest: dict = field(repr=False)
    config: dict = field(repr=False)
    tables: Mapping = field(repr=False)
    figures: dict = field(repr=False)
    networks: dict = field(repr=False)
    report: str = field(repr=False)

    @cached_property
    def grids(self) -> dict[float, GridResult]:
        """The evaluation grid by SNR, rebuilt from ``grid.csv`` (empty if the study has none)."""
        return read_grid_results(self.folder)

    @cached_property
    def grid(self) -> GridResult | None:
        """The grid at the study's SNR (the first if several; None without a grid)."""
        if not self.grids:
            return None
        first = self.grids[next(iter(self.grids))]
        spec = json.loads((self.folder / "grid_spec.json").read_text())
        return self.grids.get(float(spec.get("snr", first.grid.snr)), first)

    @cached_property
    def summary(self) -> pd.DataFrame:
        """``summary.csv`` (one row per method and parameter), or computed from the grid."""
        if "summary" in self.tables:
            return self.tables["summary"]
        if self.grid is not None:
            return summarize(self.grid)
        raise KeyError(f"{self.folder} has neither summary.csv nor grid.csv")

    @property
    def methods(self) -> list[str]:
        """The methods compared, in the summary's order."""
        return list(dict.fromkeys(self.summary["method"]))

    def network(self, name: str) -> NetworkEstimator:
        """The trained network ``name`` (a key of :attr:`networks`), loaded from its bundle."""
        if name not in self.networks:
            raise KeyError(f"no network {name!r} in {self.folder}; networks: {sorted(self.networks)}")
        return NetworkEstimator.load(self.networks[name])


def load_results(folder) -> StudyResult:
    """Read a study's results folder.

    Parameters
    ----------
    folder : str or Path
        A folder written by ``python -m qmri_labels.study`` or :func:`qmri_labels.run_study`.

    Returns
    -------
    StudyResult
    """
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not any((folder / name).is_file() for name in ("manifest.json", "summary.csv", "grid.csv")):
        raise FileNotFoundError(f"{folder} is not a results folder: it has no manifest.json, summary.csv or grid.csv")
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    config_path = folder / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    config = config or {}
    tables = _Tables({p.stem: p for p in sorted(folder.glob("*.csv"))})
    figures = {p.stem: p for p in sorted([*folder.glob("*.png"), *(folder / "figures").glob("*.png")])}
    networks = {p.name: p for p in sorted((folder / "networks").glob("*")) if (p / "manifest.json").is_file()}
    report_path = folder / "report.md"
    kind = manifest.get("kind") or config.get("kind") or ""
    return StudyResult(folder=folder, kind=str(kind), manifest=manifest, config=config, tables=tables,
                       figures=figures, networks=networks, report=report_path.read_text() if report_path.is_file() else "")
