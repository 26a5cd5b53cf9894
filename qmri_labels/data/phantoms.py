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

:class:`QSMPhantomSpec` describes a set of phantoms with their noisy fields (one field per B0
orientation; several orientations make COSMOS labels possible, see
:func:`qmri_labels.fitting.qsm_inversion.cosmos`); ``field_kind`` chooses which field the set holds:
``"local"`` (the default everywhere: the local field, zero outside the mask), ``"total"``
(total field inside the mask, for background-field removal) or ``"local_unmasked"`` (the local
field on the whole grid, as in Graf et al.; only by explicit choice, never a default).
:meth:`QSMPhantomSpec.generate` returns a :class:`QSMPhantomSet` with a SHA-256 fingerprint.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import erf, erfc

from qmri_labels.fileio import atomic_write_bytes, read_verified_npz
from qmri_labels.physics.qsm import forward_field, normalize_direction

__all__ = [
    "FIELD_KINDS",
    "make_phantom",
    "make_background",
    "random_orientations",
    "QSMPhantomSpec",
    "QSMPhantomSet",
]


#: what a phantom set's ``fields`` hold (:attr:`QSMPhantomSpec.field_kind`)
FIELD_KINDS = ("local", "total", "local_unmasked")


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

    # support mask: union of random ellipsoids around the centre
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
    chi *= mask
    return chi, mask


def random_orientations(n: int, max_angle_deg: float = 30.0, seed=0, *, min_angle_deg: float | None = None) -> np.ndarray:
    """``n`` unit B0 directions: the first is ``(0, 0, 1)``, the others are random tilts.

    Each tilt is drawn uniformly (by area) on the spherical zone between ``min_angle_deg``
    (default ``max_angle_deg / 2``, so that every extra orientation adds information for
    COSMOS; 0 gives the whole spherical cap) and ``max_angle_deg`` from z: ``cos(theta)`` is
    uniform on ``[cos(max), cos(min)]``. The azimuths are spread evenly around z (plus a
    jitter of +-0.3 rad) so that the directions are diverse, as in head rotations of a
    multi-orientation (COSMOS) acquisition.
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
    up to two voxels from the brain (a bony wall between them, as in a real head), like the frontal and sphenoid sinuses that make the strongest
    background fields of a real head. Thicknesses default to 5 % and 3 % of the smallest grid
    side (at least one voxel).

    Returns
    -------
    ndarray float32, the shape of ``mask``; zero inside the mask.
    """
    from scipy import ndimage

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


