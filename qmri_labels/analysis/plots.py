"""Figures of bias, variance and errors across the parameter range (headless-safe).

Every function builds a :class:`matplotlib.figure.Figure` directly (no pyplot state, so it
works without a display and leaks nothing in long runs), returns it, and, when ``path`` is
given, also writes it atomically (PNG by default, PDF when ``fmt="pdf"`` or the path ends in
``.pdf``). Colours are fixed per method name across all figures (:func:`method_colors`): a
report draws every figure from one such map, passed as ``colors``.
Diffusivities are drawn in units of 1e-3 mm^2/s.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from qmri_labels.analysis.calibration import CalibrationResult
from qmri_labels.analysis.grid import GridResult
from qmri_labels.analysis.metrics import marginal_curves
from qmri_labels.fileio import atomic_write_bytes
from qmri_labels.physics import get_model

FORMATS = ("png", "pdf", "svg")

_PARAM_LABEL = {"S0": "$S_0$", "f": "$f$", "D": "$D$", "Dstar": "$D^*$"}
#: fixed colours of the study's standard methods (seaborn "colorblind" palette)
_FIXED = {
    "fit-mle": "#000000",
    "net-gt": "#0173b2",
    "net-mle": "#de8f05",
    "net-self": "#029e73",
}
_OTHERS = ["#cc78bc", "#ca9161", "#fbafe4", "#949494", "#ece133", "#56b4e9", "#d55e00", "#8c564b"]


def method_colors(methods) -> dict:
    """Colour of each method, the same in every figure.

    ``fit-mle`` black, ``net-gt`` blue, ``net-mle`` orange, ``net-self`` green; hybrids
    ``net-hybrid-<alpha>`` on a purple ramp by alpha; any other name a colour of its own,
    chosen from its position among the other names.
    """
    colors = {}
    others = []
    for m in methods:
        if m in _FIXED:
            colors[m] = _FIXED[m]
            continue
        alpha = _hybrid_alpha(m)
        if alpha is not None:
            colors[m] = colormaps["Purples"](0.45 + 0.5 * min(max(alpha, 0.0), 1.0))
        else:
            others.append(m)
    for k, m in enumerate(others):
        colors[m] = _OTHERS[k % len(_OTHERS)]
    return colors


def _colors(colors: dict | None, methods) -> dict:
    """``colors`` (a report's one map) where given, completed for methods it lacks."""
    if colors is None:
        return method_colors(methods)
    missing = [m for m in methods if m not in colors]
    return {**method_colors(missing), **colors} if missing else colors


def _hybrid_alpha(method: str) -> float | None:
    match = re.fullmatch(r".*hybrid-?([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)", str(method))
    return float(match.group(1)) if match else None


def _scale(unit: str) -> tuple[float, str]:
    """Display factor and unit label: diffusivities in 1e-3 mm^2/s."""
    if unit == "mm^2/s":
        return 1e3, r"$10^{-3}$ mm$^2$/s"
    if unit in ("1", ""):
        return 1.0, ""
    return 1.0, unit


def _label(name: str, unit: str, prefix: str = "") -> str:
    factor, shown = _scale(unit)
    text = f"{prefix}{_PARAM_LABEL.get(name, name)}"
    return f"{text} [{shown}]" if shown else text


def save_figure(fig: Figure, path, fmt: str | None = None, dpi: int = 120) -> Path:
    """Write ``fig`` atomically; the format comes from ``fmt`` or the path's suffix.

    Returns the path written (its suffix set to the format).
    """
    path = Path(path)
    suffix = path.suffix.lstrip(".").lower()
    if fmt is None:
        fmt = suffix if suffix in FORMATS else "png"
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise ValueError(f"figure format must be one of {FORMATS}, got {fmt!r}")
    # names like "net-hybrid-0.5" have a dot that is not a format suffix
    path = path.with_suffix("." + fmt) if suffix in FORMATS else path.with_name(f"{path.name}.{fmt}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=dpi,
                metadata={"Software": None} if fmt == "png" else None)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _finish(fig, path, fmt):
    if path is not None:
        save_figure(fig, path, fmt)
    return fig


def _check_methods(result: GridResult, methods) -> list:
    methods = list(result.methods if methods is None else methods)
    unknown = set(methods) - set(result.methods)
    if unknown:
        raise ValueError(f"methods {sorted(unknown)} are not in the result {result.methods}")
    return methods


def _check_params(result: GridResult, parameters) -> list:
    parameters = list(result.grid.varied if parameters is None else parameters)
    bad = set(parameters) - set(result.grid.varied)
    if bad:
        raise ValueError(f"parameters {sorted(bad)} are not varied on the grid (varied: {result.grid.varied})")
    return parameters


def plot_bias_sd_rmse(result: GridResult, parameters=None, methods=None, path=None, fmt: str | None = None,
                      crlb: bool = True, colors: dict | None = None) -> Figure:
    """The 3 x 3 panel: bias, SD and RMSE (rows) against the true value of each parameter
    (columns), averaged over the other parameters, one line per method.

    Bias panels are centred on 0; SD panels show the Cramer-Rao bound (dashed) when the
    result has one.

    Parameters
    ----------
    result : GridResult
    parameters : sequence of str, optional
        Default: the grid's varied parameters (f, D, D* for IVIM).
    methods : sequence of str, optional
    path : str or Path, optional
        Where to save the figure.
    fmt : {"png", "pdf", "svg"}, optional
    crlb : bool
        Draw the CRLB floor in the SD panels.
    colors : dict, optional
        Method -> colour (default :func:`method_colors` of the result's methods).

    Returns
    -------
    Figure
    """
    parameters = _check_params(result, parameters)
    methods = _check_methods(result, methods)
    colors = _colors(colors, result.methods)
    units = result.units
    rows = ("bias", "sd", "rmse")
    row_label = {"bias": "bias", "sd": "SD", "rmse": "RMSE"}
    fig = Figure(figsize=(4.2 * len(parameters), 9.5), layout="constrained")
    axes = np.atleast_2d(fig.subplots(3, len(parameters), squeeze=False))
    for j, name in enumerate(parameters):
        curves = marginal_curves(result, name)
        mine = curves[curves["parameter"] == name]
        factor, _ = _scale(units.get(name, ""))
        for i, key in enumerate(rows):
            ax = axes[i, j]
            for m in methods:
                c = mine[mine["method"] == m]
                ax.plot(c["truth"] * factor, c[key] * factor, marker="o", ms=3, lw=1.5, color=colors[m], label=m)
            if key == "sd" and crlb and result.crlb_sd is not None:
                c = mine[mine["method"] == methods[0]]
                if np.isfinite(c["crlb_sd"]).any():
                    ax.plot(c["truth"] * factor, c["crlb_sd"] * factor, ls="--", color="0.35", lw=1.2,
                            label="CRLB (unbiased floor)")
            if key == "bias":
                ax.axhline(0.0, color="0.6", lw=0.8)
                lim = np.nanmax(np.abs(ax.get_ylim()))
                if np.isfinite(lim) and lim > 0:
                    ax.set_ylim(-lim, lim)
            else:
                ax.set_ylim(bottom=0)
            ax.set_xlabel(_label(name, units.get(name, ""), "true "))
            ax.set_ylabel(_label(name, units.get(name, ""), f"{row_label[key]} of "))
            ax.grid(alpha=0.3)
    handles, labels = axes[1, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), frameon=False)
    fig.suptitle(f"{result.grid.model.upper()}, SNR {result.grid.snr:g} ({result.grid.noise}), "
                 f"{result.grid.repeats} repeats per point")
    return _finish(fig, path, fmt)


