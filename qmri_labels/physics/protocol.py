"""A diffusion protocol as the data define it: shells, gradient directions, repeats, the
per-shell average, and whether a model's parameters can be identified from it.

* **Shells.** b-values within :data:`SHELL_TOLERANCE` (5 %) of a shell's smallest member form
  one shell, so scanner jitter (995/1000/1005 s/mm^2) is one shell; b-values at or below
  ``b0_threshold`` form the b = 0 shell.
* **Repeats.** Two volumes repeat each other only when they lie in one shell *and* their
  gradient directions agree within :data:`REPEAT_ANGLE_DEG` (sign-insensitive: g and -g are
  one direction). b = 0 volumes always repeat each other. A b > 0 volume without a known
  direction (no b-vectors, or a zero/NaN one) repeats nothing: in anisotropic tissue volumes
  of one shell differ by direction, not only by noise.
* **Per-shell average** (:class:`ShellAverage`): the geometric mean of a shell's N volumes
  (the trace-weighted image of clinical IVIM: over three orthogonal directions it is
  ``S0 exp(-b MD)`` for the tensor part). Its noise is not Rician with the volumes' sigma:
  ``log M`` of a Rician magnitude M is unbiased to second order in ``sigma / A``, so the
  geometric mean of N equal signals has spread ``sigma / sqrt(N)`` and bias
  ``sigma^2 / (2 N A)``, both those of a Rician magnitude with ``sigma_eff = sigma / sqrt(N)``;
  the fit assumes that (checked by simulation in the tests; it holds where a shell's signal is
  above about 3 sigma; the average is NaN where a member is zero, negative or not finite).
  Along anisotropic directions with signals ``A_i`` the spread is
  ``(sigma / N) sqrt(sum (G / A_i)^2)``, ``G`` their geometric mean: ``sigma / sqrt(N)`` is then
  a lower bound (5 % low for log-signals spread by -0.3..0.2), which narrows the reported SDs
  by as much; the point estimates barely move.
* **Identifiability** (:func:`protocol_problems`): fewer shells than parameters, no
  perfusion-sensitive b-values for IVIM, b-values that look like ms/um^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "PERFUSION_B_MAX",
    "REPEAT_ANGLE_DEG",
    "SHELL_TOLERANCE",
    "ShellAverage",
    "protocol_problems",
    "repeat_groups",
    "shell_labels",
    "unit_directions",
]

#: b-values within this fraction of a shell's smallest member belong to that shell
SHELL_TOLERANCE = 0.05
#: gradient directions closer than this (degrees, sign-insensitive) are one direction
REPEAT_ANGLE_DEG = 5.0
#: IVIM's perfusion part needs b-values above b = 0 and at most this (s/mm^2)
PERFUSION_B_MAX = 200.0
#: a diffusion protocol whose largest b-value is below this is in ms/um^2, not s/mm^2
UNIT_B_MAX = 10.0


def shell_labels(bvalues, b0_threshold: float = 0.0, tolerance: float = SHELL_TOLERANCE):
    """Shell of every volume and the shells' mean b-values.

    Parameters
    ----------
    bvalues : array_like (M,)
    b0_threshold : float
        b-values at or below it form the b = 0 shell.
    tolerance : float
        Relative width of a shell (scanner jitter).

    Returns
    -------
    labels : ndarray of int (M,)
        0 .. K-1 in increasing b.
    shell_b : ndarray (K,)
        Mean b-value of each shell.
    """
    bvalues = np.asarray(bvalues, dtype=np.float64).ravel()
    labels = np.zeros(bvalues.size, dtype=np.int64)
    order = np.argsort(bvalues, kind="stable")
    shell, first = -1, None
    for i in order:
        b = bvalues[i]
        if b <= b0_threshold:
            in_shell = first is not None and first <= b0_threshold
        else:
            in_shell = first is not None and first > b0_threshold and b - first <= tolerance * b
        if not in_shell:
            shell, first = shell + 1, b
        labels[i] = shell
    shell_b = np.array([bvalues[labels == k].mean() for k in range(shell + 1)])
    return labels, shell_b


def unit_directions(bvecs, n_volumes: int) -> np.ndarray:
    """``(M, 3)`` unit gradient directions from ``(3, M)`` or ``(M, 3)`` b-vectors; NaN rows
    where a vector is missing, NaN or zero (a b = 0 volume's)."""
    vectors = np.asarray(bvecs, dtype=np.float64)
    if vectors.shape == (3, n_volumes):
        vectors = vectors.T
    if vectors.shape != (n_volumes, 3):
        raise ValueError(f"b-vectors must have shape (3, {n_volumes}) or ({n_volumes}, 3), got {vectors.shape}")
    norms = np.linalg.norm(vectors, axis=1)
    known = np.isfinite(norms) & (norms > 1e-6)
    out = np.full((n_volumes, 3), np.nan)
    out[known] = vectors[known] / norms[known, None]
    return out


def repeat_groups(bvalues, bvecs=None, *, b0_threshold: float = 0.0, angle_deg: float = REPEAT_ANGLE_DEG,
                  tolerance: float = SHELL_TOLERANCE) -> np.ndarray:
    """Labels (M,) that say which volumes repeat each other (equal label = repeats).

    Volumes repeat each other when they are in one shell and their directions agree within
    ``angle_deg`` (g and -g are one direction); every b = 0 volume repeats every other. A
    b > 0 volume whose direction is unknown (``bvecs`` None, or its vector NaN or zero) gets a
    label of its own.
    """
    bvalues = np.asarray(bvalues, dtype=np.float64).ravel()
    shells, _ = shell_labels(bvalues, b0_threshold, tolerance)
    directions = None if bvecs is None else unit_directions(bvecs, bvalues.size)
    cos_limit = math.cos(math.radians(angle_deg))
    labels = np.full(bvalues.size, -1, dtype=np.int64)
    next_label = 0
    is_b0 = bvalues <= b0_threshold
    if is_b0.any():
        labels[is_b0] = next_label
        next_label += 1
    for shell in np.unique(shells[~is_b0]):
        members = [i for i in np.flatnonzero(shells == shell) if not is_b0[i]]
        representatives: list[tuple[np.ndarray, int]] = []
        for i in members:
            g = None if directions is None else directions[i]
            if g is None or not np.all(np.isfinite(g)):
                labels[i] = next_label
                next_label += 1
                continue
            for rep, label in representatives:
                if abs(float(rep @ g)) >= cos_limit:
                    labels[i] = label
                    break
            else:
                representatives.append((g, next_label))
                labels[i] = next_label
                next_label += 1
    return labels


@dataclass
class ShellAverage:
    """The per-shell geometric mean of a series and the noise model of what is fitted.

    Attributes
    ----------
    bvalues : ndarray (K,)
        Mean b-value of each shell (what the average is fitted at).
    labels : ndarray of int (M,)
        Shell of every volume.
    n_volumes : ndarray of int (K,)
        Volumes averaged per shell.
    """

    bvalues: np.ndarray
    labels: np.ndarray
    n_volumes: np.ndarray

    @classmethod
    def of(cls, bvalues, b0_threshold: float = 0.0) -> "ShellAverage":
        labels, shell_b = shell_labels(bvalues, b0_threshold)
        return cls(shell_b, labels, np.bincount(labels, minlength=shell_b.size))

    @property
    def sigma_scale(self) -> np.ndarray:
        """Noise SD of each averaged measurement relative to one volume's: ``1 / sqrt(N)``."""
        return 1.0 / np.sqrt(self.n_volumes.astype(np.float64))

    def apply(self, signals) -> np.ndarray:
        """``(..., K)`` geometric means of ``signals (..., M)``: NaN where a member is zero,
        negative or not finite (that sample is then left out of the voxel's fit)."""
        signals = np.asarray(signals, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.where(np.isfinite(signals) & (signals > 0), np.log(np.where(signals > 0, signals, 1.0)), np.nan)
        out = np.empty(signals.shape[:-1] + (self.bvalues.size,))
        for k in range(self.bvalues.size):
            out[..., k] = np.exp(logs[..., self.labels == k].mean(axis=-1))
        return out.astype(np.float32)

    def description(self) -> dict:
        return {"fitted_bvalues": [round(float(b), 3) for b in self.bvalues],
                "volumes_per_shell": [int(n) for n in self.n_volumes],
                "average": "geometric mean of each shell's volumes (trace-weighted image)",
                "noise_model_of_fitted": "each averaged measurement treated as Rician with sigma_eff = sigma / "
                                         "sqrt(N), N its shell's volumes (the geometric mean's spread and "
                                         "second-order bias for equal signals, where the shell's signal exceeds "
                                         "~3 sigma; a lower bound along anisotropic directions)"}


def protocol_problems(model, bvalues, b0_threshold: float = 0.0) -> list[str]:
    """Why ``bvalues`` cannot identify ``model``'s parameters (an empty list when they can).

    Parameters
    ----------
    model : SignalModel
    bvalues : array_like (M,)
        The fitted protocol in s/mm^2.
    b0_threshold : float
        b-values at or below it count as b = 0.

    Returns
    -------
    list of str
        One sentence per problem, each naming what would work.
    """
    if getattr(model, "protocol_unit", None) != "s/mm^2":
        return []
    bvalues = np.asarray(bvalues, dtype=np.float64).ravel()
    problems = []
    largest = float(bvalues.max()) if bvalues.size else 0.0
    if 0 < largest < UNIT_B_MAX:
        problems.append(f"the largest b-value is {largest:g}: these look like ms/um^2 (or s/um^2), not s/mm^2; "
                        f"multiply them by 1000 (b = 1 ms/um^2 is 1000 s/mm^2)")
    _, shell_b = shell_labels(bvalues, b0_threshold)
    if shell_b.size < model.n_params:
        alternative = ("; fit --model monoexp (S0, D: two shells are enough)"
                       if model.name == "ivim" and shell_b.size >= 2 else "")
        problems.append(f"{shell_b.size} b-value shell(s) ({', '.join(f'{b:g}' for b in shell_b)} s/mm^2; b-values "
                        f"within {SHELL_TOLERANCE:.0%} of each other are one shell) cannot identify the "
                        f"{model.name} model's {model.n_params} parameters {tuple(model.param_names)}: it needs at "
                        f"least {model.n_params} shells{alternative}")
    if model.name == "ivim" and not problems:
        low = (shell_b > max(b0_threshold, 0.0)) & (shell_b <= PERFUSION_B_MAX)
        if not low.any():
            problems.append(f"no b-value between 0 and {PERFUSION_B_MAX:g} s/mm^2 besides b = 0: IVIM's perfusion "
                            "part (f, Dstar) cannot be told from D; acquire low b-values (e.g. 10, 20, 50, 100) "
                            "or fit --model monoexp")
    return problems
