"""The solver behind :func:`qmri_labels.fitting.fit_mle`: projected Levenberg-Marquardt on the
negative log-likelihood of many independent voxels at once, with a race of starting points.

Fisher scoring: the curvature is ``J^T J / sigma^2``, the gradient is that of the exact Rician
or Gaussian likelihood. Bounds are kept by projection with an active set: a parameter that sits
on a bound and whose gradient pushes outward is frozen for that step.

Robust starts (:func:`fit_chunk`): every voxel starts from the model's segmented (linearised)
estimate and a few variants of it (``SignalModel.starting_points``); all starts race for
``probe_iter`` iterations (a start far behind stops early, and so does a start that has run
into another one of its voxel), the best per voxel is iterated to convergence, and voxels whose
estimate sits on a bound (where wrong basins end) go on with all their starts, each to
convergence, from where the race left them. A model whose likelihood has separate optima
(``SignalModel.converge_every_start``) skips the race: every start runs to convergence and the
lowest NLL is kept.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from qmri_labels.fitting.likelihood import nll_and_grad_terms

#: a start whose NLL is this far above its voxel's best during the race of the starts stops there
_PRUNE_MARGIN = 10.0
#: starts of the refit of voxels whose estimate sits on a bound
_RESCUE_STARTS = 5
#: two starts of a voxel closer than this (a fraction of the box, every parameter) are twins
_TWIN_DISTANCE = 1e-3


def fit_chunk(model, y, b, sigma, noise, lower, upper, scale_relative, n_starts, probe_iter, max_iter, tol):
    """Fit one chunk of valid voxels: starts, their race, the winner to convergence, the rescue
    of voxels on a bound.

    Parameters
    ----------
    model : SignalModel
    y : Tensor (N, M)
        Signals of valid voxels, in the working dtype and device.
    b : Tensor (M,)
        The protocol.
    sigma : Tensor (N, 1)
        Noise level per voxel.
    noise : {"rician", "gaussian"}
    lower, upper : ndarray (P,)
        Bounds; the scale parameter's relative to each voxel's signal when ``scale_relative``.
    scale_relative : bool
    n_starts, probe_iter, max_iter : int
    tol : float
        See :func:`qmri_labels.fitting.fit_mle`.

    Returns
    -------
    theta : Tensor (N, P)
        Estimates in the model's units.
    converged, stalled : Tensor of bool (N,)
    iterations : Tensor of int (N,)
    """
    n, p = y.shape[0], model.n_params
    dtype, device = y.dtype, y.device
    # work on signals scaled to about 1 at the lowest b-value: the same tolerances then suit any
    # signal level; the scale parameter (S0) is scaled back at the end
    low_b = b == b.min()
    scale = y[:, low_b].mean(-1)
    scale = torch.where(scale > 0, scale, y.abs().amax(-1)).clamp_min(torch.finfo(dtype).tiny)
    y_s = y / scale[:, None]
    sigma_s = sigma / scale[:, None]
    lo = torch.as_tensor(lower, dtype=dtype, device=device).expand(n, p).clone()
    hi = torch.as_tensor(upper, dtype=dtype, device=device).expand(n, p).clone()
    k = model.scale_index
    if k is not None:
        if scale_relative:
            lo[:, k] = 0.0
            hi[:, k] = model.scale_headroom(b)
        else:
            lo[:, k] = lo[:, k] / scale
            hi[:, k] = hi[:, k] / scale

    init = model.initial_estimate(y_s, b)
    # the race's starts, then those that only the rescue of voxels on a bound adds (none at the
    # default n_starts); (n, S, p)
    every_start = model.starting_points(init, lo, hi, max(n_starts, _RESCUE_STARTS) if n_starts > 1 else n_starts)
    every_start = torch.minimum(torch.maximum(every_start, lo[:, None]), hi[:, None])
    starts = every_start[:, :n_starts]
    s_count = starts.shape[1]

    solver = LevenbergMarquardt(model, b, nll_and_grad_terms(noise), tol)
    rows = torch.arange(n, device=device).repeat_interleave(s_count)
    batch = solver.start(starts.reshape(n * s_count, p), y_s[rows], sigma_s[rows], lo[rows], hi[rows])
    # race the starts: every start runs `probe_iter` iterations (a start far behind its voxel's best
    # stops early), then the best per voxel is iterated to convergence. Choosing after one or two
    # iterations (successive halving, FITTER_VERSION 2) picked the wrong basin in ~2.5e-3 of Rician
    # IVIM voxels at SNR 30: a start in the better basin often leads only after several iterations.
    offsets = torch.arange(n, device=device) * s_count
    span = hi - lo
    race = batch
    if s_count > 1 and model.converge_every_start:
        # separate optima (fat-water's water- and fat-dominant solutions): a start may trail
        # during the first iterations and still end in the better optimum, so every start runs
        # to convergence and the lowest NLL is kept
        solver.iterate(race, max_iter)
        batch = race.select(race.obj.reshape(n, s_count).argmin(-1) + offsets)
    elif s_count > 1:
        for _ in range(probe_iter):
            solver.iterate(race, 1)
            obj = race.obj.reshape(n, s_count)
            race.frozen |= (obj > obj.min(-1, keepdim=True).values + _PRUNE_MARGIN).reshape(-1)
            race.frozen |= _twins(race.theta.reshape(n, s_count, p) / span[:, None]).reshape(-1)
        batch = race.select(race.obj.reshape(n, s_count).argmin(-1) + offsets)
        batch.frozen[:] = False  # the best start may be a twin that the race froze
    solver.iterate(batch, max_iter)
    # degenerate estimates (a parameter on a bound: f = 0 or 1, D* collapsed onto its lower bound,
    # ...) are where the remaining wrong basins end; those voxels go on with all of the model's
    # starts (at least _RESCUE_STARTS), each to convergence, and keep the best
    on_bound = ((batch.theta - lo <= 1e-6 * span) | (hi - batch.theta <= 1e-6 * span))
    if k is not None:
        on_bound[:, k] = False
    redo = torch.nonzero(on_bound.any(-1)).squeeze(-1)
    if redo.numel() and n_starts > 1:
        rescue = _rescue_batch(solver, race, batch, redo, every_start[redo, s_count:], y_s, sigma_s, lo, hi)
        e_count = rescue.theta.shape[0] // redo.numel()
        solver.iterate(rescue, max_iter)
        best = rescue.obj.reshape(-1, e_count).argmin(-1) + torch.arange(redo.numel(), device=device) * e_count
        rescue = rescue.select(best)
        better = rescue.obj < batch.obj[redo]
        for f in ("theta", "obj", "converged", "stalled", "iters"):
            getattr(batch, f)[redo[better]] = getattr(rescue, f)[better]
    theta = batch.theta
    if k is not None:
        theta[:, k] = theta[:, k] * scale
    return theta, batch.converged, batch.stalled, batch.iters


def _twins(position: torch.Tensor) -> torch.Tensor:
    """``(N, S)``: start ``s`` has run into an earlier start of its voxel (closer than
    ``_TWIN_DISTANCE`` on every parameter; ``position`` in units of the box), so it would only
    follow it: one of the two is enough."""
    twin = torch.zeros(position.shape[:2], dtype=torch.bool, device=position.device)
    for s in range(1, position.shape[1]):
        twin[:, s] = ((position[:, :s] - position[:, s : s + 1]).abs().amax(-1) < _TWIN_DISTANCE).any(-1)
    return twin


def _rescue_batch(solver, race, batch, redo, new_starts, y_s, sigma_s, lo, hi):
    """Every start of the voxels ``redo``, ready to iterate to convergence; rows voxel-major.

    The race's starts come first, each continuing from where the race left it, pruned or not
    (its first iterations are the ones a fresh start would run: same start, same damping, row
    by row), and the start the race chose from its converged state; then ``new_starts``
    ``(len(redo), E, P)``, the starts the race did not have, from scratch.
    """
    r = redo.numel()
    s_count = race.theta.shape[0] // batch.theta.shape[0]
    device = batch.theta.device
    rows = (redo[:, None] * s_count + torch.arange(s_count, device=device)).reshape(-1)
    rescue = race.select(rows)
    rescue.frozen[:] = False
    chosen = rescue.obj.reshape(r, s_count).argmin(-1) + torch.arange(r, device=device) * s_count
    for f in dataclasses.fields(_Batch):
        getattr(rescue, f.name)[chosen] = getattr(batch, f.name)[redo]
    e_count = new_starts.shape[1]
    if e_count == 0:
        return rescue
    e_rows = redo.repeat_interleave(e_count)
    fresh = solver.start(new_starts.reshape(r * e_count, -1), y_s[e_rows], sigma_s[e_rows], lo[e_rows], hi[e_rows])
    order = torch.cat([torch.arange(r * s_count, device=device).reshape(r, s_count),
                       r * s_count + torch.arange(r * e_count, device=device).reshape(r, e_count)], dim=1)
    return _Batch.cat(rescue, fresh).select(order.reshape(-1))


@dataclass
class _Batch:
    """Per-row state of the Levenberg-Marquardt iterations (one row: one voxel and start)."""

    theta: torch.Tensor
    y: torch.Tensor
    sigma: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    obj: torch.Tensor
    grad: torch.Tensor
    hess: torch.Tensor
    lam: torch.Tensor
    converged: torch.Tensor
    stalled: torch.Tensor
    iters: torch.Tensor
    #: rows left out of further iterations without having converged (starts pruned in the race)
    frozen: torch.Tensor

    def select(self, index: torch.Tensor) -> "_Batch":
        return _Batch(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    @staticmethod
    def cat(*batches: "_Batch") -> "_Batch":
        return _Batch(*(torch.cat([getattr(b, f.name) for b in batches]) for f in dataclasses.fields(_Batch)))


def _cholesky_solve_small(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``a x = rhs`` for a batch of small symmetric positive definite matrices.

    Unrolled over the few parameters and vectorised over the batch: several times faster than
    batched LAPACK calls for 2x2 to 6x6 systems.
    """
    p = a.shape[-1]
    low = [[None] * p for _ in range(p)]
    for i in range(p):
        for j in range(i + 1):
            acc = a[:, i, j]
            for k in range(j):
                acc = acc - low[i][k] * low[j][k]
            low[i][j] = torch.sqrt(acc) if i == j else acc / low[j][j]
    z = []
    for i in range(p):
        acc = rhs[:, i]
        for k in range(i):
            acc = acc - low[i][k] * z[k]
        z.append(acc / low[i][i])
    x = [None] * p
    for i in reversed(range(p)):
        acc = z[i]
        for k in range(i + 1, p):
            acc = acc - low[k][i] * x[k]
        x[i] = acc / low[i][i]
    return torch.stack(x, dim=-1)


