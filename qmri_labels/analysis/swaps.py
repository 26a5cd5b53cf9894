"""Fat/water swaps: how often an estimator lands in the wrong optimum of a magnitude fit.

The magnitude multi-echo likelihood of a water-fat voxel has two optima, a water-dominant and a
fat-dominant one, PDFF and about ``1 - PDFF`` (Bray et al., MRM 2023, "MAGORINO"). An estimate
is *swapped* when it sits nearer the other optimum than the truth's, i.e. on the other side of
PDFF = 0.5 than the truth. That is a statement about the two optima, not about noise: near
PDFF = 0.5 the two coincide and noise alone moves an estimate across, which is why the rates
are given by band of true PDFF (the bands next to 0.5 read as noise, the outer ones as swaps).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from qmri_labels.analysis.report import markdown_table

#: edges of the true-PDFF bands the swap rates are given in
PDFF_BANDS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


def swapped(estimate, truth) -> np.ndarray:
    """Whether each PDFF estimate lies on the other side of 0.5 than its truth (bool array).

    A truth of exactly 0.5 has no wrong side (False); a non-finite estimate is not counted as
    swapped (the valid fraction reports those).
    """
    estimate = np.asarray(estimate, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    return np.isfinite(estimate) & ((estimate - 0.5) * (truth - 0.5) < 0)


def swap_rates(estimates: Mapping[str, np.ndarray], truth, bands=PDFF_BANDS) -> pd.DataFrame:
    """Fraction of voxels each method puts in the wrong optimum, per band of true PDFF.

    Parameters
    ----------
    estimates : mapping of str to array (N,)
        PDFF estimates per method, of the same voxels.
    truth : array (N,)
        True PDFF of the voxels.
    bands : sequence of float
        Band edges in [0, 1]; the last band includes its upper edge.

    Returns
    -------
    DataFrame
        One row per method and band (``method``, ``band``, ``pdff_low``, ``pdff_high``, ``n``,
        ``n_swapped``, ``swap_fraction``), plus a row ``band = "all"`` per method.
    """
    truth = np.asarray(truth, dtype=np.float64).ravel()
    edges = np.asarray(bands, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"bands must be increasing edges, got {list(bands)}")
    # the last band is closed: a PDFF of exactly 1 belongs to it
    index = np.clip(np.searchsorted(edges, truth, side="right") - 1, 0, edges.size - 2)
    inside = (truth >= edges[0]) & (truth <= edges[-1])
    rows = []
    for method, estimate in estimates.items():
        estimate = np.asarray(estimate, dtype=np.float64).ravel()
        if estimate.shape != truth.shape:
            raise ValueError(f"{method}: {estimate.size} estimates for {truth.size} true values")
        swaps = swapped(estimate, truth)
        for k in range(edges.size - 1):
            sel = inside & (index == k)
            n = int(sel.sum())
            rows.append({"method": method, "band": f"{edges[k]:g}-{edges[k + 1]:g}", "pdff_low": edges[k],
                         "pdff_high": edges[k + 1], "n": n, "n_swapped": int(swaps[sel].sum()),
                         "swap_fraction": float(swaps[sel].mean()) if n else float("nan")})
        n = int(inside.sum())
        rows.append({"method": method, "band": "all", "pdff_low": edges[0], "pdff_high": edges[-1], "n": n,
                     "n_swapped": int(swaps[inside].sum()),
                     "swap_fraction": float(swaps[inside].mean()) if n else float("nan")})
    return pd.DataFrame(rows)


def swap_table(rates: pd.DataFrame) -> pd.DataFrame:
    """:func:`swap_rates` as a method x band table of swap fractions (the report's layout)."""
    wide = rates.pivot(index="method", columns="band", values="swap_fraction")
    order = list(dict.fromkeys(rates["band"]))
    methods = list(dict.fromkeys(rates["method"]))
    wide = wide.loc[methods, order]
    wide.columns.name = None
    return wide.reset_index()


def swap_text(rates: pd.DataFrame) -> str:
    """The swap table as aligned plain text (for the study's printed summary)."""
    table = swap_table(rates)
    bands = [c for c in table.columns if c != "method"]
    width = max(len(m) for m in [*table["method"], "method"]) + 2
    lines = ["fat/water swaps (fraction of held-out voxels by true PDFF)".ljust(width),
             "method".ljust(width) + "".join(f"{b:>10s}" for b in bands)]
    for _, row in table.iterrows():
        lines.append(str(row["method"]).ljust(width) + "".join(f"{row[b]:10.3f}" for b in bands))
    return "\n".join(lines)


def swap_section(rates: pd.DataFrame) -> str:
    """The report's section on fat/water swaps (Markdown)."""
    table = swap_table(rates)
    overall = rates[rates["band"] == "all"].set_index("method")["swap_fraction"]
    outer = rates[(rates["band"] != "all") & ((rates["pdff_high"] <= 0.3) | (rates["pdff_low"] >= 0.7))]
    outer = outer.groupby("method", sort=False)[["n", "n_swapped"]].sum()
    outer_rate = (outer["n_swapped"] / outer["n"].where(outer["n"] > 0)).reindex(overall.index)
    best, worst = overall.idxmin(), overall.idxmax()
    lines = ["## Fat/water swaps", "",
             "Fraction of the held-out voxels each method puts in the wrong optimum of the magnitude likelihood "
             "(PDFF estimate on the other side of 0.5 than the truth), by band of true PDFF. Next to 0.5 the two "
             "optima coincide and the rate is mostly noise; away from it (PDFF below 0.3 or above 0.7) a swap is "
             "a fat/water swap.", "",
             markdown_table(table), "",
             f"- Lowest overall: {best} ({overall[best]:.3g}); highest: {worst} ({overall[worst]:.3g}).",
             "- Away from 0.5 (PDFF < 0.3 or > 0.7): "
             + "; ".join(f"{m} {outer_rate[m]:.3g}" for m in overall.index) + "."]
    return "\n".join(lines)