@dataclass(frozen=True)
class QSMPhantomSpec:
    """Recipe of a set of synthetic QSM head phantoms with noisy fields.

    Attributes
    ----------
    shape : (int, int, int)
        Grid of each phantom.
    n : int
        Number of phantoms.
    seed : int
        Seed of everything random (phantoms, orientations, noise).
    sigma_chi : float
        Standard deviation of the shape susceptibilities (ppm).
    noise_sigma : float
        Standard deviation of the Gaussian noise added to each field (ppm): inside the mask
        for ``field_kind="local"`` and ``"total"`` (outside it the field is zero), on the whole
        grid for ``"local_unmasked"``.
    n_orientations : int
        Number of B0 orientations (1: no COSMOS label possible).
    max_angle_deg : float
        Largest tilt of the extra orientations from z.
    voxel_size : (float, float, float)
        In mm.
    smoothing : float
        Edge blur of the shapes (voxels).
    size_range : (float, float)
        Sphere radius and box half-sides (voxels).
    n_spheres, n_boxes : int or None
        Shapes per phantom (None: the default of :func:`make_phantom`).
    pad : int
        Zero padding per side when computing the fields. The default 0 is Graf et al.'s
        setting: the field is the circular k-space convolution on the grid (the zero border
        around the support keeps wrap-around small), which is exactly the forward model that
        the inversions and the self-supervised loss use.
    field_kind : {"local", "total", "local_unmasked"}
        Which field the set holds (see the module docstring). ``"local"`` (default) is the
        local field of the brain sources, zero outside the mask; ``"total"`` adds the
        background field of skull, air and sinuses (zero outside the mask too, for
        background-field removal); ``"local_unmasked"`` is the local field on the whole grid
        (Graf et al.'s setting; a network trained on it has seen field outside the mask that
        no real local field map has).
    mask_extent : (float, float)
        Range of the brain ellipsoids' semi-axes as a fraction of half the grid (leaves room
        for skull, scalp and air).
    skull_chi, air_chi : float
        Background susceptibilities (ppm relative to brain tissue) of :func:`make_background`.
    n_sinuses : int
        Sinus-like air pockets per head.
    """

    shape: tuple[int, int, int] = (64, 64, 64)
    n: int = 8
    seed: int = 0
    sigma_chi: float = 0.25
    noise_sigma: float = 0.005
    n_orientations: int = 1
    max_angle_deg: float = 30.0
    voxel_size: tuple[float, float, float] = (1.0, 1.0, 1.0)
    smoothing: float = 1.0
    size_range: tuple[float, float] = (2.0, 16.0)
    n_spheres: int | None = None
    n_boxes: int | None = None
    pad: int = 0
    field_kind: str = "local"
    mask_extent: tuple[float, float] = (0.5, 0.7)
    skull_chi: float = -2.0
    air_chi: float = 9.4
    n_sinuses: int = 2

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "voxel_size", tuple(float(v) for v in self.voxel_size))
        object.__setattr__(self, "size_range", tuple(float(v) for v in self.size_range))
        object.__setattr__(self, "mask_extent", tuple(float(v) for v in self.mask_extent))
        if self.field_kind not in FIELD_KINDS:
            raise ValueError(f"field_kind must be one of {FIELD_KINDS}, got {self.field_kind!r}")
        if int(self.n_sinuses) < 0:
            raise ValueError(f"n_sinuses must be >= 0, got {self.n_sinuses}")
        if len(self.shape) != 3 or any(s < 4 for s in self.shape):
            raise ValueError(f"shape must be three integers >= 4, got {self.shape!r}")
        if int(self.n) < 1:
            raise ValueError(f"n (number of phantoms) must be >= 1, got {self.n}")
        if self.noise_sigma < 0:
            raise ValueError(f"noise_sigma must be >= 0 (ppm), got {self.noise_sigma}")
        if int(self.n_orientations) < 1:
            raise ValueError(f"n_orientations must be >= 1, got {self.n_orientations}")
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0, got {self.pad}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["voxel_size"] = list(self.voxel_size)
        d["size_range"] = list(self.size_range)
        d["mask_extent"] = list(self.mask_extent)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QSMPhantomSpec":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown QSMPhantomSpec fields: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> "QSMPhantomSpec":
        return replace(self, **changes)

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def generate(self) -> "QSMPhantomSet":
        """Draw the heads, their fields in every orientation, and the noise."""
        root = np.random.SeedSequence(int(self.seed))
        phantom_seq, orient_seq, noise_seq = root.spawn(3)
        orientations = random_orientations(int(self.n_orientations), self.max_angle_deg, seed=_rng(orient_seq))
        noise_rng = _rng(noise_seq)
        chis, masks, fields = [], [], []
        for child in phantom_seq.spawn(int(self.n)):
            rng = _rng(child)
            chi, mask = make_phantom(
                self.shape,
                n_spheres=self.n_spheres,
                n_boxes=self.n_boxes,
                sigma=self.sigma_chi,
                size_range=self.size_range,
                smoothing=self.smoothing,
                mask_extent=self.mask_extent,
                seed=rng,
            )
            source = chi
            if self.field_kind == "total":
                source = chi + make_background(mask, skull_chi=self.skull_chi, air_chi=self.air_chi,
                                               n_sinuses=int(self.n_sinuses), seed=rng)
            per_orient = np.stack(
                [forward_field(source, self.voxel_size, d, pad=self.pad) for d in orientations]
            ).astype(np.float32)
            if self.noise_sigma > 0:
                noise = noise_rng.normal(0.0, self.noise_sigma, size=per_orient.shape).astype(np.float32)
                per_orient = per_orient + noise
            if self.field_kind != "local_unmasked":
                per_orient *= mask
            chis.append(chi)
            masks.append(mask)
            fields.append(per_orient)
        return QSMPhantomSet(
            spec=self,
            chi=np.stack(chis),
            mask=np.stack(masks),
            fields=np.stack(fields),
            orientations=orientations,
        )


