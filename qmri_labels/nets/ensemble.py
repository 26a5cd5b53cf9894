"""Deep ensembles: M independently seeded networks, combined into a mean and an SD.

The combined predictive distribution of M members with means ``mu_m`` and variances ``v_m``
(``v_m = 0`` for a plain network) has (Lakshminarayanan et al., NeurIPS 2017)

``mean = (1/M) sum mu_m``,  ``var = (1/M) sum v_m + (1/M) sum (mu_m - mean)^2``,

the mean of the member variances (the noise each member expects, *aleatoric*) plus the
variance of the member means (their disagreement, *epistemic*; ``ddof = 0``: the variance of
the mixture, not an estimate of a population variance).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn


def check_n_members(n_members) -> int:
    """``n_members`` of an estimator as an int; ValueError unless it is an integer >= 1."""
    if not isinstance(n_members, (int, np.integer)) or isinstance(n_members, (bool, np.bool_)) or n_members < 1:
        raise ValueError(f"n_members must be an integer >= 1, got {n_members!r}")
    return int(n_members)


def members_of(network: nn.Module) -> list[nn.Module]:
    """The members of a :class:`DeepEnsemble`, or ``[network]`` for a single network."""
    return list(network.members) if isinstance(network, DeepEnsemble) else [network]


def combine_members(means, variances=None, axis: int = 0):
    """Mean and SD of an ensemble (NumPy or torch, the type of ``means``).

    Parameters
    ----------
    means : array or tensor (..., M, ...)
        Member predictions, members along ``axis``.
    variances : same shape or None
        Member variances (heteroscedastic members); ``None``: plain members (variance 0).
    axis : int

    Returns
    -------
    mean, sd
        Without the member axis.
    """
    lib = torch if isinstance(means, torch.Tensor) else np
    if means.shape[axis] < 1:
        raise ValueError("an ensemble needs at least one member")
    if variances is not None and tuple(variances.shape) != tuple(means.shape):
        raise ValueError(f"variances must have the shape of means {tuple(means.shape)}, got {tuple(variances.shape)}")
    mean = means.mean(axis)
    centre = mean.unsqueeze(axis) if lib is torch else np.expand_dims(mean, axis)
    spread = ((means - centre) ** 2).mean(axis)
    total = spread if variances is None else variances.mean(axis) + spread
    return mean, lib.sqrt(total)


class DeepEnsemble(nn.Module):
    """Members evaluated together; ``forward(signals) -> (mean, sd)``.

    Each member returns parameters ``(..., P)`` (a plain network) or ``(mean, log_var)`` (a
    :class:`~qmri_labels.nets.heteroscedastic.HeteroscedasticNet`, whose ``sd`` turns the
    log-variance into parameter units).

    Parameters
    ----------
    members : sequence of nn.Module
    """

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) < 1:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    @classmethod
    def from_factory(cls, factory: Callable[[], nn.Module], seeds: Sequence[int]) -> "DeepEnsemble":
        """Build one member per seed, each initialised under ``torch.manual_seed(seed)`` in a
        private RNG stream (the caller's global RNG state is untouched)."""
        members = []
        for seed in seeds:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                members.append(factory())
        return cls(members)

    def member_outputs(self, signals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Member means ``(M, ..., P)`` and variances (or None when no member has any)."""
        means, variances = [], []
        for member in self.members:
            out = member(signals)
            if isinstance(out, tuple):
                mean, log_var = out
                variances.append(member.sd(log_var) ** 2)
            else:
                mean = out
                variances.append(torch.zeros_like(mean))
            means.append(mean)
        has_var = any(isinstance(m, nn.Module) and hasattr(m, "sd") for m in self.members)
        return torch.stack(means), (torch.stack(variances) if has_var else None)

    def forward(self, signals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means, variances = self.member_outputs(signals)
        return combine_members(means, variances, axis=0)
