"""Power of a paired t-test and the number of pairs it needs.

A pilot gives an effect as Cohen's ``d_z`` (mean of the paired differences over their SD,
:func:`qmri_labels.analysis.stats.paired_effect_size`); :func:`paired_t_sample_size` then gives
the number of pairs (test subjects, phantoms) at which a two-sided paired t-test at level
``alpha`` detects that effect with the asked power. The power is exact under normal
differences: the t statistic follows a noncentral t distribution with ``n - 1`` degrees of
freedom and noncentrality ``d_z sqrt(n)`` (as G*Power computes it; e.g. ``d_z = 0.5``,
``alpha = 0.05``, power 0.8 needs 34 pairs).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

__all__ = ["paired_t_power", "paired_t_sample_size", "simulated_paired_t_power"]


def _check(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return alpha


def paired_t_power(dz: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test with ``n`` pairs for the effect ``dz``.

    Parameters
    ----------
    dz : float
        Cohen's d_z of the differences (its sign does not matter for a two-sided test).
    n : int
        Pairs (>= 2).
    alpha : float
        Level of the test.

    Returns
    -------
    float
        ``P(|T| > t_{1 - alpha/2, n-1})`` with ``T`` noncentral t (``n - 1`` degrees of
        freedom, noncentrality ``dz sqrt(n)``).
    """
    alpha = _check(alpha)
    n = int(n)
    if n < 2:
        raise ValueError(f"a paired t-test needs n >= 2 pairs, got {n}")
    if not math.isfinite(dz):
        return 1.0
    df = n - 1
    crit = sps.t.ppf(1.0 - alpha / 2.0, df)
    nc = abs(float(dz)) * math.sqrt(n)
    # the lower rejection region as the upper one of -T: scipy's noncentral t cdf is NaN or
    # wrong far in its left tail (d_z 5.5 with 3 pairs), its survival function is not
    power = float(sps.nct.sf(crit, df, nc) + sps.nct.sf(crit, df, -nc))
    if not math.isfinite(power):
        power = float(sps.norm.sf(crit - nc) + sps.norm.sf(crit + nc))
    return min(1.0, power)


def paired_t_sample_size(dz: float, power: float = 0.8, alpha: float = 0.05, n_max: int = 100_000) -> int | None:
    """Smallest number of pairs at which the two-sided paired t-test has ``power`` for ``dz``.

    Parameters
    ----------
    dz : float
        Cohen's d_z of the effect (from a pilot).
    power : float
        Target power in (0, 1).
    alpha : float
    n_max : int
        Give up above this many pairs.

    Returns
    -------
    int or None
        The number of pairs (>= 2), or None when even ``n_max`` pairs are not enough (e.g. a
        zero effect).
    """
    alpha = _check(alpha)
    if not 0.0 < float(power) < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power}")
    if not np.isfinite(dz):
        return None if np.isnan(dz) else 2
    if dz == 0:
        return None
    # the normal approximation ((z_{1-alpha/2} + z_power) / dz)^2 is a lower bound of the t-test's
    # n; count up from just below it (the noncentral t is unreliable far beyond the answer)
    z = sps.norm.ppf(1.0 - alpha / 2.0) + sps.norm.ppf(float(power))
    n = max(2, int(math.floor((z / abs(float(dz))) ** 2)) - 2)
    while n <= int(n_max):
        if paired_t_power(dz, n, alpha) >= power:
            return n
        n += 1
    return None


def simulated_paired_t_power(dz: float, n: int, alpha: float = 0.05, n_sim: int = 20_000, seed: int = 0) -> float:
    """Power of the paired t-test by simulation: the share of ``n_sim`` draws of ``n`` normal
    differences (mean ``dz``, SD 1) that the two-sided test rejects at ``alpha`` (a check of
    :func:`paired_t_power` that does not use the noncentral t)."""
    alpha = _check(alpha)
    rng = np.random.default_rng(seed)
    d = rng.normal(float(dz), 1.0, size=(int(n_sim), int(n)))
    t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(int(n)))
    p = 2.0 * sps.t.sf(np.abs(t), int(n) - 1)
    return float(np.mean(p < alpha))