class LevenbergMarquardt:
    """Projected Levenberg-Marquardt on the NLL of many independent voxels.

    Each iteration evaluates signals, derivatives, NLL and its gradient once, at the trial
    point; an accepted trial becomes the new state without further evaluations.
    """

    def __init__(self, model, b, nll_and_grad, tol):
        self.model, self.b, self.nll_and_grad, self.tol = model, b, nll_and_grad, tol

    def evaluate(self, theta, y, sigma):
        """Objective, gradient and Gauss-Newton curvature ``J^T J / sigma^2`` at ``theta``.

        Parameters
        ----------
        theta : Tensor (N, P)
        y : Tensor (N, M)
            Signals.
        sigma : Tensor (N, 1) or (N, M)
            Noise level of each row (or of each measurement).

        Returns
        -------
        obj : Tensor (N,)
        grad : Tensor (N, P)
        hess : Tensor (N, P, P)
        """
        pred, grads = self.model.forward_and_gradients(theta, self.b)  # grads: (a, P, M)
        terms, d_obj = self.nll_and_grad(y, pred, sigma)
        grad = torch.bmm(grads, d_obj.unsqueeze(-1)).squeeze(-1)
        if sigma.shape[-1] == 1:
            hess = torch.bmm(grads, grads.transpose(1, 2)) / (sigma * sigma)[..., None]
        else:  # one noise level per measurement (a per-shell average of different sizes)
            weighted = grads / sigma[:, None, :]
            hess = torch.bmm(weighted, weighted.transpose(1, 2))
        return terms.sum(-1), grad, hess

    def start(self, theta, y, sigma, lo, hi) -> _Batch:
        """The state of rows starting at ``theta`` (damping 1e-3, nothing converged).

        Parameters
        ----------
        theta : Tensor (N, P)
            Starting points inside ``[lo, hi]``.
        y : Tensor (N, M)
            Signals.
        sigma : Tensor (N, 1) or (N, M)
            Noise level of each row (or of each measurement).
        lo, hi : Tensor (N, P)
            Bounds of each row.

        Returns
        -------
        _Batch
        """
        obj, grad, hess = self.evaluate(theta, y, sigma)
        n = theta.shape[0]
        return _Batch(theta.clone(), y, sigma, lo, hi, obj, grad, hess,
                      lam=torch.full((n,), 1e-3, dtype=theta.dtype, device=theta.device),
                      converged=torch.zeros(n, dtype=torch.bool, device=theta.device),
                      stalled=torch.zeros(n, dtype=torch.bool, device=theta.device),
                      iters=torch.zeros(n, dtype=torch.int64, device=theta.device),
                      frozen=torch.zeros(n, dtype=torch.bool, device=theta.device))

    def iterate(self, batch: _Batch, max_iter: int) -> None:
        """Run up to ``max_iter`` iterations on the rows not yet converged (in place)."""
        p = batch.theta.shape[1]
        dtype, device = batch.theta.dtype, batch.theta.device
        eye = torch.eye(p, dtype=dtype, device=device)
        tiny = torch.finfo(dtype).tiny
        active = torch.nonzero(~(batch.converged | batch.stalled | batch.frozen)).squeeze(-1)
        for _ in range(max_iter):
            if active.numel() == 0:
                break
            th, yy, sg, lw, up, lm, ob, gr, hs = (
                t[active] for t in (batch.theta, batch.y, batch.sigma, batch.lo, batch.hi, batch.lam, batch.obj,
                                    batch.grad, batch.hess)
            )
            sp = up - lw
            # active set: parameters on a bound whose gradient points outward stay put
            fixed = ((th - lw <= 1e-7 * sp) & (gr > 0)) | ((up - th <= 1e-7 * sp) & (gr < 0))
            free = (~fixed).to(dtype)
            g = gr * free
            h = hs * (free[:, :, None] * free[:, None, :])
            # Jacobi scaling makes the damping scale-free (D ~ 1e-3 next to f ~ 0.3)
            d = torch.sqrt(torch.diagonal(h, dim1=-2, dim2=-1).clamp_min(0))
            d = torch.where(d > 0, d, torch.ones_like(d))
            a_mat = h / (d[:, :, None] * d[:, None, :]) + (lm[:, None, None] + 1e-10) * eye + eye * fixed.to(dtype)[:, None, :]
            step = _cholesky_solve_small(a_mat, -g / d) / d * free
            trial = torch.minimum(torch.maximum(th + step, lw), up)
            real_step = trial - th
            curvature = (real_step * torch.bmm(h, real_step.unsqueeze(-1)).squeeze(-1)).sum(-1)
            predicted = -(g * real_step).sum(-1) - 0.5 * curvature
            t_obj, t_grad, t_hess = self.evaluate(trial, yy, sg)
            actual = ob - t_obj
            accept = torch.isfinite(t_obj) & (actual > 0)
            rho = actual / predicted.clamp_min(tiny)
            factor = torch.where(accept, torch.clamp(1 - (2 * rho - 1) ** 3, min=1 / 3, max=1.0),
                                 torch.full_like(lm, 4.0))
            lm = (lm * factor).clamp(1e-9, 1e12)
            keep = accept[:, None]
            batch.theta[active] = torch.where(keep, trial, th)
            batch.obj[active] = torch.where(accept, t_obj, ob)
            batch.grad[active] = torch.where(keep, t_grad, gr)
            batch.hess[active] = torch.where(keep[..., None], t_hess, hs)
            batch.lam[active] = lm
            batch.iters[active] += 1
            # converged: less than `tol` further decrease predicted; stalled: no step can help
            # (damping at its ceiling, or a step below float resolution) without meeting `tol`
            met = predicted.abs() < self.tol
            stuck = ~met & ((lm >= 1e12) | (real_step.abs() <= 1e-9 * sp).all(-1))
            batch.converged[active] = met
            batch.stalled[active] = stuck
            active = active[~(met | stuck)]
