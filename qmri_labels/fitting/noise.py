"""The noise level of magnitude MRI data, from the data themselves.

One estimator serves the fit command (:mod:`qmri_labels.maps`) and :func:`~qmri_labels.
fitting.fit_mle`. Three sources, tried in this order by :func:`estimate_noise`:

1. **Repeated measurements** (:func:`sigma_from_repeats`): for every group of ``K >= 2``
   volumes that repeat each other (one b-value shell *and* one gradient direction within 5
   degrees, sign-insensitive; every b = 0 volume repeats every other: see
   :func:`qmri_labels.physics.protocol.repeat_groups`; volumes at one b-value but along other
   directions differ because the tissue is anisotropic, not only by noise), the unbiased variance ``s_v^2`` of each voxel's K samples; for Gaussian
   noise ``(K - 1) s_v^2 / sigma^2`` follows chi^2 with ``K - 1`` degrees of freedom, so the
   median over voxels, multiplied by ``(K - 1) / median(chi^2_{K-1})``, estimates sigma^2 and
   ignores voxels hit by motion. Groups are pooled by their degrees of freedom. Magnitude
   (Rician) noise is close to Gaussian only where the signal exceeds about 3 sigma, so after a
   first estimate only voxels whose mean over the group exceeds ``snr_gate`` x sigma are kept
   (repeated twice): the SNR gate.
2. **Background** (:func:`sigma_from_background`): voxels outside a mask hold pure noise whose
   magnitude is Rayleigh distributed, median ``sigma sqrt(2 ln 2)``. Ghosts or signal outside
   the mask make this an overestimate.
3. **Marchenko-Pastur PCA** (:func:`sigma_mppca`; Veraart et al., NeuroImage 2016): in every
   local patch of N voxels the M-measurement signals are centred and their covariance
   eigenvalues split into a signal part and a noise part whose spectrum follows the
   Marchenko-Pastur law; the noise variance is the mean of the noise eigenvalues. Patch values
   are averaged over the patches covering each voxel (weighted like dipy's ``genpca``), which
   gives a **noise map**. It needs only the DWI series itself: no repeated b = 0, no
   background. Validated against ``dipy.denoise.localpca.mppca(..., return_sigma=True)`` in
   ``tests/fitting/test_noise.py``.

Every estimate is a :class:`NoiseEstimate`: a representative ``sigma`` (a number), a per-voxel
``sigma_map`` where the method gives one, the method and how many voxels it rests on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import chi2

from qmri_labels.physics.protocol import REPEAT_ANGLE_DEG, repeat_groups

__all__ = [
    "NoiseEstimate",
    "estimate_noise",
    "sigma_from_background",
    "sigma_from_repeats",
    "sigma_mppca",
]

#: voxels an estimate must rest on, at least
MIN_VOXELS = 10


@dataclass
class NoiseEstimate:
    """A noise standard deviation and how it was obtained.

    Attributes
    ----------
    sigma : float
        One representative value (intensity units): the pooled estimate, or the median of the
        noise map over the voxels it covers.
    method : str
        ``"repeats"``, ``"background"``, ``"mppca"`` or ``"given"``.
    description : str
        A sentence for manifests and logs.
    n_voxels : int
        Voxels (or patches, for MP-PCA) the estimate rests on.
    sigma_map : ndarray or None
        Per-voxel sigma with the data's spatial shape (MP-PCA), else None.
    details : dict
        Method-specific numbers (groups, patch radius, ...).
    """

    sigma: float
    method: str
    description: str
    n_voxels: int
    sigma_map: np.ndarray | None = None
    details: dict = field(default_factory=dict)

    def per_voxel(self):
        """The map where there is one, else the scalar (what a fitter takes as ``sigma``)."""
        return self.sigma if self.sigma_map is None else self.sigma_map

    def manifest(self) -> dict:
        """Plain-JSON description (without the map itself)."""
        out = {"value": self.sigma, "method": self.method, "description": self.description,
               "n_voxels": self.n_voxels, "per_voxel": self.sigma_map is not None, **self.details}
        if self.sigma_map is not None:
            finite = self.sigma_map[np.isfinite(self.sigma_map) & (self.sigma_map > 0)]
            if finite.size:
                out["map_percentiles_5_50_95"] = [float(v) for v in np.percentile(finite, [5, 50, 95])]
        return out


# ----------------------------------------------------------------------------- repeats


def sigma_from_repeats(signals, bvalues, *, bvecs=None, b0_threshold: float = 0.0, groups=None,
                       snr_gate: float = 3.0, n_gate_iterations: int = 2,
                       min_voxels: int = MIN_VOXELS) -> NoiseEstimate | None:
    """Noise level from measurements that repeat each other, pooled over voxels.

    Parameters
    ----------
    signals : array_like (..., M)
        Magnitude signals of the voxels to use (e.g. those inside a mask).
    bvalues : array_like (M,)
    bvecs : array_like (3, M), optional
        Gradient directions. Without them only the b = 0 volumes are known to repeat each
        other: volumes at one b > 0 may be different directions.
    b0_threshold : float
        b-values at or below it form the b = 0 group.
    groups : array_like (M,), optional
        Labels that say which measurements repeat each other, instead of
        :func:`~qmri_labels.physics.protocol.repeat_groups` of ``bvalues`` and ``bvecs``.
    snr_gate : float
        After a first estimate over every voxel, only voxels whose mean over the group exceeds
        ``snr_gate * sigma`` are used (where Rician noise is close to Gaussian); 0 disables it.
    n_gate_iterations : int
        How often the gate is re-applied with the updated sigma.
    min_voxels : int
        Fewest voxels a group's estimate may rest on; a gate that leaves fewer is not applied.

    Returns
    -------
    NoiseEstimate, or None when no measurement repeats (or no group has ``min_voxels``
    voxels with finite, non-negative samples).
    """
    flat = np.asarray(signals, dtype=np.float64)
    bvalues = np.asarray(bvalues, dtype=np.float64).ravel()
    if flat.shape[-1] != bvalues.size:
        raise ValueError(f"signals have {flat.shape[-1]} measurements, bvalues {bvalues.size}")
    flat = flat.reshape(-1, bvalues.size)
    labels = (repeat_groups(bvalues, bvecs, b0_threshold=b0_threshold) if groups is None
              else np.asarray(groups).ravel())
    if labels.size != bvalues.size:
        raise ValueError(f"groups has {labels.size} labels for {bvalues.size} measurements")
    if snr_gate < 0:
        raise ValueError(f"snr_gate must be >= 0, got {snr_gate}")

    stats = []  # (dof, variance per voxel, mean per voxel, mean b-value)
    names = []
    for value in np.unique(labels):
        columns = np.flatnonzero(labels == value)
        if columns.size < 2:
            continue
        block = flat[:, columns]
        usable = np.all(np.isfinite(block), axis=1) & np.all(block >= 0, axis=1) & (block.max(axis=1) > 0)
        if usable.sum() < min_voxels:
            continue
        block = block[usable]
        stats.append((columns.size - 1, block.var(axis=1, ddof=1), block.mean(axis=1),
                      float(bvalues[columns].mean())))
        if groups is not None:
            names.append(f"group {value}")
        elif bvalues[columns].max() <= b0_threshold:
            names.append(f"{columns.size} b = 0 volumes")
        else:
            names.append(f"{columns.size} volumes at b = {bvalues[columns].mean():g} s/mm^2 along one direction "
                         f"(within {REPEAT_ANGLE_DEG:g} deg)")
    if not stats:
        return None

    def pooled(keep_fn):
        total, dof, n_used = 0.0, 0, 0
        for k, var, mean, _ in stats:
            keep = keep_fn(mean)
            if keep is None or keep.sum() < min_voxels:
                keep = np.ones(var.size, dtype=bool)
            # median of a chi2_k / k variable turns the median variance into a mean estimate
            total += k * float(np.median(var[keep])) * k / chi2.median(k)
            dof += k
            n_used = max(n_used, int(keep.sum()))
        return math.sqrt(total / dof), n_used

    sigma, n_used = pooled(lambda mean: None)
    gated = False
    if snr_gate > 0:
        for _ in range(n_gate_iterations):
            threshold = snr_gate * sigma
            if all((mean > threshold).sum() < min_voxels for _, _, mean, _ in stats):
                break
            sigma, n_used = pooled(lambda mean, t=threshold: mean > t)
            gated = True
    if not (sigma > 0 and math.isfinite(sigma)):
        return None
    values = [v for *_, v in stats]
    return NoiseEstimate(
        sigma=sigma, method="repeats", n_voxels=n_used,
        description=(f"repeated measurements ({'; '.join(names)}), their spread: "
                     "sqrt(median voxel variance x (K-1) / median chi2(K-1)), pooled by degrees of freedom"
                     + (f", over voxels with mean signal > {snr_gate:g} sigma" if gated else "")),
        details={"groups": values, "volumes_per_group": [k + 1 for k, *_ in stats],
                 "snr_gate": snr_gate if gated else None})


# ----------------------------------------------------------------------------- background


def sigma_from_background(image, mask, *, min_voxels: int = MIN_VOXELS) -> NoiseEstimate | None:
    """Noise level from the background of one magnitude image (outside ``mask``).

    Only finite, strictly positive background voxels are used (zero-filled regions outside the
    field of view carry no noise). Returns None with fewer than ``min_voxels`` of them.
    """
    image = np.asarray(image, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if image.shape != mask.shape:
        raise ValueError(f"image shape {image.shape} differs from mask shape {mask.shape}")
    with np.errstate(invalid="ignore"):
        background = image[~mask & np.isfinite(image) & (image > 0)]
    if background.size < min_voxels:
        return None
    sigma = float(np.median(background)) / math.sqrt(2 * math.log(2))
    return NoiseEstimate(sigma=sigma, method="background", n_voxels=int(background.size),
                         description="background outside the mask (non-zero voxels of the lowest-b image): "
                                     "Rayleigh median / sqrt(2 ln 2)")


# ----------------------------------------------------------------------------- MP-PCA


def _mp_noise_variance(eigenvalues: torch.Tensor, n_samples: int) -> torch.Tensor:
    """Noise variance per patch from ascending covariance eigenvalues (Veraart et al. 2016).

    The noise eigenvalues are the ``c + 1`` smallest for the largest ``c`` at which
    ``L[c] - L[0] <= 4 sqrt((c + 1) / N) mean(L[:c + 1])`` (the Marchenko-Pastur spectrum's
    width for the variance implied by those eigenvalues); the variance is their mean. With
    fewer samples than measurements only the ``N - 1`` non-zero eigenvalues count.
    """
    values = eigenvalues
    if values.shape[-1] > n_samples - 1:
        values = values[..., -(n_samples - 1):]
    m = values.shape[-1]
    counts = torch.arange(1, m + 1, dtype=values.dtype, device=values.device)
    means = torch.cumsum(values, dim=-1) / counts
    width = 4 * torch.sqrt(counts / n_samples) * means
    noise_like = (values - values[..., :1]) <= width
    # the largest c where the condition holds (c = 0 always holds up to rounding)
    index = torch.where(noise_like, torch.arange(m, device=values.device), torch.zeros((), dtype=torch.long,
                                                                                   device=values.device))
    last = index.max(dim=-1).values
    return means.gather(-1, last[..., None])[..., 0]


def sigma_mppca(data, mask=None, *, patch_radius: int = 2, stride: int = 1, chunk_patches: int = 4096,
                min_patches: int = 1) -> NoiseEstimate:
    """Noise map of a 4-D series by Marchenko-Pastur PCA over sliding local patches.

    Parameters
    ----------
    data : array_like (X, Y, Z, M)
        The magnitude series (every volume, any b-values).
    mask : array_like (X, Y, Z) of bool, optional
        Patches are centred on mask voxels only (default: every voxel).
    patch_radius : int
        Patches are cubes of side ``2 r + 1`` (default 2: 125 voxels, dipy's default).
    stride : int
        Distance between patch centres (1, dipy's choice, centres a patch on every voxel;
        2 or 3 is 8 or 27 times faster and nearly as good on smooth noise fields). The last
        centre along each axis is always included, so every voxel is covered.
    chunk_patches : int
        Patches processed at a time (bounds memory).

    Returns
    -------
    NoiseEstimate with ``sigma_map`` (X, Y, Z): NaN where no patch reaches; ``sigma`` is the
    map's median inside the mask.

    Notes
    -----
    Per patch: subtract the mean signal, covariance ``X^T X / N``, eigenvalues, noise
    variance by :func:`_mp_noise_variance`; the number of eigenvalues below
    ``(1 + sqrt(M / N))^2 sigma^2`` gives the patch weight ``1 / (1 + M - n_noise)``, and a
    voxel's variance is the weighted mean over the patches that contain it (as
    ``dipy.denoise.localpca.genpca`` does). Only patches that fit inside the volume are used.
    """
    array = np.asarray(data)
    if array.ndim != 4:
        raise ValueError(f"MP-PCA needs a 4-D series (x, y, z, measurements); got shape {array.shape}")
    if patch_radius < 1 or stride < 1:
        raise ValueError(f"patch_radius and stride must be >= 1, got {patch_radius}, {stride}")
    side = 2 * patch_radius + 1
    if any(s < side for s in array.shape[:3]):
        raise ValueError(f"MP-PCA with patch radius {patch_radius} needs at least {side} voxels along every "
                         f"spatial axis; the data have shape {array.shape[:3]}")
    spatial = array.shape[:3]
    mask = np.ones(spatial, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if mask.shape != spatial:
        raise ValueError(f"mask shape {mask.shape} differs from the data's spatial shape {spatial}")
    n_meas = array.shape[3]
    n_samples = side ** 3

    volume = torch.as_tensor(np.nan_to_num(np.asarray(array, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0))
    centres_mask = np.zeros(spatial, dtype=bool)
    r = patch_radius
    # centres every `stride` voxels along each axis, plus the last possible one, so that the
    # patches reach every voxel of the volume whatever the stride
    axes = [np.union1d(np.arange(r, n - r, stride), [n - r - 1]) for n in spatial]
    centres_mask[np.ix_(*axes)] = True
    centres = np.argwhere(centres_mask & mask)
    if centres.shape[0] < min_patches:
        raise ValueError(f"MP-PCA: no patch of side {side} fits inside the volume around a mask voxel")
    offsets = torch.stack(torch.meshgrid(*(torch.arange(-r, r + 1),) * 3, indexing="ij"), dim=-1).reshape(-1, 3)
    var_sum = torch.zeros(spatial, dtype=torch.float64)
    weight_sum = torch.zeros(spatial, dtype=torch.float64)
    tau_factor = (1 + math.sqrt(n_meas / n_samples)) ** 2
    centres_t = torch.as_tensor(centres)
    for start in range(0, centres_t.shape[0], chunk_patches):
        c = centres_t[start:start + chunk_patches]
        coords = c[:, None, :] + offsets[None, :, :]  # (n, N, 3)
        x = volume[coords[..., 0], coords[..., 1], coords[..., 2]]  # (n, N, M)
        x = x - x.mean(dim=1, keepdim=True)
        cov = x.transpose(1, 2) @ x / n_samples
        eig = torch.linalg.eigvalsh(cov)
        var = _mp_noise_variance(eig, n_samples)
        n_noise = (eig < tau_factor * var[:, None]).sum(-1)
        weight = 1.0 / (1.0 + n_meas - n_noise.to(torch.float64))
        flat_index = (coords[..., 0] * spatial[1] + coords[..., 1]) * spatial[2] + coords[..., 2]
        var_sum.view(-1).index_add_(0, flat_index.reshape(-1), (var[:, None] * weight[:, None]).expand(
            -1, n_samples).reshape(-1))
        weight_sum.view(-1).index_add_(0, flat_index.reshape(-1), weight[:, None].expand(-1, n_samples).reshape(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma_map = np.sqrt(np.clip((var_sum / weight_sum).numpy(), 0, None))
    sigma_map[weight_sum.numpy() == 0] = np.nan
    inside = sigma_map[mask & np.isfinite(sigma_map) & (sigma_map > 0)]
    if inside.size == 0:
        raise ValueError("MP-PCA: the noise map is zero everywhere in the mask (constant data?)")
    return NoiseEstimate(
        sigma=float(np.median(inside)), method="mppca", n_voxels=int(centres.shape[0]), sigma_map=sigma_map.astype(
            np.float32),
        description=(f"Marchenko-Pastur PCA of the series itself (Veraart et al. 2016), patches of {side}^3 "
                     f"voxels every {stride} voxel(s); per-voxel noise map, summarised by its median in the mask"),
        details={"patch_radius": patch_radius, "stride": stride, "n_patches": int(centres.shape[0])})


# ----------------------------------------------------------------------------- one entry


def estimate_noise(data, bvalues, mask=None, *, bvecs=None, b0_threshold: float = 0.0, method: str = "auto",
                   patch_radius: int = 2, stride: int = 2) -> NoiseEstimate:
    """The noise level of a diffusion series, from the first source that applies.

    Parameters
    ----------
    data : array_like (X, Y, Z, M) or (..., M)
        Magnitude signals; MP-PCA and the background need the spatial 4-D layout.
    bvalues : array_like (M,)
    mask : array_like (X, Y, Z) of bool, optional
        The object; its complement is the background.
    bvecs : array_like (3, M), optional
        Gradient directions: volumes repeat each other only at one b-value and direction
        (without directions, only the b = 0 volumes are known repeats).
    b0_threshold : float
        b-values at or below it count as one group of repeated b = 0 measurements.
    method : {"auto", "repeats", "background", "mppca"}
        ``auto``: repeated measurements if any volumes repeat each other, else the background
        when a mask leaves at least 10 non-zero voxels outside it, else MP-PCA. The estimate
        of a later source says in ``details["not_used"]`` why the earlier ones were not.
    patch_radius, stride : int
        MP-PCA patches (see :func:`sigma_mppca`); patch centres every 2 voxels by default, 8
        times fewer patches than dipy's every voxel (64 x 64 x 30 x 20 volume: 3.7 s instead of
        30 s on 2 busy cores) for a median within 1 % of it.

    Raises
    ------
    ValueError
        When the chosen (or every) source cannot be used; the message says why.
    """
    methods = ("auto", "repeats", "background", "mppca")
    if method not in methods:
        raise ValueError(f"noise method must be one of {methods}, got {method!r}")
    array = np.asarray(data)
    bvalues = np.asarray(bvalues, dtype=np.float64).ravel()
    if array.shape[-1] != bvalues.size:
        raise ValueError(f"data have {array.shape[-1]} measurements, bvalues {bvalues.size}")
    spatial = array.ndim == 4
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != array.shape[:-1]:
            raise ValueError(f"mask shape {mask.shape} differs from the data's shape {array.shape[:-1]}")
    tried = []

    def noting(estimate: NoiseEstimate) -> NoiseEstimate:
        if tried:
            estimate.details["not_used"] = list(tried)
            estimate.description += " (" + "; ".join(tried) + ")"
        return estimate

    if method in ("auto", "repeats"):
        inside = array[mask] if mask is not None else array.reshape(-1, bvalues.size)
        estimate = sigma_from_repeats(inside, bvalues, bvecs=bvecs, b0_threshold=b0_threshold)
        if estimate is not None:
            return estimate
        tried.append("repeats: no volumes repeat each other with >= 10 usable voxels (repeats need one b-value and "
                     + ("one gradient direction within "
                        f"{REPEAT_ANGLE_DEG:g} deg" if bvecs is not None else "known gradient directions: give b-vectors")
                     + "; b = 0 volumes always repeat)")
    if method in ("auto", "background"):
        if mask is None or not spatial:
            tried.append("no mask, so no background")
        else:
            groups = np.where(bvalues <= b0_threshold, 0.0, bvalues)
            lowest = np.flatnonzero(groups == groups.min())
            estimate = sigma_from_background(np.asarray(array[..., lowest[0]]), mask)
            if estimate is not None:
                return noting(estimate)
            tried.append("fewer than 10 non-zero background voxels outside the mask")
    if method in ("auto", "mppca"):
        if not spatial:
            tried.append("MP-PCA needs a 4-D image (x, y, z, measurements)")
        else:
            return noting(sigma_mppca(array, mask, patch_radius=patch_radius, stride=stride))
    raise ValueError(f"cannot estimate the noise level ({method}): " + "; ".join(tried))
