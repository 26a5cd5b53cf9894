"""Anatomical head phantoms for QSM: procedural, seeded, one distinct head per seed.

A head is built in millimetres, so the same seed gives the same anatomy at any voxel size (1 mm
for realism, 2 mm for quick runs; the grid is ``shape`` voxels of ``voxel_size`` mm). It holds:

* a brain (cerebrum ~140 mm across left-right and ~160 mm front-back, a flattened base with
  lower temporal lobes, a cerebellum, a brainstem), with a cortex of grey matter 2.5-3.5 mm
  thick folded into sulci (some filled with CSF), white matter (negative chi), a thin CSF
  layer at the surface, the interhemispheric fissure, lateral, third and fourth ventricles;
* deep grey-matter nuclei on both sides: caudate, putamen, globus pallidus, thalamus, red
  nucleus, substantia nigra, dentate nucleus;
* veins: the superior sagittal, straight and transverse sinuses, the internal cerebral veins
  and a few cortical veins;
* optionally a calcification (a small strongly diamagnetic sphere) and a haemorrhage;
* outside the brain (:attr:`AnatomicalHead.background`): a CSF/meningeal gap of 2-3.5 mm, the skull, the
  scalp, air, and air-filled frontal and sphenoid sinuses and mastoid cells a few mm from the
  brain (never touching it), with smooth (Gaussian, 1 mm) transitions.

Susceptibilities (ppm, relative to CSF before the brain's mean is removed) are drawn per head
around published in-vivo values: white matter -0.03 and cortical grey matter +0.02 as in the
QSM reconstruction challenge 2.0 head phantom (Marques et al., MRM 86:526, 2021; the tissue
table of its Python port qsm-forward); deep grey matter after the in-vivo atlas and region
values of Deistung et al. (NeuroImage 65:299, 2013) and Lim et al. (NeuroImage 82:449, 2013),
roughly caudate 0.06, putamen 0.05, globus pallidus 0.16, thalamus 0.015, red nucleus 0.11,
substantia nigra 0.14, dentate 0.11; venous blood ~0.35 (deoxyhaemoglobin at ~60-65 %
oxygenation, haematocrit 0.4); calcifications -0.3 and haemorrhages +0.8 (in-vivo
reports range -0.1 to -0.5 and +0.3 to +1.5). The values in :data:`CHI_PPM` are (mean, SD)
of the draw; deep grey matter also shares a per-head iron factor (0.8-1.25), as iron grows with
age. Skull -2.1 and air +9.2 relative to tissue, as in the challenge phantom. The values are
approximate literature figures, not one study's table.

Per head, everything else varies too: the head's size (per axis), orientation (pitch up to
10 degrees, roll and yaw up to 5) and position (up to 5 mm; 3 front-back), each structure's position (1-3
mm), size (+-15 %) and tilt, ventricle size (x 0.7-1.6), cortical folding, skull thickness,
sinus size and distance from the brain, and a smooth texture (0.01 ppm) on top of the region
values; so every seed gives another head. The brain's chi has zero mean over the brain mask
(the mean of chi is not observable from a field).

Region labels (:attr:`AnatomicalHead.labels`) follow the segmentation of the QSM challenge
head phantom that the QSM-CI scorer reads (:data:`LABELS`: 1-6 the deep grey-matter nuclei
whose means give the linearity, 7 thalamus, 8 white matter, 9 grey matter, 10 CSF, 11 blood,
13 bone, 14 air, 15 scalp, 16 calcification), plus 17 haemorrhage. The magnitude image is a
gradient-echo magnitude (proton density times T2* decay: low in iron-rich nuclei, veins,
calcifications and bone) under a smooth receive-coil sensitivity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["AnatomicalHead", "CHI_PPM", "LABELS", "DEEP_GREY_LABELS", "make_anatomical_head"]

#: region label -> name (the QSM challenge / QSM-CI segmentation, plus 17)
LABELS: dict[int, str] = {
    1: "caudate", 2: "globus pallidus", 3: "putamen", 4: "red nucleus", 5: "dentate nucleus",
    6: "substantia nigra", 7: "thalamus", 8: "white matter", 9: "grey matter", 10: "CSF", 11: "blood",
    13: "bone", 14: "air", 15: "scalp", 16: "calcification", 17: "haemorrhage",
}
#: the deep grey-matter nuclei whose region means give the challenge's linearity
DEEP_GREY_LABELS = (1, 2, 3, 4, 5, 6)

#: label -> (mean, SD) of the per-head susceptibility draw, ppm relative to CSF (see the module
#: docstring for the sources)
CHI_PPM: dict[int, tuple[float, float]] = {
    1: (0.06, 0.012), 2: (0.16, 0.025), 3: (0.05, 0.012), 4: (0.11, 0.02), 5: (0.11, 0.02), 6: (0.14, 0.025),
    7: (0.015, 0.006), 8: (-0.03, 0.005), 9: (0.02, 0.004), 10: (0.0, 0.0), 11: (0.35, 0.04),
    16: (-0.3, 0.08), 17: (0.8, 0.2),
}
_SKULL_CHI, _AIR_CHI = -2.1, 9.2
#: label -> relative magnitude (proton density x T2* decay at a TE of ~20 ms)
_MAGNITUDE = {1: 0.72, 2: 0.45, 3: 0.66, 4: 0.5, 5: 0.55, 6: 0.5, 7: 0.74, 8: 0.7, 9: 0.86, 10: 1.0, 11: 0.25,
              13: 0.05, 14: 0.0, 15: 0.6, 16: 0.15, 17: 0.2}


@dataclass(frozen=True)
class AnatomicalHead:
    """One anatomical head.

    Attributes
    ----------
    chi : ndarray float32, (X, Y, Z)
        Susceptibility of the brain (ppm), zero mean over ``mask``, zero outside it.
    background : ndarray float32, (X, Y, Z)
        Susceptibility outside the brain (ppm relative to brain tissue: skull, scalp, air,
        sinuses), zero inside ``mask``; ``chi + background`` makes the total field.
    mask : ndarray bool
        The brain mask.
    labels : ndarray uint8
        Region labels (:data:`LABELS`; 0 nowhere, every voxel has a label).
    magnitude : ndarray float32
        Gradient-echo magnitude (arbitrary units, ~1 in CSF).
    voxel_size : (float, float, float)
        mm.
    """

    chi: np.ndarray
    background: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    magnitude: np.ndarray
    voxel_size: tuple[float, float, float]


def _rotation(angles_deg) -> np.ndarray:
    """Rotation about x (pitch), then y (roll), then z (yaw)."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


