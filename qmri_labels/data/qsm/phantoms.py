"""Synthetic susceptibility phantoms for QSM (after Graf et al., 2023).

A phantom is a volume of random spheres and boxes, each with a susceptibility drawn from a
Gaussian ``N(0, sigma^2)`` (ppm, ``sigma = 0.25`` by default), painted one over the other
with smooth edges, and then cut by a support mask made of a few random ellipsoids: outside the
mask chi is zero (Graf et al. zero the borders with random ellipsoids; the mask is what a
brain mask is for real data).

Smoothing is analytic, which keeps generation vectorised and fast (a 160^3 volume takes a
few seconds): the Gaussian blur (standard deviation ``smoothing`` voxels) of a box is the
product of three 1-D blurred rectangles, ``prod_i [erf((x_i + h_i)/(s sqrt2)) - erf((x_i -
h_i)/(s sqrt2))]/2`` (exact, also for rotated boxes since the Gaussian is isotropic), and that of
a sphere is approximated by the blurred step ``erfc((r - R)/(s sqrt2))/2`` of its radial
distance (exact in the limit ``R >> s``). Each shape is evaluated only inside its bounding box.

Randomness comes only from NumPy's PCG64 generator seeded by the caller, so the same seed
gives the same phantom on every machine.

A head, not a box of shapes (:func:`make_background`): the phantom's support is the *brain
mask*; around it lie a skull-like shell (``skull_chi``, -2 ppm relative to brain tissue, like
cortical bone), a thin soft-tissue scalp (0 ppm), air outside the head (``air_chi``, +9.4 ppm:
air minus water) and a few sinus-like air pockets just outside the brain. The *total* field
is the dipole convolution of everything (brain sources plus background); the *local* field is
the field of the brain sources alone, restricted to the brain mask -- what a field map holds
after background-field removal (:mod:`qmri_labels.fitting.bfr`). Inside the brain the
background field is 10-100x larger than the local field, as in a real head.

The recipe of a whole set of heads with their fields, and the set itself, are in
:mod:`qmri_labels.data.qsm.phantom_set`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.special import erf, erfc

__all__ = ["make_phantom", "make_ellipsoid_phantom", "make_background", "random_orientations"]


def _rng(seed_or_rng) -> np.random.Generator:
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    return np.random.Generator(np.random.PCG64(seed_or_rng))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random 3-D rotation matrix (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _box_slices(center, half_extent, margin, shape):
    lo = np.maximum(np.floor(center - half_extent - margin).astype(int), 0)
    hi = np.minimum(np.ceil(center + half_extent + margin).astype(int) + 1, shape)
    return lo, hi


def _local_coords(lo, hi, center):
    ax = [np.arange(l, h, dtype=np.float32) - np.float32(c) for l, h, c in zip(lo, hi, center)]
    return np.meshgrid(*ax, indexing="ij", sparse=True)


def make_phantom(
    shape: tuple[int, int, int] = (160, 160, 160),
    *,
    n_spheres: int | None = None,
    n_boxes: int | None = None,
    sigma: float = 0.25,
    size_range: tuple[float, float] = (2.0, 16.0),
    smoothing: float = 1.0,
    n_ellipsoids: int = 3,
    mask_extent: tuple[float, float] = (0.6, 0.85),
    seed: int | np.random.Generator | None = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic susceptibility volume and its support mask.

    Parameters
    ----------
    shape : (int, int, int)
        Grid size in voxels.
    n_spheres, n_boxes : int, optional
        Number of shapes of each kind; by default ``round(200 * V / 160^3)`` with V the number
        of voxels (at least 2): a constant density, so that a small volume looks like a crop
        of a large one (200 of each cover about half of a 160^3 support mask).
    sigma : float
        Standard deviation (ppm) of the Gaussian susceptibility of each shape.
    size_range : (float, float)
        Range of the sphere radius and of each box half-side, in voxels (uniform).
    smoothing : float
        Standard deviation (voxels) of the Gaussian edge blur of each shape (0: sharp edges).
    n_ellipsoids : int
        Number of random ellipsoids whose union forms the support mask.
    mask_extent : (float, float)
        Range of the ellipsoid semi-axes as a fraction of half the grid size.
    seed : int or numpy Generator

    Returns
    -------
    chi : ndarray float32, shape ``shape``
        Susceptibility (ppm), zero outside the mask.
    mask : ndarray bool, shape ``shape``
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or any(s < 4 for s in shape):
        raise ValueError(f"shape must be three integers >= 4, got {shape!r}")
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be > 0 (ppm), got {sigma}")
    lo_f, hi_f = (float(x) for x in size_range)
    if not (0 < lo_f <= hi_f):
        raise ValueError(f"size_range must satisfy 0 < low <= high (voxels), got {size_range!r}")
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0 voxels, got {smoothing}")
    if n_ellipsoids < 1:
        raise ValueError(f"n_ellipsoids must be >= 1, got {n_ellipsoids}")
    m_lo, m_hi = (float(x) for x in mask_extent)
    if not (0 < m_lo <= m_hi <= 1.0):
        raise ValueError(f"mask_extent must satisfy 0 < low <= high <= 1, got {mask_extent!r}")
    rng = _rng(seed)
    default_n = max(2, int(round(200 * np.prod(shape) / 160**3)))
    n_spheres = default_n if n_spheres is None else int(n_spheres)
    n_boxes = default_n if n_boxes is None else int(n_boxes)
    if n_spheres < 0 or n_boxes < 0:
        raise ValueError("n_spheres and n_boxes must be >= 0")

    dims = np.asarray(shape, dtype=np.float64)
    chi = np.zeros(shape, dtype=np.float32)
    s = max(float(smoothing), 1e-6)
    inv = np.float32(1.0 / (s * np.sqrt(2.0)))
    margin = 3.0 * s + 1.0

    # Draw every random number up front, in a fixed order, so results do not depend on
    # the order in which shapes happen to be painted.
    kinds = np.array([0] * n_spheres + [1] * n_boxes)
    kinds = kinds[rng.permutation(len(kinds))]
    n_shapes = len(kinds)
    centers = rng.uniform(0, 1, size=(n_shapes, 3)) * (dims - 1)
    sizes = rng.uniform(lo_f, hi_f, size=(n_shapes, 3))
    values = rng.normal(0.0, sigma, size=n_shapes).astype(np.float32)
    rotations = [_random_rotation(rng) for _ in range(n_shapes)]

    for kind, center, size, value, rot in zip(kinds, centers, sizes, values, rotations):
        if kind == 0:
            radius = size[0]
            lo, hi = _box_slices(center, radius, margin, shape)
            if np.any(hi <= lo):
                continue
            x, y, z = _local_coords(lo, hi, center)
            r = np.sqrt(x * x + y * y + z * z)
            weight = 0.5 * erfc((r - np.float32(radius)) * inv)
        else:
            half = size
            reach = np.linalg.norm(half)  # bounding radius of the rotated box
            lo, hi = _box_slices(center, reach, margin, shape)
            if np.any(hi <= lo):
                continue
            x, y, z = _local_coords(lo, hi, center)
            weight = None
            for axis in range(3):
                u = rot[0, axis] * x + rot[1, axis] * y + rot[2, axis] * z
                h = np.float32(half[axis])
                profile = 0.5 * (erf((u + h) * inv) - erf((u - h) * inv))
                weight = profile if weight is None else weight * profile
        weight = weight.astype(np.float32, copy=False)
        region = chi[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        # painter's blend: a later shape covers earlier ones, with a soft edge
        region += weight * (value - region)

    mask = _support_mask(shape, n_ellipsoids, (m_lo, m_hi), rng)
    chi *= mask
    return chi, mask


def _support_mask(shape, n_ellipsoids: int, mask_extent, rng: np.random.Generator) -> np.ndarray:
    """Union of ``n_ellipsoids`` random ellipsoids around the centre (semi-axes a fraction
    ``mask_extent`` of half the grid): the brain mask of the random-shape phantoms."""
    dims = np.asarray(shape, dtype=np.float64)
    m_lo, m_hi = mask_extent
    idx = [np.arange(n, dtype=np.float32) for n in shape]
    grid = np.meshgrid(*idx, indexing="ij", sparse=True)
    mask = np.zeros(shape, dtype=bool)
    for _ in range(n_ellipsoids):
        semi = rng.uniform(m_lo, m_hi, size=3) * (dims - 1) / 2.0
        shift = rng.uniform(-0.05, 0.05, size=3) * dims
        center = (dims - 1) / 2.0 + shift
        rot = _random_rotation(rng)
        q = np.zeros(shape, dtype=np.float32)
        for axis in range(3):
            u = sum(np.float32(rot[j, axis]) * (grid[j] - np.float32(center[j])) for j in range(3))
            q = q + (u / np.float32(semi[axis])) ** 2
        mask |= q <= 1.0
    return mask


def make_ellipsoid_phantom(
    shape: tuple[int, int, int] = (64, 64, 64),
    *,
    n_sources: int | None = None,
    sigma: float = 0.1,
    size_range: tuple[float, float] = (2.0, 16.0),
    smoothing: float = 2.0,
    n_ellipsoids: int = 3,
    mask_extent: tuple[float, float] = (0.6, 0.85),
    seed: int | np.random.Generator | None = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Smooth ellipsoid sources in a random-ellipsoid brain mask: a head of another kind.

    ``n_sources`` random ellipsoids (default ``round(40 * V / 64^3)``, at least 2; semi-axes
    uniform in ``size_range`` voxels, random orientation, centres inside the mask's bounding
    box) each add a susceptibility drawn from ``N(0, sigma^2)`` (ppm, 0.1 by default); the sum is
    blurred by a Gaussian of ``smoothing`` voxels, cut by the support mask (as in
    :func:`make_phantom`) and its mean over the mask removed. Smooth, overlapping, zero-mean
    and weaker than the random shapes: networks trained on one kind are tested on the other.

    Parameters
    ----------
    shape : (int, int, int)
    n_sources : int, optional
    sigma : float
        SD (ppm) of each ellipsoid's susceptibility.
    size_range : (float, float)
        Semi-axes range (voxels).
    smoothing : float
        Gaussian blur (voxels).
    n_ellipsoids, mask_extent
        The support mask, as in :func:`make_phantom`.
    seed : int or numpy Generator

    Returns
    -------
    chi : ndarray float32, zero mean over the mask and zero outside it
    mask : ndarray bool
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or any(s < 4 for s in shape):
        raise ValueError(f"shape must be three integers >= 4, got {shape!r}")
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be > 0 (ppm), got {sigma}")
    lo_f, hi_f = (float(x) for x in size_range)
    if not (0 < lo_f <= hi_f):
        raise ValueError(f"size_range must satisfy 0 < low <= high (voxels), got {size_range!r}")
    rng = _rng(seed)
    n = max(2, int(round(40 * np.prod(shape) / 64**3))) if n_sources is None else int(n_sources)
    mask = _support_mask(shape, int(n_ellipsoids), tuple(float(v) for v in mask_extent), rng)
    coords = np.argwhere(mask)
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    centres = rng.uniform(lo, hi, size=(n, 3))
    semis = rng.uniform(lo_f, hi_f, size=(n, 3))
    values = rng.normal(0.0, sigma, size=n)
    rotations = [_random_rotation(rng) for _ in range(n)]
    chi = np.zeros(shape, dtype=np.float32)
    for centre, semi, value, rot in zip(centres, semis, values, rotations):
        b_lo, b_hi = _box_slices(centre, semi.max(), 1.0, shape)
        if np.any(b_hi <= b_lo):
            continue
        x, y, z = _local_coords(b_lo, b_hi, centre)
        q = sum(((np.float32(rot[0, a]) * x + np.float32(rot[1, a]) * y + np.float32(rot[2, a]) * z)
                 / np.float32(semi[a])) ** 2 for a in range(3))
        chi[b_lo[0]:b_hi[0], b_lo[1]:b_hi[1], b_lo[2]:b_hi[2]] += np.float32(value) * (q <= 1.0)
    if smoothing > 0:
        chi = ndimage.gaussian_filter(chi, sigma=float(smoothing))
    chi = np.where(mask, chi - chi[mask].mean(), 0.0).astype(np.float32)
    return chi, mask


def random_orientations(n: int, max_angle_deg: float = 30.0, seed=0, *, min_angle_deg: float | None = None) -> np.ndarray:
    """``n`` unit B0 directions: the first is ``(0, 0, 1)``, the others are random tilts.

    Each tilt is drawn uniformly (by area) on the spherical zone between ``min_angle_deg``
    (default ``max_angle_deg / 2``, so that every extra orientation adds information for
    COSMOS; 0 gives the whole spherical cap) and ``max_angle_deg`` from z: ``cos(theta)`` is
    uniform on ``[cos(max), cos(min)]``. The azimuths are spread evenly around z (plus a
    jitter of +-0.3 rad) so that the directions are diverse, as in head rotations of a
    multi-orientation (COSMOS) acquisition.

    Parameters
    ----------
    n : int
        Number of directions.
    max_angle_deg : float
        Largest tilt from z, in degrees (at most 90).
    seed : int or numpy Generator
    min_angle_deg : float, optional
        Smallest tilt of the extra directions (default ``max_angle_deg / 2``).

    Returns
    -------
    ndarray float64, (n, 3)
        Unit vectors.
    """
    if n < 1:
        raise ValueError(f"number of orientations must be >= 1, got {n}")
    if not (0 < max_angle_deg <= 90):
        raise ValueError(f"max_angle_deg must be in (0, 90], got {max_angle_deg}")
    min_angle = 0.5 * max_angle_deg if min_angle_deg is None else float(min_angle_deg)
    if not (0 <= min_angle <= max_angle_deg):
        raise ValueError(f"min_angle_deg must be in [0, max_angle_deg={max_angle_deg}], got {min_angle_deg}")
    rng = _rng(seed)
    cos_max, cos_min = np.cos(np.deg2rad(max_angle_deg)), np.cos(np.deg2rad(min_angle))
    dirs = [np.array([0.0, 0.0, 1.0])]
    for i in range(1, n):
        cos_t = rng.uniform(cos_max, cos_min)
        theta = np.arccos(cos_t)
        phi = 2 * np.pi * (i - 1) / max(n - 1, 1) + rng.uniform(-0.3, 0.3)
        dirs.append(np.array([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)]))
    return np.stack(dirs).astype(np.float64)


def make_background(
    mask: np.ndarray,
    *,
    skull_chi: float = -2.0,
    air_chi: float = 9.4,
    skull_thickness: float | None = None,
    scalp_thickness: float | None = None,
    n_sinuses: int = 2,
    seed: int | np.random.Generator | None = 0,
) -> np.ndarray:
    """Susceptibility (ppm, relative to brain tissue) of everything outside a brain mask.

    Voxels at distance ``d`` (voxels) from the brain: ``0 < d <= 1``: cerebrospinal fluid
    (0 ppm); ``1 < d <= 1 + skull_thickness``: skull (``skull_chi``); up to ``+
    scalp_thickness``: scalp (0 ppm); beyond: air (``air_chi``). ``n_sinuses`` air-filled
    ellipsoids (``air_chi``) sit below and in front of the brain centre, reaching into the head
    up to two voxels from the brain (a bony wall between them, as in a real head), like the
    frontal and sphenoid sinuses that make the strongest background fields of a real head.

    Parameters
    ----------
    mask : ndarray bool, (X, Y, Z)
        The brain mask (non-empty).
    skull_chi, air_chi : float
        Susceptibility of skull and air (ppm, relative to brain tissue).
    skull_thickness, scalp_thickness : float, optional
        In voxels; default 5 % and 3 % of the smallest grid side (at least one voxel).
    n_sinuses : int
        Air-filled pockets next to the brain.
    seed : int or numpy Generator

    Returns
    -------
    ndarray float32, the shape of ``mask``; zero inside the mask.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3 or not mask.any():
        raise ValueError(f"mask must be a non-empty 3-D boolean array, got shape {mask.shape}")
    if n_sinuses < 0:
        raise ValueError(f"n_sinuses must be >= 0, got {n_sinuses}")
    rng = _rng(seed)
    n_min = min(mask.shape)
    skull = max(1.0, 0.05 * n_min) if skull_thickness is None else float(skull_thickness)
    scalp = max(1.0, 0.03 * n_min) if scalp_thickness is None else float(scalp_thickness)
    if skull < 0 or scalp < 0:
        raise ValueError("skull_thickness and scalp_thickness must be >= 0 voxels")
    dist = ndimage.distance_transform_edt(~mask)
    chi = np.zeros(mask.shape, dtype=np.float32)
    chi[(dist > 1) & (dist <= 1 + skull)] = skull_chi
    chi[dist > 1 + skull + scalp] = air_chi
    coords = np.argwhere(mask)
    centre = coords.mean(axis=0)
    extent = coords.max(axis=0) - coords.min(axis=0) + 1
    idx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in mask.shape], indexing="ij", sparse=True)
    for _ in range(int(n_sinuses)):
        # below (-z) and in front (+y) of the centre, at the brain's edge
        direction = np.array([rng.uniform(-0.4, 0.4), rng.uniform(0.3, 0.9), -rng.uniform(0.5, 1.0)])
        direction /= np.linalg.norm(direction)
        semi = rng.uniform(0.08, 0.16, size=3) * extent
        c = centre + direction * 0.5 * extent
        q = sum(((idx[j] - np.float32(c[j])) / np.float32(semi[j])) ** 2 for j in range(3))
        chi[(q <= 1.0) & (dist > 2)] = air_chi
    chi[mask] = 0.0
    return chi