def plot_bias_quiver(result: GridResult, x: str = "f", y: str = "Dstar", methods=None, path=None,
                     fmt: str | None = None, colors: dict | None = None) -> Figure:
    """Bias vectors in a 2-D parameter plane, one panel per method.

    Each arrow starts at a true ``(x, y)`` and ends at the mean estimate there, averaged over
    the other varied parameters: arrows pointing inwards show estimates pulled towards the
    middle of the prior.
    """
    _check_params(result, [x, y])
    if x == y:
        raise ValueError("x and y must be different parameters")
    methods = _check_methods(result, methods)
    colors = _colors(colors, result.methods)
    units = result.units
    names = list(result.param_names)
    ix, iy = names.index(x), names.index(y)
    fx, _ = _scale(units.get(x, ""))
    fy, _ = _scale(units.get(y, ""))
    table = pd.DataFrame({"tx": result.truth[:, ix], "ty": result.truth[:, iy]})
    ncols = min(len(methods), 3)
    nrows = int(np.ceil(len(methods) / ncols))
    fig = Figure(figsize=(4.3 * ncols, 4.0 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, m in zip(axes, methods):
        t = table.assign(mx=result.mean[m][:, ix], my=result.mean[m][:, iy]).groupby(["tx", "ty"]).mean().reset_index()
        ax.quiver(t["tx"] * fx, t["ty"] * fy, (t["mx"] - t["tx"]) * fx, (t["my"] - t["ty"]) * fy,
                  angles="xy", scale_units="xy", scale=1, color=colors[m], width=0.005)
        ax.scatter(t["tx"] * fx, t["ty"] * fy, s=6, color="0.5", zorder=3)
        ax.set_title(m)
        ax.set_xlabel(_label(x, units.get(x, ""), "true "))
        ax.set_ylabel(_label(y, units.get(y, ""), "true "))
        ax.grid(alpha=0.3)
    for ax in axes[len(methods):]:
        ax.set_visible(False)
    fig.suptitle(f"bias vectors: truth -> mean estimate ({x}, {y})")
    return _finish(fig, path, fmt)


def plot_error_hist2d(result: GridResult, method_a: str, method_b: str, parameters=None, quantity: str = "rmse",
                      bins: int = 30, path=None, fmt: str | None = None) -> Figure:
    """Method-vs-method 2-D histogram of per-grid-point errors, one panel per parameter.

    Points below the diagonal are grid points where ``method_b`` has the smaller error; the
    fraction on each side is printed in the panel.

    Parameters
    ----------
    quantity : {"rmse", "abs_bias", "sd"}
        Per-point error compared.
    """
    pick = {"rmse": lambda m, i: result.rmse[m][:, i], "abs_bias": lambda m, i: np.abs(result.bias[m][:, i]),
            "sd": lambda m, i: result.sd[m][:, i]}
    if quantity not in pick:
        raise ValueError(f"quantity must be one of {sorted(pick)}, got {quantity!r}")
    _check_methods(result, [method_a, method_b])
    parameters = _check_params(result, parameters)
    units = result.units
    names = list(result.param_names)
    fig = Figure(figsize=(4.3 * len(parameters), 4.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(parameters), squeeze=False)).ravel()
    qlabel = {"rmse": "RMSE", "abs_bias": "|bias|", "sd": "SD"}[quantity]
    for ax, name in zip(axes, parameters):
        i = names.index(name)
        factor, _ = _scale(units.get(name, ""))
        a, b = pick[quantity](method_a, i) * factor, pick[quantity](method_b, i) * factor
        ok = np.isfinite(a) & np.isfinite(b)
        a, b = a[ok], b[ok]
        hi = max(float(np.max(a, initial=0)), float(np.max(b, initial=0))) or 1.0
        edges = np.linspace(0, hi * 1.02, bins + 1)
        counts, xe, ye, image = ax.hist2d(a, b, bins=[edges, edges], cmin=1, cmap="viridis")
        fig.colorbar(image, ax=ax, label="grid points")
        ax.plot([0, hi], [0, hi], color="0.3", lw=1, ls="--")
        if a.size:
            below = float(np.mean(b < a))
            ax.text(0.04, 0.96, f"{method_b} lower: {below:.0%}\n{method_a} lower: {np.mean(a < b):.0%}",
                    transform=ax.transAxes, va="top", fontsize=8,
                    bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.7"})
        ax.set_xlabel(_label(name, units.get(name, ""), f"{qlabel} {method_a}, "))
        ax.set_ylabel(_label(name, units.get(name, ""), f"{qlabel} {method_b}, "))
        ax.set_aspect("equal")
    fig.suptitle(f"per-point {qlabel}: {method_a} vs {method_b}")
    return _finish(fig, path, fmt)


def alpha_sweep_table(summary: pd.DataFrame, gt: str = "net-gt", mle: str = "net-mle") -> pd.DataFrame:
    """Rows of a summary that form an alpha sweep, with an ``alpha`` column.

    Hybrid methods named ``...hybrid-<alpha>`` take their alpha from the name; ``gt`` counts as
    alpha = 0 and ``mle`` as alpha = 1 (the hybrid loss's endpoints). Returns an empty frame if
    the summary has no hybrid method.
    """
    if "method" not in summary:
        raise ValueError("summary needs a 'method' column")
    alphas = summary["method"].map(_hybrid_alpha)
    alphas = alphas.where(alphas.notna(), summary["method"].map({gt: 0.0, mle: 1.0}))
    out = summary.assign(alpha=alphas)
    if not summary["method"].map(_hybrid_alpha).notna().any():
        return out.iloc[0:0]
    return out[out["alpha"].notna()].sort_values(["parameter", "alpha"]).reset_index(drop=True)


#: the line joining the alphas of a sweep (its markers take the methods' colours)
SWEEP_COLOR = "0.45"


def _from_zero(ax, key: str) -> None:
    """An error axis starts at 0; a signed one is centred on 0; a sensitivity axis shows 0 and 1."""
    lo, hi = ax.get_ylim()
    if key == "sensitivity":
        ax.set_ylim(min(0.0, lo), max(1.05, hi))
        ax.axhline(1.0, color="0.6", lw=0.8, ls="--")
    elif key == "mean_bias":
        lim = max(abs(lo), abs(hi))
        ax.set_ylim(-lim, lim)
        ax.axhline(0.0, color="0.6", lw=0.8)
    else:
        ax.set_ylim(0.0, max(hi, 0.0) * 1.05 or 1.0)


def plot_alpha_sweep(sweep: pd.DataFrame, parameters=None, metrics=("mean_abs_bias", "mean_sd", "rmse"),
                     units: dict | None = None, path=None, fmt: str | None = None,
                     colors: dict | None = None) -> Figure:
    """Bias and SD (and RMSE) against the hybrid weight alpha, one column per parameter.

    Parameters
    ----------
    sweep : DataFrame
        Columns ``alpha``, ``parameter`` and the ``metrics`` (e.g. from
        :func:`alpha_sweep_table` of a summary); repeated alphas (several seeds) are drawn as
        mean +- SD. With a ``method`` column each alpha's marker takes its method's colour.
    units : dict, optional
        Parameter units (default IVIM's).
    colors : dict, optional
        Method -> colour (default :func:`method_colors` of the sweep's methods).

    Returns
    -------
    Figure

    Every axis starts at zero (alpha runs from 0 to 1; the sensitivity axis shows 0 and 1), so
    that small differences look small.
    """
    required = {"alpha", "parameter", *metrics}
    missing = required - set(sweep.columns)
    if missing:
        raise ValueError(f"alpha sweep table lacks columns {sorted(missing)}")
    if sweep.empty:
        raise ValueError("alpha sweep table is empty")
    if units is None:
        units = get_model("ivim").units
    if parameters is None:
        present = list(dict.fromkeys(sweep["parameter"]))
        parameters = [n for n in units if n in present] + [n for n in present if n not in units]
    label = {"mean_abs_bias": "mean |bias|", "mean_bias": "mean bias", "mean_sd": "mean SD", "rmse": "RMSE",
             "sensitivity": "sensitivity"}
    method_at = {}
    if "method" in sweep:
        for alpha, group in sweep.groupby("alpha"):
            names = list(dict.fromkeys(group["method"].map(lambda m: str(m).split("@s")[0])))
            if len(names) == 1:
                method_at[alpha] = names[0]
    palette = _colors(colors, list(dict.fromkeys(method_at.values())))
    fig = Figure(figsize=(4.2 * len(parameters), 3.0 * len(metrics)), layout="constrained")
    axes = fig.subplots(len(metrics), len(parameters), squeeze=False)
    for j, name in enumerate(parameters):
        sub = sweep[sweep["parameter"] == name]
        if sub.empty:
            raise ValueError(f"no rows for parameter {name!r} in the alpha sweep")
        factor, _ = _scale(units.get(name, ""))
        for i, key in enumerate(metrics):
            ax = axes[i, j]
            g = sub.groupby("alpha")[key].agg(["mean", "std", "count"]).reset_index()
            scale = 1.0 if key == "sensitivity" else factor
            ax.plot(g["alpha"], g["mean"] * scale, color=SWEEP_COLOR, lw=1.5, zorder=1)
            if (g["count"] > 1).any():
                ax.fill_between(g["alpha"], (g["mean"] - g["std"].fillna(0)) * scale,
                                (g["mean"] + g["std"].fillna(0)) * scale, color=SWEEP_COLOR, alpha=0.2)
            for alpha, mean in zip(g["alpha"], g["mean"]):
                method = method_at.get(alpha)
                ax.plot([alpha], [mean * scale], marker="o", ms=6, ls="none", zorder=2,
                        color=palette[method] if method is not None else SWEEP_COLOR,
                        label=method if method is not None else None)
            _from_zero(ax, key)
            ax.set_xlim(-0.03, 1.03)
            ax.set_xlabel(r"$\alpha$ (0 = GT labels, 1 = MLE labels)")
            ylabel = label.get(key, key)
            ax.set_ylabel(f"{ylabel} of {_PARAM_LABEL.get(name, name)}" if key == "sensitivity"
                          else _label(name, units.get(name, ""), f"{ylabel} of "))
            ax.grid(alpha=0.3)
    if method_at:
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4), frameon=False)
    fig.suptitle("hybrid loss: bias and SD against alpha")
    return _finish(fig, path, fmt)


def plot_reliability(result: CalibrationResult, methods=None, parameters=None, colors: dict | None = None,
                     path=None, fmt: str | None = None) -> Figure:
    """Reliability diagram: pooled observed coverage against nominal level, one panel per
    parameter, one line per method, the diagonal for perfect calibration.

    Parameters
    ----------
    result : CalibrationResult
    methods, parameters : sequence of str, optional
        Default: all of the result's.
    colors : dict, optional
        Method -> colour (default :func:`method_colors` of the result's methods); a report
        passes the map of all its methods, so a method keeps its colour in every figure.
    path : str or Path, optional
    fmt : {"png", "pdf", "svg"}, optional

    Returns
    -------
    Figure
    """
    methods = list(result.methods if methods is None else methods)
    parameters = list(result.param_names if parameters is None else parameters)
    unknown = (set(methods) - set(result.methods)) | (set(parameters) - set(result.param_names))
    if unknown:
        raise ValueError(f"unknown methods or parameters {sorted(unknown)}")
    colors = _colors(colors, result.methods)
    nominal = np.asarray(result.reliability_levels)
    fig = Figure(figsize=(3.2 * len(parameters), 3.4), layout="constrained")
    axes = fig.subplots(1, len(parameters), squeeze=False)
    for ax, name in zip(axes[0], parameters):
        i = result.param_names.index(name)
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="calibrated")
        for method in methods:
            observed = result.overall_coverage(method, reliability=True)[i]
            ax.plot(nominal, observed, marker="o", ms=3, lw=1.4, label=method, color=colors[method])
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="nominal coverage", title=name)
        ax.set_aspect("equal")
    axes[0][0].set_ylabel("observed coverage")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    return _finish(fig, path, fmt)