class _Canvas:
    """Head-centred coordinates (mm, x left-right, y back-front, z foot-head) of every voxel,
    after the head's random size, orientation and position; shapes are tested in them."""

    def __init__(self, shape, voxel_size, scale, rotation, shift):
        axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * np.float32(v) for n, v in zip(shape, voxel_size)]
        grid = np.meshgrid(*axes, indexing="ij", sparse=True)
        inv = rotation.T  # world -> head frame
        self.u = [sum(np.float32(inv[i, j]) * (grid[j] - np.float32(shift[j])) for j in range(3)) / np.float32(scale[i])
                  for i in range(3)]
        self.shape = tuple(shape)

    def ellipsoid(self, centre, semi, tilt_deg=(0.0, 0.0, 0.0)):
        """Normalised radius ``q`` (< 1 inside) of an ellipsoid in the head frame."""
        rot = _rotation(tilt_deg).T
        q = np.zeros(self.shape, np.float32)
        d = [self.u[j] - np.float32(centre[j]) for j in range(3)]
        for i in range(3):
            v = d[0] * np.float32(rot[i, 0]) + d[1] * np.float32(rot[i, 1]) + d[2] * np.float32(rot[i, 2])
            q += (v / np.float32(semi[i])) ** 2
        return np.sqrt(q)

    def segment_distance(self, a, b):
        """Distance (mm, head frame) of every voxel from the segment a-b."""
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        ab = b - a
        d = [self.u[j] - a[j] for j in range(3)]
        t = np.clip(sum(d[j] * ab[j] for j in range(3)) / np.float32(ab @ ab), 0.0, 1.0)
        return np.sqrt(sum((d[j] - t * ab[j]) ** 2 for j in range(3)))


