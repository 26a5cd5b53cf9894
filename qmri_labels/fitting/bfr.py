"""Background-field removal (BFR): the local field of the brain from the total field.

Inside the brain, the total field measured by a phase map is dominated (10-100x) by the field of
sources outside it (air/tissue boundaries of the sinuses, the skull, the air around the head).
That *background* field is harmonic inside the brain (its sources lie outside), which is what
every method below exploits. Each has the same signature::

    local, eroded_mask = method(total_field, mask, voxel_size, b0_dir=(0, 0, 1), **options)

``total_field`` is ``(..., X, Y, Z)`` in ppm (leading dimensions are a batch), ``mask`` the
brain mask ``(X, Y, Z)`` or ``(..., X, Y, Z)``; the result is the local field (ppm, zero outside
``eroded_mask``) and the mask on which it is valid (methods that erode return a smaller one).
NumPy in gives NumPy out; torch tensors are computed on their device (CPU or GPU) and returned
as tensors. ``b0_dir`` is used by PDF (the dipole kernel) and accepted by all for a common
signature.

* :func:`sharp` -- SHARP (Schweser et al., 2011): spherical-mean-value (SMV) filtering
  ``(delta - s_r) * f`` (which removes any harmonic field), restricted to the mask eroded by the
  sphere, then deconvolution by ``1 - S_r`` (truncated where ``|1 - S_r| < threshold``).
* :func:`vsharp` -- V-SHARP (Li et al., 2011): SHARP with a radius that shrinks towards the
  brain edge (each voxel uses the largest sphere that fits in the mask), so the mask is eroded
  only by the smallest radius; deconvolution with the largest kernel.
* :func:`resharp` -- RESHARP (Sun & Wilman, 2014): Tikhonov-regularised SHARP,
  ``argmin ||M_r C (f - f_L)||^2 + lam ||f_L||^2`` with ``C = delta - s_r``, by conjugate
  gradients.
* :func:`pdf` -- projection onto dipole fields (Liu et al., 2011): the background is the field
  ``D * chi_b`` of sources ``chi_b`` outside the mask that best fits the total field inside it
  (least squares by conjugate gradients); the local field is the rest. No erosion.
* :func:`lbv` -- Laplacian boundary value (Zhou et al., 2014): the background is the solution
  of Laplace's equation inside the mask that equals the total field on the mask boundary
  (conjugate gradients on the 7-point Laplacian with the voxel size); the mask loses its
  one-voxel boundary, where the local field is zero by construction.

Radii are in mm when given as numbers, or in voxels as a string ``"4vox"`` (4 times the largest
voxel side; :func:`resolve_radius`). The defaults (:data:`DEFAULTS`) are in voxels, so that a
method runs at its defaults at any voxel size and its sphere spans the same number of voxels: at
1 mm they are the mm values they always were (SHARP and RESHARP 4 mm, V-SHARP 8 mm down to 1
mm), at 2 mm twice those (a 1 mm sphere in 2 mm voxels holds one voxel and is refused). The
other defaults (thresholds, tolerances) are in each signature and in :data:`DEFAULTS`.
All convolutions are circular on the grid (zero-pad the volume first if the brain touches its
edge). A background field has no mean to speak of, and neither does the local field: BFR results
are defined up to a constant, so compare them after removing the mean over the eroded mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from qmri_labels.physics.qsm import _check_voxel_size, _dipole_kernel_torch, _to_tensor

__all__ = ["sharp", "vsharp", "resharp", "pdf", "lbv", "BFR_METHODS", "DEFAULTS", "bfr_record", "remove_background",
           "remove_background_per_orientation", "sphere_kernel", "resolve_radius", "common_eroded_mask"]

_DIMS = (-3, -2, -1)

#: documented default options of every method (radii in voxels of the largest side, see
#: :func:`resolve_radius`)
DEFAULTS: dict[str, dict] = {
    "sharp": {"radius": "4vox", "threshold": 0.05},
    "vsharp": {"max_radius": "8vox", "min_radius": "1vox", "step": "1vox", "threshold": 0.05},
    "resharp": {"radius": "4vox", "lam": 1e-3, "max_iter": 200, "tol": 1e-5},
    "pdf": {"max_iter": 200, "tol": 1e-5},
    "lbv": {"max_iter": 2000, "tol": 1e-6},
}


# -- shared pieces ----------------------------------------------------------------------------
def resolve_radius(value, voxel_size, name: str = "radius") -> float:
    """A radius in mm: a number is mm, a string ``"N vox"`` (or ``"Nvox"``, ``"N voxels"``) is N
    times the largest side of ``voxel_size``. ValueError unless the result is a finite number > 0.
    """
    v = _check_voxel_size(voxel_size)
    if isinstance(value, str):
        text = value.strip().lower()
        for unit in ("voxels", "voxel", "vox"):
            if text.endswith(unit):
                try:
                    mm = float(text[: -len(unit)]) * float(max(v))
                except ValueError:
                    break
                _check_positive(**{name: mm})
                return mm
        raise ValueError(f"{name} must be a number of mm or a string like '4vox' (voxels), got {value!r}")
    _check_positive(**{name: value})
    return float(value)


def _prepare(total_field, mask, voxel_size):
    f, was_tensor = _to_tensor(total_field, "total_field")
    if f.ndim < 3:
        raise ValueError(f"total_field must be (..., X, Y, Z), got shape {tuple(f.shape)}")
    if not bool(torch.isfinite(f).all()):
        raise ValueError("total_field contains NaN or inf")
    if mask is None:
        raise ValueError("a brain mask is required for background-field removal")
    m, _ = _to_tensor(mask, "mask", device=f.device)
    if m.ndim < 3 or tuple(m.shape[-3:]) != tuple(f.shape[-3:]):
        raise ValueError(f"mask shape {tuple(m.shape)} does not match total_field shape {tuple(f.shape)}")
    m = (m != 0).to(f.dtype if f.dtype in (torch.float32, torch.float64) else torch.float32)
    if not bool((m.sum(dim=_DIMS) > 0).all()):
        raise ValueError("mask selects no voxels")
    v = _check_voxel_size(voxel_size)
    f = f.to(m.dtype)
    return f, m, v, was_tensor


def _finish(local: torch.Tensor, eroded: torch.Tensor, was_tensor: bool, like: torch.Tensor):
    eroded_b = eroded > 0.5
    local = local * eroded_b.to(local.dtype)
    if was_tensor:
        return local.to(like.dtype), eroded_b
    return local.cpu().numpy().astype(np.float32 if like.dtype != torch.float64 else np.float64), eroded_b.cpu().numpy()


def sphere_kernel(shape, voxel_size, radius: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised spherical kernel (sum 1) of ``radius`` mm on the unshifted grid, and its FFT.

    Returns the real FFT ``S(k)`` (the kernel is even, so its spectrum is real), shape ``shape``.
    Raises ValueError if the sphere holds a single voxel (radius below the voxel size).
    """
    if not (np.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be > 0 mm, got {radius}")
    v = _check_voxel_size(voxel_size)
    axes = []
    for n, vs in zip(shape, v):
        idx = torch.arange(n, device=device, dtype=torch.float64)
        idx = torch.where(idx > n // 2, idx - n, idx)  # signed offset of each grid index
        axes.append(idx * float(vs))
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    ball = ((x * x + y * y + z * z) <= float(radius) ** 2 + 1e-9).to(torch.float64)
    if ball.sum() < 2:
        raise ValueError(f"radius {radius} mm is below the voxel size {v.tolist()}: the sphere holds one voxel")
    ball = ball / ball.sum()
    return torch.fft.fftn(ball).real.to(dtype)


def _conv(x: torch.Tensor, spectrum: torch.Tensor) -> torch.Tensor:
    return torch.fft.ifftn(torch.fft.fftn(x, dim=_DIMS) * spectrum, dim=_DIMS).real


def _erode(mask: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Voxels whose whole sphere (kernel spectrum ``s``) lies in the mask."""
    return (_conv(mask, s) > 1.0 - 1e-4).to(mask.dtype) * mask


def _deconvolve(x: torch.Tensor, s: torch.Tensor, threshold: float) -> torch.Tensor:
    """``IFFT(FFT(x) / (1 - S))`` with the inverse truncated to 0 where ``|1 - S| < threshold``."""
    h = 1.0 - s
    inv = torch.where(h.abs() >= threshold, 1.0 / torch.where(h == 0, torch.ones_like(h), h), torch.zeros_like(h))
    return _conv(x, inv)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=_DIMS, keepdim=True)


def _cg(apply_a: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """Conjugate gradients for an SPD operator, batched over leading dims (each volume stops
    updating once ``||r|| <= tol ||b||``)."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = _dot(r, r)
    stop = (tol * torch.sqrt(_dot(b, b))) ** 2
    for _ in range(int(max_iter)):
        active = (rs > stop).to(b.dtype)
        if not bool(active.any()):
            break
        ap = apply_a(p)
        alpha = active * rs / _dot(p, ap).clamp_min(1e-30)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = _dot(r, r)
        p = r + (rs_new / rs.clamp_min(1e-30)) * p
        rs = rs_new
    return x


def _check_positive(**values):
    for name, value in values.items():
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value}")


# -- methods ----------------------------------------------------------------------------------
def sharp(total_field, mask, voxel_size: Sequence[float] = (1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0), *,
          radius: float | str = "4vox", threshold: float = 0.05):
    """SHARP background-field removal.

    Parameters
    ----------
    total_field : array (..., X, Y, Z)
        Total field (ppm).
    mask : array (X, Y, Z) or (..., X, Y, Z)
        Brain mask.
    voxel_size : (float, float, float)
        mm.
    b0_dir : unused (common signature).
    radius : float or str
        Sphere radius in mm, or in voxels (``"4vox"``, the default: 4 mm at 1 mm voxels); the
        mask is eroded by it.
    threshold : float
        Truncation of the deconvolution ``1 / (1 - S)`` (default 0.05).

    Returns
    -------
    local_field, eroded_mask
    """
    radius = resolve_radius(radius, voxel_size)
    _check_positive(threshold=threshold)
    f, m, v, was_tensor = _prepare(total_field, mask, voxel_size)
    s = sphere_kernel(f.shape[-3:], v, radius, f.device, f.dtype)
    eroded = _erode(m, s)
    high_pass = eroded * (f - _conv(f, s))
    local = _deconvolve(high_pass, s, threshold) * eroded
    return _finish(local, eroded, was_tensor, f)


def vsharp(total_field, mask, voxel_size: Sequence[float] = (1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0), *,
           max_radius: float | str = "8vox", min_radius: float | str = "1vox", step: float | str = "1vox",
           threshold: float = 0.05):
    """V-SHARP: SHARP with radii from ``max_radius`` down to ``min_radius`` (``step`` apart).

    Each voxel takes the SMV-filtered field of the largest sphere that fits in the mask; the
    result is deconvolved with the largest kernel (truncated at ``threshold``) and is valid on
    the mask eroded by ``min_radius`` (defaults: 8 voxels down to 1 in steps of 1, i.e. 8 mm to
    1 mm at 1 mm voxels; threshold 0.05). Radii are mm or voxels (:func:`resolve_radius`).
    """
    max_radius = resolve_radius(max_radius, voxel_size, "max_radius")
    min_radius = resolve_radius(min_radius, voxel_size, "min_radius")
    step = resolve_radius(step, voxel_size, "step")
    _check_positive(threshold=threshold)
    if min_radius > max_radius:
        raise ValueError(f"min_radius ({min_radius}) must be <= max_radius ({max_radius})")
    f, m, v, was_tensor = _prepare(total_field, mask, voxel_size)
    radii = np.arange(float(max_radius), float(min_radius) - 1e-9, -float(step))
    if radii[-1] > min_radius + 1e-9:  # the steps skipped min_radius: it is still the last (the erosion)
        radii = np.append(radii, float(min_radius))
    high_pass = torch.zeros_like(f)
    filled = torch.zeros_like(m)
    s_max = None
    eroded = None
    for r in radii:
        s = sphere_kernel(f.shape[-3:], v, float(r), f.device, f.dtype)
        if s_max is None:
            s_max = s
        eroded = _erode(m, s)
        new = eroded * (1.0 - filled)
        high_pass = high_pass + new * (f - _conv(f, s))
        filled = torch.clamp(filled + new, max=1.0)
    local = _deconvolve(high_pass, s_max, threshold) * eroded
    return _finish(local, eroded, was_tensor, f)


def resharp(total_field, mask, voxel_size: Sequence[float] = (1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0), *,
            radius: float | str = "4vox", lam: float = 1e-3, max_iter: int = 200, tol: float = 1e-5):
    """RESHARP: ``argmin_fL ||M_r C (f - f_L)||^2 + lam ||f_L||^2``, ``C = delta - s_r``.

    Solved by conjugate gradients on ``(C M_r C + lam) f_L = C M_r C f`` (defaults: radius 4
    voxels, lam 1e-3, at most 200 iterations, relative residual 1e-5); valid on the mask eroded by
    ``radius`` (mm or voxels, :func:`resolve_radius`).
    """
    radius = resolve_radius(radius, voxel_size)
    _check_positive(lam=lam, tol=tol)
    f, m, v, was_tensor = _prepare(total_field, mask, voxel_size)
    s = sphere_kernel(f.shape[-3:], v, radius, f.device, f.dtype)
    eroded = _erode(m, s)
    c = 1.0 - s

    def apply_a(x):
        return _conv(eroded * _conv(x, c), c) + lam * x

    local = _cg(apply_a, _conv(eroded * _conv(f, c), c), max_iter, tol) * eroded
    return _finish(local, eroded, was_tensor, f)


def pdf(total_field, mask, voxel_size: Sequence[float] = (1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0), *,
        max_iter: int = 200, tol: float = 1e-5):
    """Projection onto dipole fields: fit the total field inside the mask by sources outside it.

    ``chi_b = argmin ||M (f - D (1 - M) chi_b)||^2`` by conjugate gradients (defaults: at most
    200 iterations, relative residual 1e-5); the background is ``D (1 - M) chi_b`` and the local
    field ``M (f - background)``. Needs the B0 direction; no erosion. Solved in float64 whatever
    the input's precision (float32 on MPS); the result has the input's dtype.
    """
    _check_positive(tol=tol)
    f_in, m, v, was_tensor = _prepare(total_field, mask, voxel_size)
    # The normal equations square the dipole kernel's ill-conditioning: in float32 the CG
    # iterates lose orthogonality within ~10 iterations, so that rounding differences (a batched
    # FFT against a single one, another CPU) changed the local field by ~10 %. Solved in float64
    # (where the device has it) and returned in the input's precision.
    work = torch.float32 if f_in.device.type == "mps" else torch.float64
    f, m = f_in.to(work), m.to(work)
    d = _dipole_kernel_torch(tuple(f.shape[-3:]), v, b0_dir, 0.0, f.device, f.dtype)
    outside = 1.0 - m

    def apply_a(x):
        return outside * _conv(m * _conv(outside * x, d), d)

    chi_b = _cg(apply_a, outside * _conv(m * f, d), max_iter, tol)
    local = m * (f - _conv(outside * chi_b, d))
    return _finish(local, m, was_tensor, f_in)


def _laplacian(x: torch.Tensor, weights) -> torch.Tensor:
    out = torch.zeros_like(x)
    for dim, w in zip(_DIMS, weights):
        out = out + w * (torch.roll(x, 1, dims=dim) + torch.roll(x, -1, dims=dim) - 2.0 * x)
    return out


def lbv(total_field, mask, voxel_size: Sequence[float] = (1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0), *,
        max_iter: int = 2000, tol: float = 1e-6):
    """Laplacian boundary value: the background solves Laplace's equation inside the mask.

    The background ``b`` equals the total field on the mask's one-voxel boundary and satisfies
    ``Laplacian(b) = 0`` (7-point stencil, weights ``1/voxel_size^2``) on the interior; solved
    by conjugate gradients (defaults: at most 2000 iterations, relative residual 1e-6). Returns
    ``f - b`` on the interior (the mask without its boundary) and that interior.
    """
    _check_positive(tol=tol)
    f, m, v, was_tensor = _prepare(total_field, mask, voxel_size)
    weights = [1.0 / float(x) ** 2 for x in v]
    interior = m.clone()
    for dim in _DIMS:
        interior = interior * torch.roll(m, 1, dims=dim) * torch.roll(m, -1, dims=dim)
    boundary = m - interior
    f_boundary = f * boundary

    def apply_a(x):
        return -interior * _laplacian(interior * x, weights)

    b_interior = _cg(apply_a, interior * _laplacian(f_boundary, weights), max_iter, tol)
    local = interior * (f - b_interior)
    return _finish(local, interior, was_tensor, f)


#: name -> method (the names the workflows and the fit command accept)
BFR_METHODS: dict[str, Callable] = {"sharp": sharp, "vsharp": vsharp, "resharp": resharp, "pdf": pdf, "lbv": lbv}


def bfr_record(method: str, **options) -> dict:
    """``{"method": method, option: value, ...}`` with every option of ``method`` written out.

    Options not given take their :data:`DEFAULTS`, so that two records of the same processing
    are equal (datasets and manifests store this). ValueError names an unknown method or option.
    """
    if method not in BFR_METHODS:
        raise ValueError(f"unknown background-field removal method {method!r}; known: {sorted(BFR_METHODS)}")
    unknown = set(options) - set(DEFAULTS[method])
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for BFR method {method!r}; known: {sorted(DEFAULTS[method])}")
    return {"method": method, **{k: options.get(k, v) for k, v in DEFAULTS[method].items()}}


def remove_background(method: str, total_field, mask, voxel_size=(1.0, 1.0, 1.0), b0_dir=(0.0, 0.0, 1.0),
                      **options):
    """``BFR_METHODS[method](total_field, mask, voxel_size, b0_dir, **options)`` with a clear error
    for an unknown method or option."""
    bfr_record(method, **options)
    return BFR_METHODS[method](total_field, mask, voxel_size, b0_dir, **options)


def remove_background_per_orientation(method: str, fields, masks, voxel_size, orientations, **options):
    """BFR of phantom-set fields ``(N, K, X, Y, Z)`` (K B0 orientations) with masks ``(N, X, Y, Z)``.

    Each field is processed with its own B0 direction; the local fields of one volume share the
    intersection of their eroded masks. Returns ``(local (N, K, X, Y, Z) float32, eroded (N, X, Y,
    Z) bool)`` as NumPy arrays.
    """
    fields = np.asarray(fields)
    masks = np.asarray(masks)
    if fields.ndim != 5 or masks.shape != fields.shape[:1] + fields.shape[2:]:
        raise ValueError(f"fields must be (N, K, X, Y, Z) and masks (N, X, Y, Z), got {fields.shape} and {masks.shape}")
    if len(orientations) != fields.shape[1]:
        raise ValueError(f"{len(orientations)} orientations for {fields.shape[1]} fields per volume")
    local, eroded = [], []
    for vol_fields, mask in zip(fields, masks):
        per = [remove_background(method, np.asarray(f, np.float32), mask, voxel_size, d, **options)
               for f, d in zip(vol_fields, orientations)]
        common = np.logical_and.reduce([e for _, e in per])
        local.append(np.stack([loc * common for loc, _ in per]).astype(np.float32))
        eroded.append(common)
    return np.stack(local), np.stack(eroded)


def common_eroded_mask(mask, voxel_size=(1.0, 1.0, 1.0), methods: Sequence[str] | None = None, **options_by_method):
    """The voxels of ``mask`` that every method of ``methods`` (default all) keeps, each at its
    defaults (or at ``options_by_method[name]``, a dict): where methods can be compared.

    The eroded masks depend on the mask only, so each method runs on a zero field.
    """
    mask = np.asarray(mask) != 0
    common = mask.copy()
    zero = np.zeros(mask.shape, np.float32)
    for name in methods or BFR_METHODS:
        _, eroded = remove_background(name, zero, mask, voxel_size, **options_by_method.get(name, {}))
        common &= eroded
    return common