@dataclass
class QSMPhantomSet:
    """Phantoms (chi of the brain sources), brain masks and noisy fields.

    Attributes
    ----------
    spec : QSMPhantomSpec
    chi : ndarray float32, (N, X, Y, Z)
        True susceptibility (ppm).
    mask : ndarray bool, (N, X, Y, Z)
    fields : ndarray float32, (N, K, X, Y, Z)
        Noisy fields (ppm) for each of the K orientations, of the kind ``spec.field_kind``
        (local by default; zero outside the mask unless ``"local_unmasked"``).
    orientations : ndarray float64, (K, 3)
        Unit B0 directions; the first is the reference orientation ``(0, 0, 1)``.
    bfr : dict or None
        The background-field removal that turned the TOTAL fields of ``spec`` (``field_kind
        "total"``) into these local fields, ``{"method": NAME, option: value, ...}`` with every
        option written out (:mod:`qmri_labels.fitting.bfr`); ``mask`` and ``chi`` are then
        restricted to the method's eroded mask. None (default): the fields are as ``spec``
        generates them. A network trained on the set records it as its input kind
        (``"bfr:<method>"``).
    """

    spec: QSMPhantomSpec
    chi: np.ndarray
    mask: np.ndarray
    fields: np.ndarray
    orientations: np.ndarray
    fingerprint: str = field(default="")
    bfr: dict | None = None

    def __post_init__(self):
        if self.chi.ndim != 4:
            raise ValueError(f"chi must be (N, X, Y, Z), got shape {self.chi.shape}")
        if self.mask.shape != self.chi.shape:
            raise ValueError(f"mask shape {self.mask.shape} differs from chi shape {self.chi.shape}")
        if self.fields.ndim != 5 or self.fields.shape[:1] + self.fields.shape[2:] != self.chi.shape:
            raise ValueError(f"fields must be (N, K, X, Y, Z) matching chi, got {self.fields.shape}")
        if self.orientations.shape != (self.fields.shape[1], 3):
            raise ValueError("orientations must be (K, 3) with K the number of field orientations")
        for d in self.orientations:
            normalize_direction(d)
        if self.bfr is not None:
            if not isinstance(self.bfr, dict) or not isinstance(self.bfr.get("method"), str):
                raise ValueError(f"bfr must be None or a dict with a 'method' name, got {self.bfr!r}")
            if self.spec.field_kind != "total":
                raise ValueError(f"bfr {self.bfr['method']!r} removes the background of a total field, but the "
                                 f"spec's field_kind is {self.spec.field_kind!r}")
        if not self.fingerprint:
            self.fingerprint = self.compute_fingerprint()

    @property
    def field(self) -> np.ndarray:
        """Noisy field (N, X, Y, Z) at the reference orientation (B0 along z)."""
        return self.fields[:, 0]

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        return self.spec.voxel_size

    def __len__(self) -> int:
        return self.chi.shape[0]

    def spec_record(self) -> dict[str, Any]:
        """The spec as a dict, with ``bfr`` added when set: what a manifest records of the set."""
        record = self.spec.to_dict()
        if self.bfr is not None:
            record["bfr"] = dict(self.bfr)
        return record

    def compute_fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.spec.canonical_json().encode())
        if self.bfr is not None:  # (sets without it keep the fingerprints they always had)
            h.update(json.dumps(self.bfr, sort_keys=True, separators=(",", ":")).encode())
        for a in (self.chi, self.mask, self.fields, self.orientations):
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write one ``.npz`` (atomically) holding the arrays, the spec and the fingerprint."""
        path = Path(path)
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            chi=self.chi,
            mask=self.mask,
            fields=self.fields,
            orientations=self.orientations,
            spec=np.array(self.spec.canonical_json()),
            bfr=np.array(json.dumps(self.bfr)),
            fingerprint=np.array(self.fingerprint),
        )
        atomic_write_bytes(path, buf.getvalue())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "QSMPhantomSet":
        """Read a set written by :meth:`save`; ValueError if its fingerprint does not match."""
        def build(z):
            spec = QSMPhantomSpec.from_dict(json.loads(str(z["spec"])))
            bfr = json.loads(str(z["bfr"])) if "bfr" in z.files else None  # files written before it was recorded
            return cls(spec=spec, chi=z["chi"], mask=z["mask"], fields=z["fields"], orientations=z["orientations"],
                       bfr=bfr)

        return read_verified_npz(path, build, "QSM phantom set")
