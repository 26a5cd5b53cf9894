"""A set of synthetic QSM heads with their noisy fields: the recipe and the one set class.

:class:`QSMPhantomSpec` describes a set of phantoms (:mod:`qmri_labels.data.qsm.phantoms`) with
their noisy fields (one field per B0 orientation; several orientations make COSMOS labels
possible, see :func:`qmri_labels.fitting.qsm_inversion.cosmos`); ``field_kind`` chooses which
field the set holds: ``"local"`` (the default everywhere: the local field, zero outside the
mask), ``"total"`` (total field inside the mask, for background-field removal) or
``"local_unmasked"`` (the local field on the whole grid, as in Graf et al.; only by explicit
choice, never a default). :meth:`QSMPhantomSpec.generate` returns a :class:`QSMPhantomSet`.

:func:`generate_qsm` makes the sets of the named datasets (:mod:`qmri_labels.data.registry`):
phantoms at a base resolution, coarser resolutions by k-space truncation, and optionally
background-field removal. A :class:`QSMPhantomSet` holds either kind, with its fingerprint.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from qmri_labels.data.fingerprint import canonical_json, fingerprint
from qmri_labels.data.qsm.anatomical import make_anatomical_head
from qmri_labels.data.qsm.phantoms import make_background, make_ellipsoid_phantom, make_phantom, random_orientations
from qmri_labels.fileio import atomic_write_bytes, read_verified_npz
from qmri_labels.fitting.bfr import remove_background_per_orientation
from qmri_labels.physics.qsm import change_resolution, forward_field, normalize_direction

__all__ = ["FAMILIES", "FIELD_KINDS", "RECIPE_FIELDS", "QSMPhantomSpec", "QSMPhantomSet", "generate_qsm"]

#: the kinds of heads a spec can draw (:attr:`QSMPhantomSpec.family`): ``"random_shapes"`` (the
#: default: random spheres and boxes after Graf et al., :func:`make_phantom`), ``"anatomical"``
#: (:func:`~qmri_labels.data.qsm.anatomical.make_anatomical_head`: brain, nuclei, veins, skull,
#: sinuses, with region labels and a magnitude image) and ``"ellipsoids"`` (smooth zero-mean
#: ellipsoid sources, :func:`make_ellipsoid_phantom`)
FAMILIES = ("random_shapes", "anatomical", "ellipsoids")
#: spec fields that only the other families read; a random-shape spec at their defaults leaves
#: them out of its description, so that its fingerprint is the one recorded before they existed
_FAMILY_FIELDS = {"family": "random_shapes", "calcification": 0.5, "haemorrhage": 0.1}

#: what a phantom set's ``fields`` hold (:attr:`QSMPhantomSpec.field_kind`)
FIELD_KINDS = ("local", "total", "local_unmasked")

#: what a named dataset's recipe adds to the :class:`QSMPhantomSpec` fields (phantoms, fields
#: and noise at ``voxel_size``): ``truncate_to``, the voxel size after k-space truncation
#: (``None``: keep the phantom resolution), and ``bfr``, a background-field removal method of
#: :mod:`qmri_labels.fitting.bfr` applied (after any truncation) to a total field (``field_kind:
#: total``), which gives local fields on the method's eroded mask, as ``{"method": NAME,
#: option: value, ...}`` with every option written out, and ``resample_to``, a voxel size the local
#: fields, chi and the mask are k-space truncated to AFTER the background-field removal (BFR at
#: the phantom resolution, where the skull is a few voxels from the brain, and a network at a
#: coarser one; a recipe without it has no such key)
RECIPE_FIELDS = ("truncate_to", "bfr", "resample_to")


def _generator(seed) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


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
        Sinus-like air pockets per head (random shapes and ellipsoids; an anatomical head has
        its own frontal and sphenoid sinuses and mastoid cells).
    family : {"random_shapes", "anatomical", "ellipsoids"}
        Which heads (:data:`FAMILIES`). Anatomical heads are built in mm, so ``shape`` times
        ``voxel_size`` must hold a head (about 192 mm each way: 96^3 at 2 mm, 192^3 at 1 mm);
        they read ``seed``, the field options, ``skull_chi``, ``air_chi``, ``calcification`` and
        ``haemorrhage``, not the shape options. Ellipsoids read ``sigma_chi`` (0.1 gives the
        usual ~0.1 ppm sources), ``size_range``, ``mask_extent`` and ``smoothing`` (their blur
        is twice it).
    calcification, haemorrhage : float
        Anatomical heads: probability that a head has a calcification / a haemorrhage.
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
    family: str = "random_shapes"
    calcification: float = 0.5
    haemorrhage: float = 0.1

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
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
        if all(d[k] == v for k, v in _FAMILY_FIELDS.items()):
            for k in _FAMILY_FIELDS:
                del d[k]
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
        return canonical_json(self.to_dict())

    def generate(self) -> "QSMPhantomSet":
        """Draw the heads, their fields in every orientation, and the noise."""
        root = np.random.SeedSequence(int(self.seed))
        phantom_seq, orient_seq, noise_seq = root.spawn(3)
        orientations = random_orientations(int(self.n_orientations), self.max_angle_deg, seed=_generator(orient_seq))
        noise_rng = _generator(noise_seq)
        chis, masks, fields, labels, magnitudes = [], [], [], [], []
        for child in phantom_seq.spawn(int(self.n)):
            rng = _generator(child)
            if self.family == "anatomical":
                head = make_anatomical_head(self.shape, self.voxel_size, seed=rng, calcification=self.calcification,
                                            haemorrhage=self.haemorrhage, skull_chi=self.skull_chi,
                                            air_chi=self.air_chi)
                chi, mask = head.chi, head.mask
                labels.append(head.labels)
                magnitudes.append(head.magnitude)
                source = chi + head.background if self.field_kind == "total" else chi
            else:
                if self.family == "ellipsoids":
                    chi, mask = make_ellipsoid_phantom(self.shape, sigma=self.sigma_chi, size_range=self.size_range,
                                                       smoothing=2.0 * self.smoothing, mask_extent=self.mask_extent,
                                                       seed=rng)
                else:
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
            labels=np.stack(labels) if labels else None,
            magnitude=np.stack(magnitudes) if magnitudes else None,
        )


@dataclass
class QSMPhantomSet:
    """Phantoms (chi of the brain sources), brain masks and noisy fields.

    Attributes
    ----------
    spec : QSMPhantomSpec
        The phantoms at this set's grid and voxel size.
    chi : ndarray float32, (N, X, Y, Z)
        True susceptibility (ppm).
    mask : ndarray bool, (N, X, Y, Z)
    fields : ndarray float32, (N, K, X, Y, Z)
        Noisy fields (ppm) for each of the K orientations, of the kind ``spec.field_kind``
        (local by default; zero outside the mask unless ``"local_unmasked"``).
    orientations : ndarray float64, (K, 3)
        Unit B0 directions; the first is the reference orientation ``(0, 0, 1)``.
    fingerprint : str
        SHA-256 of the description and the arrays (computed when not given).
    bfr : dict or None
        The background-field removal that turned the TOTAL fields of ``spec`` (``field_kind
        "total"``) into these local fields, ``{"method": NAME, option: value, ...}`` with every
        option written out (:mod:`qmri_labels.fitting.bfr`); ``mask`` and ``chi`` are then
        restricted to the method's eroded mask. None (default): the fields are as ``spec``
        generates them. A network trained on the set records it as its input kind
        (``"bfr:<method>"``).
    recipe : dict or None
        For a named dataset's split (:func:`generate_qsm`): the recipe it was made from, the
        :class:`QSMPhantomSpec` fields at the phantom resolution plus :data:`RECIPE_FIELDS`.
        None for a set drawn by :meth:`QSMPhantomSpec.generate`.
    labels : ndarray uint8 (N, X, Y, Z) or None
        Region labels of anatomical heads (:data:`~qmri_labels.data.qsm.anatomical.LABELS`),
        for region-wise scoring; None for the other families.
    magnitude : ndarray float32 (N, X, Y, Z) or None
        Magnitude images of anatomical heads; None for the other families.
    """

    spec: QSMPhantomSpec
    chi: np.ndarray
    mask: np.ndarray
    fields: np.ndarray
    orientations: np.ndarray
    fingerprint: str = field(default="")
    bfr: dict | None = None
    recipe: dict | None = None
    labels: np.ndarray | None = None
    magnitude: np.ndarray | None = None

    def __post_init__(self):
        for name in ("labels", "magnitude"):
            extra = getattr(self, name)
            if extra is not None and extra.shape != self.chi.shape:
                raise ValueError(f"{name} shape {extra.shape} differs from chi shape {self.chi.shape}")
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
        if self.recipe is not None and self.recipe.get("bfr") != self.bfr:
            raise ValueError(f"the recipe's bfr {self.recipe.get('bfr')!r} differs from the set's {self.bfr!r}")
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
        """:func:`~qmri_labels.data.fingerprint.fingerprint` of the set's description and arrays.

        The description is the recipe of a named dataset's split, otherwise the spec followed
        by the ``bfr`` record when there is one: the two kinds of sets have been recorded
        (caches, manifests, trained bundles) with these descriptions since they were made.
        """
        if self.recipe is not None:
            header = canonical_json(self.recipe)
        else:
            header = self.spec.canonical_json() + ("" if self.bfr is None else canonical_json(self.bfr))
        arrays = [self.chi, self.mask, self.fields, self.orientations]
        arrays += [a for a in (self.labels, self.magnitude) if a is not None]
        return fingerprint(header, arrays)

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
            recipe=np.array(json.dumps(self.recipe, sort_keys=True)),
            fingerprint=np.array(self.fingerprint),
            **{k: v for k, v in (("labels", self.labels), ("magnitude", self.magnitude)) if v is not None},
        )
        atomic_write_bytes(path, buf.getvalue())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "QSMPhantomSet":
        """Read a set written by :meth:`save`; ValueError if its fingerprint does not match."""
        def build(z):
            spec = QSMPhantomSpec.from_dict(json.loads(str(z["spec"])))
            # files written before bfr or recipe were recorded lack them
            bfr = json.loads(str(z["bfr"])) if "bfr" in z.files else None
            recipe = json.loads(str(z["recipe"])) if "recipe" in z.files else None
            extras = {k: z[k] for k in ("labels", "magnitude") if k in z.files}
            return cls(spec=spec, chi=z["chi"], mask=z["mask"], fields=z["fields"], orientations=z["orientations"],
                       bfr=bfr, recipe=recipe, **extras)

        return read_verified_npz(path, build, "QSM phantom set")


def generate_qsm(recipe: dict) -> QSMPhantomSet:
    """Generate a named dataset's QSM split: phantoms and noisy fields at ``voxel_size``, then
    k-space truncation, then background-field removal, then (``resample_to``) truncation of its
    local fields.

    The phantoms, their fields (every orientation) and the noise are drawn by
    :meth:`QSMPhantomSpec.generate` at the phantom resolution; the fields are masked (local by
    default). With ``truncate_to`` set, chi, the fields and the mask (thresholded at 0.5) are
    coarsened by k-space truncation (:func:`qmri_labels.physics.qsm.change_resolution`), as Oh
    et al. (2021) made their 1x1x3 mm data from 1x1x1 mm acquisitions, and chi and the fields
    are masked again by the coarse mask: the two resolutions of one seed hold the same objects
    with the same masking, and differ only in resolution. With ``bfr`` set (a total field), the
    background is removed by that method at the final resolution; fields and chi are then
    restricted to the method's eroded mask, which becomes the set's mask.

    Parameters
    ----------
    recipe : dict
        The :class:`QSMPhantomSpec` fields plus :data:`RECIPE_FIELDS` (as the registry
        resolves them).

    Returns
    -------
    QSMPhantomSet
        Its spec describes the phantoms at the final grid and voxel size; its ``recipe`` is
        ``recipe``.
    """
    spec = dict(recipe)
    truncate_to = spec.pop("truncate_to", None)
    bfr = spec.pop("bfr", None)
    resample_to = spec.pop("resample_to", None)
    base = QSMPhantomSpec.from_dict(spec).generate()
    chi, mask, fields, labels, magnitude = base.chi, base.mask, base.fields, base.labels, base.magnitude
    voxel_size = spec.get("voxel_size", [1.0, 1.0, 1.0])
    masked = base.spec.field_kind != "local_unmasked"
    if truncate_to is not None:
        chi, mask, fields, magnitude = _coarsen(chi, mask, fields, magnitude, voxel_size, truncate_to, masked)
        labels = None  # a label map has no k-space truncation
        voxel_size = truncate_to
    if bfr is not None:
        # the one place where data generation calls a fitting step (architecture.md says so)
        options = {k: v for k, v in bfr.items() if k != "method"}
        fields, mask = remove_background_per_orientation(bfr["method"], fields, mask, voxel_size, base.orientations,
                                                         **options)
        chi = chi * mask
    if resample_to is not None:
        chi, mask, fields, magnitude = _coarsen(chi, mask, fields, magnitude, voxel_size, resample_to, masked)
        labels = None
        voxel_size = resample_to
    chi = np.ascontiguousarray(chi, dtype=np.float32)
    final = base.spec.replace(shape=tuple(chi.shape[1:]), voxel_size=tuple(voxel_size))
    return QSMPhantomSet(spec=final, chi=chi, mask=np.ascontiguousarray(mask, dtype=bool),
                         fields=np.ascontiguousarray(fields, dtype=np.float32),
                         orientations=np.asarray(base.orientations, dtype=np.float64), bfr=bfr,
                         recipe={**spec, "truncate_to": truncate_to, "bfr": bfr,
                                 **({} if resample_to is None else {"resample_to": resample_to})},
                         labels=labels, magnitude=magnitude)


def _coarsen(chi, mask, fields, magnitude, voxel_size, target, masked: bool):
    """chi, mask (thresholded at 0.5), fields and magnitude k-space truncated to ``target``; chi
    and (unless ``masked`` is false) the fields masked again by the coarse mask."""
    mask = change_resolution(mask.astype(np.float64), voxel_size, target) > 0.5
    chi = change_resolution(chi.astype(np.float64), voxel_size, target) * mask
    fields = change_resolution(fields.astype(np.float64), voxel_size, target)
    if masked:
        fields = fields * mask[:, None]
    if magnitude is not None:
        magnitude = change_resolution(magnitude.astype(np.float64), voxel_size, target).astype(np.float32)
    return chi, mask, fields, magnitude
