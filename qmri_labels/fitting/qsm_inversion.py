"""Conventional dipole inversions: TKD, closed-form Tikhonov, iterative TV and COSMOS.

TKD, Tikhonov and COSMOS are closed-form divisions in k-space (see :mod:`qmri_labels.physics.qsm` for the
kernel conventions), batched over leading dimensions, NumPy in and out (torch tensors are
accepted and returned as tensors on their device).

* :func:`tkd` -- truncated k-space division: ``chi = IFFT(F / D_t)``, where ``1/D`` is
  replaced by ``sign(D) / threshold`` wherever ``|D| < threshold`` (Shmueli et al., 2009).
* :func:`tikhonov` -- ``argmin ||D chi - f||^2 + lam ||G chi||^2`` with ``G`` the forward
  finite-difference gradient (or the identity), solved exactly in k-space:
  ``chi = IFFT(D F / (D^2 + lam |G|^2))``.
* :func:`cosmos` -- the multi-orientation least-squares solution
  ``chi = IFFT(sum_j D_j F_j / sum_j D_j^2)`` (Liu et al., 2009); with three or more well-spread
  orientations the system is well conditioned and, without noise, recovers chi exactly up to
  its mean. It plays the role of the MLE label of the voxel-wise problems.
* :func:`tv` -- total-variation regularised inversion ``argmin 1/2 ||M (D chi - f)||^2 + lam
  ||G chi||_1`` by ADMM (the linear FANSI scheme of Milovic et al., 2018), with the data term
  weighted by the brain mask ``M``: the field outside the mask is unknown, not zero. Public QSM
  benchmarks (QSM challenges 1 and 2) rank a tuned TV above TKD and Tikhonov.

The mean of chi (k = 0) is not observable in a local field; all inversions return a zero k=0
component, i.e. a zero-mean result over the whole grid (not over the mask).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from qmri_labels.physics.qsm import (
    _dipole_kernel_torch,
    _pad_amounts,
    _to_tensor,
    apply_kspace_filter,
    gradient_kernel_sq,
    normalize_direction,
)

__all__ = ["tkd", "tikhonov", "tv", "cosmos", "TIKHONOV_DEFAULT_LAMBDA", "TV_DEFAULT_LAMBDA"]

#: default regularisation weight of :func:`tikhonov` with the gradient regulariser; near the best
#: NRMSE of a sweep (0.005-0.1) on 64^3 default phantoms with field noise 0.002-0.005 ppm
TIKHONOV_DEFAULT_LAMBDA = 0.01

#: default TV weight of :func:`tv` (field and chi in ppm, 1 mm voxels); tune it on training
#: phantoms for a given noise level (``qmri_labels.workflows.qsm.common.tune_lambda``)
TV_DEFAULT_LAMBDA = 3e-4


def _prepare(x, name):
    t, was_tensor = _to_tensor(x, name)
    if t.ndim < 3:
        raise ValueError(f"{name} must have at least 3 dimensions (..., X, Y, Z), got shape {tuple(t.shape)}")
    return t, was_tensor


def _apply_mask(t: torch.Tensor, mask) -> torch.Tensor:
    if mask is None:
        return t
    m, _ = _to_tensor(mask, "mask", device=t.device)
    if m.shape[-3:] != t.shape[-3:]:
        raise ValueError(f"mask shape {tuple(m.shape)} does not match volume shape {tuple(t.shape)}")
    return t * (m != 0).to(t.dtype)


def tkd(
    field,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    threshold: float = 0.19,
    *,
    mask=None,
    pad=None,
):
    """Truncated k-space division.

    Parameters
    ----------
    field : array (..., X, Y, Z)
        Local field in ppm.
    voxel_size : (float, float, float)
        mm.
    b0_dir : (float, float, float)
        B0 direction in the image frame.
    threshold : float
        ``|D|`` below which the inverse is clipped to ``sign(D)/threshold`` (default 0.19);
        must lie in (0, 2/3]. At ``k = 0`` (``D = 0``) the inverse is 0.
    mask : array (X, Y, Z), optional
        Applied to the result only (a field that is zero outside the mask, as after
        background-field removal, is simply passed as it is).
    pad : see :func:`qmri_labels.physics.qsm.forward_field`

    Returns
    -------
    chi : same type as ``field`` (ppm)
    """
    if not (0 < float(threshold) <= 2.0 / 3.0):
        raise ValueError(f"threshold must be in (0, 2/3], got {threshold}")
    t, was_tensor = _prepare(field, "field")

    def kernel_fn(shape):
        d = _dipole_kernel_torch(shape, voxel_size, b0_dir, 0.0, t.device, torch.float64)
        inv = torch.where(d.abs() >= threshold, 1.0 / torch.where(d == 0, torch.ones_like(d), d), torch.sign(d) / threshold)
        return inv.to(t.dtype)

    out = _apply_mask(apply_kspace_filter(t, kernel_fn, pad), mask)
    return out if was_tensor else out.cpu().numpy()


def tikhonov(
    field,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    lam: float = TIKHONOV_DEFAULT_LAMBDA,
    *,
    regularizer: str = "gradient",
    mask=None,
    pad=None,
):
    """Closed-form Tikhonov inversion ``argmin_chi ||D chi - f||^2 + lam ||R chi||^2``.

    ``R`` is the forward finite-difference gradient (``regularizer="gradient"``, ``|R|^2 =
    sum_i 4 sin^2(pi n_i/N_i)/voxel_size_i^2``) or the identity (``"identity"``). The
    solution is ``chi = IFFT(D F / (D^2 + lam |R|^2))`` with the k = 0 component set to 0.

    Parameters
    ----------
    field : array (..., X, Y, Z)
        Local field (ppm).
    lam : float
        Regularisation weight (> 0).
    regularizer : {"gradient", "identity"}
    mask, pad : as in :func:`tkd`.
    """
    if not (np.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be a finite number > 0, got {lam}")
    if regularizer not in ("gradient", "identity"):
        raise ValueError(f"regularizer must be 'gradient' or 'identity', got {regularizer!r}")
    t, was_tensor = _prepare(field, "field")

    def kernel_fn(shape):
        d = _dipole_kernel_torch(shape, voxel_size, b0_dir, 0.0, t.device, torch.float64)
        if regularizer == "gradient":
            r2 = gradient_kernel_sq(shape, voxel_size, as_tensor=True, device=t.device, dtype=torch.float64)
        else:
            r2 = torch.ones_like(d)
        denom = d * d + lam * r2
        filt = torch.where(denom > 0, d / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(d))
        return filt.to(t.dtype)

    out = _apply_mask(apply_kspace_filter(t, kernel_fn, pad), mask)
    return out if was_tensor else out.cpu().numpy()


def cosmos(
    fields,
    orientations,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    mask=None,
    conditioning: float = 1e-3,
    pad=None,
):
    """COSMOS: least-squares susceptibility from fields measured at several B0 orientations.

    Parameters
    ----------
    fields : array (..., K, X, Y, Z)
        Local fields (ppm) in the object frame, one per orientation (the K axis is the
        fourth-last).
    orientations : array (K, 3)
        B0 direction of each field in the object frame.
    voxel_size : (float, float, float)
    mask : array (X, Y, Z), optional
        Applied to the result only.
    conditioning : float
        Frequencies where ``sum_j D_j^2 < conditioning`` (the k = 0 point and, with fewer than
        three orientations, the shared cone surfaces) are set to zero instead of divided.
    pad : see :func:`qmri_labels.physics.qsm.forward_field`

    Returns
    -------
    chi : array (..., X, Y, Z)
    """
    t, was_tensor = _prepare(fields, "fields")
    orient = np.asarray(orientations, dtype=np.float64)
    if orient.ndim != 2 or orient.shape[1] != 3:
        raise ValueError(f"orientations must be (K, 3), got shape {orient.shape}")
    if t.ndim < 4 or t.shape[-4] != orient.shape[0]:
        raise ValueError(
            f"fields must be (..., K, X, Y, Z) with K = {orient.shape[0]} orientations, got shape {tuple(t.shape)}"
        )
    if conditioning <= 0:
        raise ValueError(f"conditioning must be > 0, got {conditioning}")
    dirs = [normalize_direction(d) for d in orient]
    shape3 = tuple(t.shape[-3:])
    px, py, pz = _pad_amounts(shape3, pad)
    if px or py or pz:
        t = torch.nn.functional.pad(t, (pz, pz, py, py, px, px))
    grid = tuple(t.shape[-3:])
    spectra = torch.fft.fftn(t, dim=(-3, -2, -1))
    kernels = torch.stack([_dipole_kernel_torch(grid, voxel_size, d, 0.0, t.device, torch.float64) for d in dirs])
    denom = (kernels**2).sum(0)
    num = (spectra * kernels.to(t.dtype)).sum(-4)
    good = denom >= conditioning
    inv = torch.where(good, 1.0 / torch.where(good, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    out = torch.fft.ifftn(num * inv.to(t.dtype), dim=(-3, -2, -1)).real
    if px or py or pz:
        out = out[..., px : px + shape3[0], py : py + shape3[1], pz : pz + shape3[2]]
    out = _apply_mask(out, mask)
    return out if was_tensor else out.cpu().numpy()


def _forward_differences(x: torch.Tensor, voxel_size) -> torch.Tensor:
    """Periodic forward differences ``(x[n+1] - x[n]) / voxel_size_i``, stacked on a new dim -4."""
    return torch.stack([(torch.roll(x, -1, dims=d) - x) / float(v) for d, v in zip((-3, -2, -1), voxel_size)], dim=-4)


def _gradient_spectra(shape, voxel_size, device) -> torch.Tensor:
    """k-space factors ``(exp(2 pi i n/N) - 1) / v`` of :func:`_forward_differences`, (3, X, Y, Z)."""
    out = []
    for axis, (n, v) in enumerate(zip(shape, voxel_size)):
        idx = torch.fft.fftfreq(n, device=device, dtype=torch.float64)
        g = (torch.exp(2j * torch.pi * idx) - 1.0) / float(v)
        view = [1, 1, 1]
        view[axis] = n
        out.append(g.reshape(view).expand(*shape))
    return torch.stack(out)


def tv(
    field,
    mask,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    lam: float = TV_DEFAULT_LAMBDA,
    *,
    mu_grad: float | None = None,
    mu_data: float = 1.0,
    max_iter: int = 150,
    tol: float = 1e-3,
    device: str | torch.device | None = None,
):
    """Total-variation dipole inversion by ADMM.

    Solves ``argmin_chi 1/2 ||M (D chi - f)||^2 + lam ||G chi||_1`` (anisotropic TV, periodic
    forward differences ``G`` in ppm/mm) with two splittings, ``z = G chi`` and ``y = D chi``,
    so that every step is closed form: the chi step is a division in k-space by
    ``mu_grad |G|^2 + mu_data D^2``, the z step a soft threshold at ``lam / mu_grad`` and the
    y step the voxel-wise ``(M f + mu_data (D chi + w)) / (M + mu_data)`` (the mask weights
    the data term, so the unknown field outside the mask does not pull chi towards zero).

    Parameters
    ----------
    field : array (..., X, Y, Z)
        Local field (ppm); leading dimensions are a batch.
    mask : array (X, Y, Z) or (..., X, Y, Z)
        Brain mask (the data weight; the result is zero outside it).
    voxel_size, b0_dir
        As in :func:`qmri_labels.physics.qsm.dipole_kernel`.
    lam : float
        TV weight (> 0), default :data:`TV_DEFAULT_LAMBDA`.
    mu_grad : float, optional
        ADMM penalty of ``z = G chi`` (default ``100 lam``, FANSI's choice).
    mu_data : float
        ADMM penalty of ``y = D chi`` (default 1).
    max_iter : int
        Largest number of ADMM iterations (default 150).
    tol : float
        Stop when ``||chi_k - chi_{k-1}|| / ||chi_k|| < tol`` for every volume (default 1e-3).
    device : str or torch.device, optional
        Where to compute (default: that of ``field`` if a tensor, else CPU).

    Returns
    -------
    chi : same type as ``field`` (ppm), zero outside the mask.
    """
    if not (np.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be a finite number > 0, got {lam}")
    mu_grad = 100.0 * float(lam) if mu_grad is None else float(mu_grad)
    if not (mu_grad > 0 and mu_data > 0):
        raise ValueError(f"mu_grad and mu_data must be > 0, got {mu_grad} and {mu_data}")
    if int(max_iter) < 1 or not tol >= 0:
        raise ValueError(f"max_iter must be >= 1 and tol >= 0, got {max_iter} and {tol}")
    if mask is None:
        raise ValueError("tv needs the brain mask (the data term is weighted by it)")
    t, was_tensor = _prepare(field, "field")
    dev = t.device if device is None else torch.device(device)
    f = t.to(dev, torch.float32)
    m, _ = _to_tensor(mask, "mask", device=dev)
    if tuple(m.shape[-3:]) != tuple(f.shape[-3:]):
        raise ValueError(f"mask shape {tuple(m.shape)} does not match field shape {tuple(f.shape)}")
    m = (m != 0).to(torch.float32)
    shape = tuple(f.shape[-3:])
    dims = (-3, -2, -1)
    v = [float(x) for x in np.asarray(voxel_size, dtype=np.float64)]
    d = _dipole_kernel_torch(shape, voxel_size, b0_dir, 0.0, dev, torch.float64)
    g = _gradient_spectra(shape, v, dev)
    denom = mu_grad * (g.abs() ** 2).sum(0) + mu_data * d * d
    inv = torch.where(denom > 0, 1.0 / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    d32, inv32, gconj = d.to(torch.float32), inv.to(torch.float32), g.conj().to(torch.complex64)
    mf = m * f
    chi = torch.zeros_like(f)
    z = torch.zeros(f.shape[:-3] + (3,) + shape, dtype=torch.float32, device=dev)
    u = torch.zeros_like(z)
    y = mf.clone()
    w = torch.zeros_like(f)
    thresh = float(lam) / mu_grad
    for _ in range(int(max_iter)):
        rhs = mu_grad * (gconj * torch.fft.fftn(z - u, dim=dims)).sum(-4) + mu_data * d32 * torch.fft.fftn(y - w, dim=dims)
        new = torch.fft.ifftn(rhs * inv32, dim=dims).real
        change = torch.linalg.vector_norm(new - chi, dim=dims) / torch.linalg.vector_norm(new, dim=dims).clamp_min(1e-12)
        chi = new
        grad = _forward_differences(chi, v)
        z = torch.sign(grad + u) * torch.clamp((grad + u).abs() - thresh, min=0.0)
        u = u + grad - z
        dchi = torch.fft.ifftn(d32 * torch.fft.fftn(chi, dim=dims), dim=dims).real
        y = (mf + mu_data * (dchi + w)) / (m + mu_data)
        w = w + dchi - y
        if bool((change < tol).all()):
            break
    out = chi * m
    out = out.to(t.device, t.dtype)
    return out if was_tensor else out.cpu().numpy()
