"""Magnetic dipole model of quantitative susceptibility mapping (QSM).

The local field perturbation (in ppm of B0) caused by a susceptibility distribution chi (in
ppm) is, in k-space,

.. math::  F(k) = D(k)\\,X(k), \\qquad D(k) = \\frac{1}{3} - \\frac{(k \\cdot \\hat b_0)^2}{|k|^2},

where :math:`\\hat b_0` is the unit vector of the main field in the image frame. The Lorentz
sphere correction is included (the 1/3), so the field inside a uniformly magnetised sphere is
zero and the field outside it is ``chi/3 (a/r)^3 (3 cos^2 theta - 1)``.

Conventions
-----------
* Spatial frequencies are ``k_i = n_i / (N_i * voxel_size_i)`` (cycles per mm) with ``n_i`` the
  FFT frequency index in *unshifted* order (``numpy.fft.fftfreq``). Dividing by the voxel size
  is what makes anisotropic voxels right; codes that multiply get the kernel wrong as soon as
  voxels are not cubic.
* ``D`` at ``k = 0`` is undefined (0/0). We set it to ``dc_value`` (default 0): the mean of
  chi then does not enter the field, which is what a field map after background-field removal
  measures, and inversions leave the mean of chi undetermined (hence the demeaned NRMSE in
  :mod:`qmri_labels.analysis.image_metrics`).
* The field is a circular convolution on the FFT grid. ``pad`` zero-pads the volume before the
  FFT (and crops after) to suppress wrap-around from the periodic boundary.
* Arrays are ``(..., X, Y, Z)``; leading dimensions are a batch. Functions accept NumPy arrays
  (returning NumPy) or torch tensors (returning torch on the same device, differentiable).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "dipole_kernel",
    "forward_field",
    "gradient_kernel_sq",
    "change_resolution",
    "normalize_direction",
    "rotation_to_direction",
]


def normalize_direction(b0_dir: Sequence[float] | np.ndarray) -> np.ndarray:
    """Unit vector (float64, shape (3,)) of ``b0_dir``; ValueError for a bad direction."""
    d = np.asarray(b0_dir, dtype=np.float64).reshape(-1)
    if d.shape != (3,):
        raise ValueError(f"b0_dir must have 3 components, got shape {np.shape(b0_dir)}")
    norm = np.linalg.norm(d)
    if not np.isfinite(norm) or norm == 0:
        raise ValueError(f"b0_dir must be a finite non-zero vector, got {d.tolist()}")
    return d / norm


def _check_voxel_size(voxel_size: Sequence[float]) -> np.ndarray:
    v = np.asarray(voxel_size, dtype=np.float64).reshape(-1)
    if v.shape != (3,):
        raise ValueError(f"voxel_size must have 3 components (mm), got {voxel_size!r}")
    if np.any(~np.isfinite(v)) or np.any(v <= 0):
        raise ValueError(f"voxel_size must be finite and > 0 (mm), got {v.tolist()}")
    return v


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be three positive integers, got {shape!r}")
    return shape


def _kspace_grid(shape, voxel_size, device, dtype):
    """Frequencies (cycles/mm) on the unshifted FFT grid, each broadcastable to ``shape``."""
    grids = []
    for axis, (n, v) in enumerate(zip(shape, voxel_size)):
        k = torch.fft.fftfreq(n, d=float(v), device=device, dtype=torch.float64)
        view = [1, 1, 1]
        view[axis] = n
        grids.append(k.reshape(view))
    return grids


def _dipole_kernel_torch(shape, voxel_size, b0_dir, dc_value, device, dtype) -> torch.Tensor:
    shape = _check_shape(shape)
    v = _check_voxel_size(voxel_size)
    b = normalize_direction(b0_dir)
    kx, ky, kz = _kspace_grid(shape, v, device, torch.float64)
    k2 = kx**2 + ky**2 + kz**2
    kb = kx * b[0] + ky * b[1] + kz * b[2]
    k2_safe = torch.where(k2 == 0, torch.ones_like(k2), k2)
    kernel = 1.0 / 3.0 - kb**2 / k2_safe
    kernel = torch.where(k2 == 0, torch.full_like(kernel, float(dc_value)), kernel)
    if any(n % 2 == 0 for n in shape):
        # On an even grid the Nyquist index n = N/2 is its own mirror, so with an oblique B0
        # the sampled kernel is not even, D(-k) != D(k), and Re(IFFT(D X)) would silently use
        # the even part. Symmetrising makes the kernel exactly the operator that is applied.
        mirrored = torch.roll(torch.flip(kernel, dims=(0, 1, 2)), shifts=(1, 1, 1), dims=(0, 1, 2))
        kernel = 0.5 * (kernel + mirrored)
    return kernel.to(dtype)


def dipole_kernel(
    shape: Sequence[int],
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    dc_value: float = 0.0,
    as_tensor: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> np.ndarray | torch.Tensor:
    """Dipole kernel ``D(k) = 1/3 - (k . b0)^2 / |k|^2`` on the unshifted FFT grid.

    Parameters
    ----------
    shape : (int, int, int)
        Grid size ``(X, Y, Z)`` (after any padding).
    voxel_size : (float, float, float)
        Voxel size in mm; ``k_i = n_i / (N_i * voxel_size_i)``.
    b0_dir : (float, float, float)
        Direction of B0 in the image frame (normalised here).
    dc_value : float
        Value at ``k = 0`` (default 0: the mean of chi is invisible in the field).
    as_tensor : bool
        Return a torch tensor (on ``device``, with ``dtype``) instead of a NumPy array.

    Returns
    -------
    ndarray or Tensor, shape ``shape``
        Real, even in k (``D(k) = D(-k)``; on even grids the Nyquist planes are symmetrised
        so that this holds exactly), values in ``[-2/3, 1/3]``.
    """
    kernel = _dipole_kernel_torch(shape, voxel_size, b0_dir, dc_value, device, dtype)
    return kernel if as_tensor else kernel.cpu().numpy()


def gradient_kernel_sq(
    shape: Sequence[int],
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    as_tensor: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> np.ndarray | torch.Tensor:
    """``sum_i |G_i(k)|^2`` of forward finite differences ``(x[n+1] - x[n]) / voxel_size_i``.

    ``|G_i(k)|^2 = 4 sin^2(pi n_i / N_i) / voxel_size_i^2`` on the unshifted FFT grid; used as
    the regulariser of the closed-form Tikhonov inversion.
    """
    shape = _check_shape(shape)
    v = _check_voxel_size(voxel_size)
    total = torch.zeros(shape, dtype=torch.float64, device=device)
    for axis, (n, vs) in enumerate(zip(shape, v)):
        idx = torch.fft.fftfreq(n, device=device, dtype=torch.float64)  # n_i / N_i
        g2 = 4.0 * torch.sin(torch.pi * idx) ** 2 / vs**2
        view = [1, 1, 1]
        view[axis] = n
        total = total + g2.reshape(view)
    total = total.to(dtype)
    return total if as_tensor else total.cpu().numpy()


def _to_tensor(x, name: str, device=None) -> tuple[torch.Tensor, bool]:
    if isinstance(x, torch.Tensor):
        t = x if device is None else x.to(device)
        if not t.is_floating_point():
            t = t.float()
        return t, True
    a = np.asarray(x)
    if a.dtype.kind not in "fiub":
        raise ValueError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    if a.dtype != np.float64:
        a = a.astype(np.float32)
    return torch.as_tensor(a, device=device), False


def _check_volume(t: torch.Tensor, name: str) -> None:
    if t.ndim < 3:
        raise ValueError(f"{name} must have at least 3 dimensions (..., X, Y, Z), got shape {tuple(t.shape)}")
    if torch.is_complex(t):
        raise ValueError(f"{name} must be real")


def _pad_amounts(shape3, pad) -> tuple[int, int, int]:
    if pad is None or pad is False:
        return (0, 0, 0)
    if pad is True:
        return tuple(int(s) // 2 for s in shape3)
    if np.isscalar(pad):
        pad = (pad, pad, pad)
    pad = tuple(int(p) for p in pad)
    if len(pad) != 3 or any(p < 0 for p in pad):
        raise ValueError(f"pad must be None, True, an int >= 0 or three ints >= 0, got {pad!r}")
    return pad


def apply_kspace_filter(volume: torch.Tensor, kernel_fn, pad) -> torch.Tensor:
    """``IFFT(kernel * FFT(volume))`` over the last three dims, zero-padding ``pad`` per side.

    ``kernel_fn(shape)`` returns the real (or complex) kernel for the padded grid.
    """
    shape3 = tuple(volume.shape[-3:])
    px, py, pz = _pad_amounts(shape3, pad)
    if px or py or pz:
        volume = torch.nn.functional.pad(volume, (pz, pz, py, py, px, px))
    padded_shape = tuple(volume.shape[-3:])
    kernel = kernel_fn(padded_shape)
    spectrum = torch.fft.fftn(volume, dim=(-3, -2, -1))
    out = torch.fft.ifftn(spectrum * kernel, dim=(-3, -2, -1)).real
    if px or py or pz:
        out = out[..., px : px + shape3[0], py : py + shape3[1], pz : pz + shape3[2]]
    return out


def forward_field(
    chi: np.ndarray | torch.Tensor,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    b0_dir: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    pad: int | Sequence[int] | bool | None = None,
    dc_value: float = 0.0,
) -> np.ndarray | torch.Tensor:
    """Local field (ppm) of a susceptibility map chi (ppm): ``IFFT(D * FFT(chi))``.

    Parameters
    ----------
    chi : ndarray or Tensor, shape (..., X, Y, Z)
        Susceptibility in ppm; leading dimensions are a batch.
    voxel_size, b0_dir, dc_value
        As in :func:`dipole_kernel`.
    pad : None, True, int or (int, int, int)
        Zero padding on each side before the FFT (``True``: half the size per side, i.e. a
        grid twice as large). Without padding the convolution is circular.

    Returns
    -------
    Same type as ``chi`` (NumPy float32/float64 or a differentiable torch tensor).
    """
    t, was_tensor = _to_tensor(chi, "chi")
    _check_volume(t, "chi")

    def kernel_fn(shape):
        return _dipole_kernel_torch(shape, voxel_size, b0_dir, dc_value, t.device, t.dtype)

    out = apply_kspace_filter(t, kernel_fn, pad)
    return out if was_tensor else out.cpu().numpy()


def _resample_axis(t: torch.Tensor, dim: int, n_new: int) -> torch.Tensor:
    """Band-limited resampling of a (complex) spectrum-domain axis ``dim`` to ``n_new`` samples.

    Works on the unshifted spectrum along ``dim``. Frequencies ``|n| < min(N, n_new)/2`` are
    copied. The Nyquist bin is handled symmetrically: truncating to an even ``n_new`` puts
    ``S[+n_new/2] + S[-n_new/2]`` into the new Nyquist bin (both frequencies alias to the same
    samples ``(-1)^x`` on the coarse grid, so this is what sampling the band-limited image
    gives), and zero-filling from an even ``N`` splits the old Nyquist bin in halves over
    ``+-N/2`` (a real image stays real).
    """
    n_old = t.shape[dim]
    if n_new == n_old:
        return t
    shape = list(t.shape)
    shape[dim] = n_new
    out = torch.zeros(shape, dtype=t.dtype, device=t.device)
    n = min(n_old, n_new)
    half = (n - 1) // 2  # strictly positive frequencies kept on both sides of 0
    out.narrow(dim, 0, half + 1).copy_(t.narrow(dim, 0, half + 1))
    if half:
        out.narrow(dim, n_new - half, half).copy_(t.narrow(dim, n_old - half, half))
    if n % 2 == 0:
        nyq = n // 2
        if n_new < n_old:  # truncation to an even size: the new Nyquist bin gets both old bins
            out.narrow(dim, nyq, 1).copy_(t.narrow(dim, nyq, 1) + t.narrow(dim, n_old - nyq, 1))
        else:  # zero filling from an even size: split the old Nyquist bin over +-N/2
            old_nyq = t.narrow(dim, nyq, 1)
            out.narrow(dim, nyq, 1).copy_(0.5 * old_nyq)
            out.narrow(dim, n_new - nyq, 1).copy_(0.5 * old_nyq)
    return out


def change_resolution(
    volume: np.ndarray | torch.Tensor,
    voxel_size: Sequence[float],
    new_voxel_size: Sequence[float],
) -> np.ndarray | torch.Tensor:
    """Resample ``(..., X, Y, Z)`` to ``new_voxel_size`` by k-space truncation (or zero filling).

    The low frequencies of the spectrum are kept (larger voxels) or the spectrum is
    zero-filled (smaller voxels); the new size along axis i is
    ``round(N_i * voxel_size_i / new_voxel_size_i)``. The Nyquist bin of an even size is
    handled symmetrically (see :func:`_resample_axis`), so a real image gives a real image and
    a pattern at the new Nyquist frequency keeps its amplitude. Intensities are preserved (a
    constant image stays the same constant). This is how Oh et al. (2021) make 1x1x3 mm data
    from 1x1x1 mm data: ``change_resolution(x, (1, 1, 1), (1, 1, 3))``.
    """
    t, was_tensor = _to_tensor(volume, "volume")
    _check_volume(t, "volume")
    v_old = _check_voxel_size(voxel_size)
    v_new = _check_voxel_size(new_voxel_size)
    old_shape = tuple(t.shape[-3:])
    new_shape = tuple(max(1, int(round(n * a / b))) for n, a, b in zip(old_shape, v_old, v_new))
    spectrum = torch.fft.fftn(t, dim=(-3, -2, -1))
    for axis, n_new in zip((-3, -2, -1), new_shape):
        spectrum = _resample_axis(spectrum, t.ndim + axis, n_new)
    scale = float(np.prod(new_shape)) / float(np.prod(old_shape))
    result = torch.fft.ifftn(spectrum, dim=(-3, -2, -1)).real * scale
    result = result.to(t.dtype)
    return result if was_tensor else result.cpu().numpy()


def rotation_to_direction(b0_dir: Sequence[float]) -> np.ndarray:
    """Rotation matrix R (3x3) with ``R @ (0, 0, 1) = b0_dir`` (the shortest rotation)."""
    b = normalize_direction(b0_dir)
    z = np.array([0.0, 0.0, 1.0])
    v = np.cross(z, b)
    c = float(np.dot(z, b))
    if np.linalg.norm(v) < 1e-12:
        return np.eye(3) if c > 0 else np.diag([1.0, -1.0, -1.0])
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx / (1.0 + c)