def make_anatomical_head(
    shape: tuple[int, int, int] | None = None,
    voxel_size: float | tuple[float, float, float] = 2.0,
    *,
    seed: int | np.random.Generator | None = 0,
    calcification: float = 0.5,
    haemorrhage: float = 0.1,
    skull_chi: float = _SKULL_CHI,
    air_chi: float = _AIR_CHI,
) -> AnatomicalHead:
    """One anatomical head phantom (see the module docstring).

    Parameters
    ----------
    shape : (int, int, int), optional
        Grid in voxels; default a 192 mm cube (96^3 at 2 mm, 192^3 at 1 mm). The brain must fit
        with a margin: ValueError otherwise.
    voxel_size : float or (float, float, float)
        mm (default 2).
    seed : int or numpy Generator
    calcification, haemorrhage : float
        Probability that the head has one (0: never, 1: always).
    skull_chi, air_chi : float
        Susceptibility of bone and air relative to brain tissue (ppm).

    Returns
    -------
    AnatomicalHead
    """
    vox = np.broadcast_to(np.asarray(voxel_size, dtype=np.float64), (3,)).copy()
    if not np.all(np.isfinite(vox) & (vox > 0)):
        raise ValueError(f"voxel_size must be > 0 mm, got {voxel_size!r}")
    if shape is None:
        shape = tuple(int(round(192.0 / v)) for v in vox)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or any(s < 8 for s in shape):
        raise ValueError(f"shape must be three integers >= 8, got {shape!r}")
    for name, p in (("calcification", calcification), ("haemorrhage", haemorrhage)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} is a probability in [0, 1], got {p}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.Generator(np.random.PCG64(seed))
    u01 = rng.uniform

    # Every random number is drawn here, in a fixed order, before anything is painted.
    size = u01(0.97, 1.05) * u01(0.98, 1.02, size=3)
    angles = (u01(-10, 10), u01(-5, 5), u01(-5, 5))
    shift = (u01(-5, 5), u01(-3, 3), u01(-5, 5) + 8.0)  # the brain sits above the grid centre
    semi_brain = np.array([75.0, 80.0, 60.0])
    bumps = [(rng.normal(0, 1, 3) / 90.0, u01(0, 2 * np.pi), u01(0.005, 0.015)) for _ in range(4)]
    folds = [(rng.normal(0, 1, 3), u01(0, 2 * np.pi)) for _ in range(3)]
    fold_wavelength = u01(22.0, 30.0)
    cortex = u01(2.5, 3.5)
    ventricle_scale = u01(0.7, 1.6)
    iron = u01(0.8, 1.25)
    values = {k: rng.normal(m, s) for k, (m, s) in CHI_PPM.items()}

    def jitter(centre, semi, shift_mm=2.0, tilt=8.0):
        return (np.asarray(centre) + rng.normal(0, shift_mm / 2, 3), np.asarray(semi) * u01(0.85, 1.15, 3),
                tuple(rng.normal(0, tilt / 2, 3)))

    nuclei = []  # (label, centre, semi, tilt) for both sides
    for label, centre, semi, tilt in (
        (1, (12, 14, 10), (5, 11, 8), (0, 0, 10)), (3, (24, 3, 1), (5, 15, 10), (0, 0, 5)),
        (2, (18, 0, -1), (3.5, 9, 6), (0, 0, 5)), (7, (9, -15, 4), (8, 14, 9), (0, 0, 5)),
        (4, (4.5, -14, -10), (3, 3.5, 3.5), (0, 0, 0)), (6, (9, -11, -15), (3, 8, 2.5), (-20, 0, 25)),
        (5, (14, -56, -33), (5, 8, 5), (0, 0, 20)),
    ):
        for side in (-1, 1):
            c, s, t = jitter((side * centre[0], centre[1], centre[2]), semi)
            nuclei.append((label, c, s, (t[0] + tilt[0], t[1], t[2] + side * tilt[2])))
    ventricles = []
    for centre, semi, tilt in (((9, -2, 15), (5, 24, 5), (5, 0, 8)), ((10, 20, 9), (4, 9, 7), (0, 0, 10)),
                               ((16, -28, 7), (5, 10, 6), (0, 0, -20)), ((28, -8, -18), (3, 12, 4), (10, 0, -5))):
        for side in (-1, 1):
            c, s, t = jitter((side * centre[0], centre[1], centre[2]), semi, 1.0, 4.0)
            ventricles.append((c, s * np.array([ventricle_scale, 1.0, ventricle_scale]),
                               (t[0] + tilt[0], t[1], t[2] + side * tilt[2])))
    for centre, semi in (((0, -8, -2), (1.5, 12, 7)), ((0, -40, -30), (5, 4, 6))):
        c, s, t = jitter(centre, semi, 1.0, 4.0)
        ventricles.append((c, s * np.array([ventricle_scale, 1.0, 1.0]), t))
    cerebellum = jitter((0, -50, -36), (48, 26, 21), 2.0, 4.0)
    brainstem = jitter((0, -18, -46), (12, 13, 30), 1.5, 4.0)
    sinus_radius = u01(3.0, 4.0)
    cortical_veins = [(rng.normal(0, 1, 3), rng.normal(0, 1, 3), u01(20, 40), u01(0.8, 1.4))
                      for _ in range(int(rng.integers(4, 9)))]
    has_calc, has_haem = u01() < calcification, u01() < haemorrhage
    calc_at = (u01(-30, 30), u01(-20, 30), u01(-5, 25), u01(1.5, 3.0))
    haem_at = (u01(-45, 45), u01(-40, 40), u01(0, 35), u01(4.0, 8.0))
    csf_gap, skull, scalp = u01(2.0, 3.5), u01(5.0, 8.0), u01(4.0, 7.0)
    sinus_gap = u01(3.0, 6.0)
    air_cells = [jitter(c, s, 3.0, 8.0) for c, s in (((0, 88, -22), (14, 7, 11)), ((0, 20, -68), (12, 12, 9)),
                                                      ((-50, -30, -45), (9, 11, 11)), ((50, -30, -45), (9, 11, 11)))]
    air_cell_size = u01(0.8, 1.2, size=len(air_cells))
    texture_seed = int(rng.integers(2**31))
    coil = rng.normal(0, 1, 6)

    canvas = _Canvas(shape, vox, size, _rotation(angles), shift)
    x, y, z = canvas.u
    labels = np.zeros(shape, np.uint8)

    # cerebrum: a bumpy ellipsoid cut by a base that is lowest under the temporal lobes
    q = canvas.ellipsoid((0, 0, 0), semi_brain)
    for k, phase, amp in bumps:
        q -= np.float32(amp) * np.cos(np.float32(k[0]) * x + np.float32(k[1]) * y + np.float32(k[2]) * z + np.float32(phase))
    floor = -semi_brain[2] * (0.3 + 0.25 * np.minimum((x / semi_brain[0]) ** 2 * 4.0, 1.0))
    cerebrum = (q < 1.0) & (z > floor)
    # depth below the surface (mm): distance to the ellipsoid, or to the base
    grad = np.sqrt((x / semi_brain[0] ** 2) ** 2 + (y / semi_brain[1] ** 2) ** 2 + (z / semi_brain[2] ** 2) ** 2)
    depth = np.minimum((1.0 - q) * q / np.maximum(grad, 1e-6), z - floor)
    del grad
    cb_q = canvas.ellipsoid(*cerebellum)
    bs_q = canvas.ellipsoid(*brainstem)
    brain = cerebrum | (cb_q < 1.0) | (bs_q < 1.0)
    if brain[0].any() or brain[-1].any() or brain[:, 0].any() or brain[:, -1].any() or brain[:, :, 0].any() \
            or brain[:, :, -1].any():
        raise ValueError(f"the brain does not fit in a grid of {shape} voxels of {vox.tolist()} mm "
                         "(it needs about 192 mm each way)")

    # cortex folded along the zero set of a sum of plane waves
    fold = sum(np.cos((np.float32(k[0]) * x + np.float32(k[1]) * y + np.float32(k[2]) * z)
                      * np.float32(2 * np.pi / (fold_wavelength * np.linalg.norm(k))) + np.float32(p)) for k, p in folds)
    fold = fold / np.float32(3.0)
    labels[brain] = 8
    labels[cerebrum & ((depth < cortex) | ((np.abs(fold) < 0.3) & (depth < 14.0)))] = 9
    labels[(cb_q < 1.0) & ~cerebrum & (cb_q > 0.55)] = 9  # cerebellar cortex around a white core
    csf = cerebrum & ((depth < 1.0) | ((np.abs(fold) < 0.07) & (depth < 12.0)))
    fissure = cerebrum & (np.abs(x) < np.float32(max(1.0, 0.5 * vox[0]))) & ((z > 12.0) | (np.abs(y) > 45.0))
    labels[csf | fissure] = 10
    del fold, depth
    for label, c, s, t in nuclei:
        labels[(canvas.ellipsoid(c, s, t) < 1.0) & brain] = label
    for c, s, t in ventricles:
        labels[(canvas.ellipsoid(c, s, t) < 1.0) & brain] = 10

    # veins: sinuses along the inside of the skull, straight sinus, internal cerebral veins,
    # cortical veins under the surface
    r_in = semi_brain - sinus_radius - 1.5
    arc = np.sqrt((y / np.float32(r_in[1])) ** 2 + (z / np.float32(r_in[2])) ** 2)
    sss = (np.sqrt(x**2 + ((arc - 1.0) * np.float32(0.5 * (r_in[1] + r_in[2]))) ** 2) < sinus_radius) & (z > -10)
    ring = np.sqrt((x / np.float32(r_in[0] * 0.75)) ** 2 + (y / np.float32(r_in[1])) ** 2)
    transverse = (np.sqrt(((ring - 1.0) * np.float32(0.5 * (r_in[0] * 0.75 + r_in[1]))) ** 2 + (z + 22.0) ** 2)
                  < 0.8 * sinus_radius) & (y < -30)
    veins = sss | transverse
    veins |= canvas.segment_distance((0, -30, 8), (0, -r_in[1] + 2, -20)) < 0.7 * sinus_radius
    for side in (-1, 1):
        veins |= canvas.segment_distance((side * 2.5, 8, 12), (side * 2.5, -28, 10)) < 1.5
    for direction, tangent, length, radius in cortical_veins:
        p = direction / np.linalg.norm(direction) * (semi_brain - 5.0)
        p[2] = abs(p[2])
        t = np.cross(tangent, p)
        t = t / max(np.linalg.norm(t), 1e-9) * length / 2
        veins |= canvas.segment_distance(p - t, p + t) < radius
    labels[veins & brain] = 11
    del arc, ring, sss, transverse, veins
    if has_calc:
        cx, cy, cz, cr = calc_at
        labels[(canvas.ellipsoid((cx, cy, cz), (cr, cr, cr)) < 1.0) & brain] = 16
    if has_haem:
        hx, hy, hz, hr = haem_at
        labels[(canvas.ellipsoid((hx, hy, hz), (hr, 0.8 * hr, 0.7 * hr), (20, 0, 10)) < 1.0) & brain] = 17

    # susceptibility: region values, iron factor, texture, partial volume, zero mean
    lut = np.zeros(256, np.float32)
    for label, value in values.items():
        lut[label] = value * (iron if label in DEEP_GREY_LABELS else 1.0)
    chi = lut[labels]
    texture = np.random.Generator(np.random.PCG64(texture_seed)).standard_normal(shape).astype(np.float32)
    texture = ndimage.gaussian_filter(texture, sigma=3.0 / vox)
    texture *= np.float32(0.01 / max(float(texture.std()), 1e-12))
    chi = ndimage.gaussian_filter(chi + texture * (labels != 10), sigma=0.5 / vox)
    chi = np.where(brain, chi - chi[brain].mean(), 0.0).astype(np.float32)
    del texture

    # outside the brain: CSF gap, skull, scalp, air, air cells a few mm from the brain
    dist = ndimage.distance_transform_edt(~brain, sampling=vox).astype(np.float32)
    outside = ~brain
    labels[outside] = 10
    labels[outside & (dist > csf_gap)] = 13
    labels[outside & (dist > csf_gap + skull)] = 15
    labels[outside & (dist > csf_gap + skull + scalp)] = 14
    for (c, s, t), f in zip(air_cells, air_cell_size):
        labels[(canvas.ellipsoid(c, s * f, t) < 1.0) & (dist > sinus_gap)] = 14
    bg_lut = np.zeros(256, np.float32)
    bg_lut[13], bg_lut[14] = skull_chi, air_chi
    background = ndimage.gaussian_filter(bg_lut[labels], sigma=1.0 / vox)
    background[brain] = 0.0

    # magnitude: tissue contrast under a smooth coil sensitivity
    mag_lut = np.zeros(256, np.float32)
    for label, value in _MAGNITUDE.items():
        mag_lut[label] = value
    coil_map = 1.0 + 0.15 * np.tanh((coil[0] * x + coil[1] * y + coil[2] * z) / 80.0) \
        + 0.05 * np.tanh((coil[3] * x * y + coil[4] * y * z + coil[5] * x * z) / 5000.0)
    magnitude = ndimage.gaussian_filter(mag_lut[labels], sigma=0.5 / vox) * coil_map
    return AnatomicalHead(chi=chi, background=background.astype(np.float32), mask=brain, labels=labels,
                          magnitude=magnitude.astype(np.float32), voxel_size=tuple(float(v) for v in vox))
