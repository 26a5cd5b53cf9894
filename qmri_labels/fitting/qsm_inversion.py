"""Conventional dipole inversions: TKD, closed-form Tikhonov and COSMOS.

All three are closed-form divisions in k-space (see :mod:`qmri_labels.physics.qsm` for the
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

The mean of chi (k = 0) is not observable in a local field; all inversions return a zero k=0
component, i.e. a zero-mean result over the whole grid (not over the mask).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from qmri_labels.physics.qsm import (
    _dipole_kernel_torch,
    _to_tensor,
    apply_kspace_filter,
    gradient_kernel_sq,
    normalize_direction,
)

__all__ = ["tkd", "tikhonov", "cosmos", "TIKHONOV_DEFAULT_LAMBDA"]

#: default regularisation weight of :func:`tikhonov` with the gradient regulariser; near the best
#: NRMSE of a sweep (0.005-0.1) on 64^3 default phantoms with field noise 0.002-0.005 ppm
TIKHONOV_DEFAULT_LAMBDA = 0.01


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
    from qmri_labels.physics.qsm import _pad_amounts

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
