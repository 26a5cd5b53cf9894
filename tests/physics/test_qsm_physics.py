"""Dipole kernel and forward field (qmri_labels.physics.qsm)."""

import numpy as np
import pytest
import torch

from qmri_labels.physics.qsm import (
    change_resolution,
    dipole_kernel,
    forward_field,
    gradient_kernel_sq,
    rotation_to_direction,
)


def test_kernel_values_at_known_frequencies():
    shape = (8, 10, 12)
    d = dipole_kernel(shape)
    assert d.shape == shape and d.dtype == np.float32
    assert d[0, 0, 0] == 0.0  # documented choice at k = 0
    assert d[0, 0, 1] == pytest.approx(1 / 3 - 1)  # k along B0: -2/3
    assert d[1, 0, 0] == pytest.approx(1 / 3)  # k perpendicular to B0
    # k = (1/8, 0, 1/12) cycles/mm: kz^2/k^2 = (1/144) / (1/64 + 1/144)
    expected = 1 / 3 - (1 / 144) / (1 / 64 + 1 / 144)
    assert d[1, 0, 1] == pytest.approx(expected, rel=1e-6)
    assert dipole_kernel(shape, dc_value=1 / 3)[0, 0, 0] == pytest.approx(1 / 3)


def test_kernel_real_even_and_bounded():
    # on even grids the Nyquist planes are symmetrised so that this holds too
    d = dipole_kernel((9, 8, 6), voxel_size=(1.0, 0.7, 2.0), b0_dir=(0.3, -0.2, 1.0))
    # D(-k) = D(k): flipping the FFT index n -> -n mod N
    flipped = np.roll(d[::-1, ::-1, ::-1], shift=(1, 1, 1), axis=(0, 1, 2))
    np.testing.assert_allclose(d, flipped, atol=1e-7)
    assert d.min() >= -2 / 3 - 1e-6 and d.max() <= 1 / 3 + 1e-6
    # the kernel of a real, even function gives a real field of a real chi
    chi = np.random.default_rng(0).normal(size=(9, 8, 6))
    spectrum = np.fft.ifftn(np.fft.fftn(chi) * d)
    assert np.abs(spectrum.imag).max() < 1e-10


def test_anisotropic_voxels_divide_by_voxel_size():
    shape = (16, 16, 16)
    d = dipole_kernel(shape, voxel_size=(1.0, 1.0, 3.0))
    # index (1, 0, 1): kx = 1/16, kz = 1/(16*3) -> kz^2/k^2 = 1/(9 + 1)
    assert d[1, 0, 1] == pytest.approx(1 / 3 - 1 / 10, rel=1e-6)
    # multiplying by the voxel size (a common bug) would give 1/3 - 9/10
    assert abs(d[1, 0, 1] - (1 / 3 - 9 / 10)) > 0.5


def test_b0_direction_rotation_permutes_kernel():
    shape = (8, 8, 8)
    dz = dipole_kernel(shape, b0_dir=(0, 0, 1))
    dx = dipole_kernel(shape, b0_dir=(2, 0, 0))  # normalised internally
    np.testing.assert_allclose(dx, np.transpose(dz, (2, 1, 0)), atol=1e-7)
    d_oblique = dipole_kernel(shape, b0_dir=(1, 1, 0))
    k = np.array([1, 1, 0]) / 8.0
    assert d_oblique[1, 1, 0] == pytest.approx(1 / 3 - 1.0, rel=1e-6)
    r = rotation_to_direction((1, 1, 0))
    np.testing.assert_allclose(r @ [0, 0, 1], np.array([1, 1, 0]) / np.sqrt(2), atol=1e-12)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    del k


def test_sphere_field_matches_analytic_exterior():
    n, a, chi0 = 64, 6.0, 0.5
    c = (n - 1) / 2
    x, y, z = np.meshgrid(*(np.arange(n) - c,) * 3, indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    chi = (r <= a).astype(np.float64) * chi0
    field = forward_field(chi, pad=32)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos2 = z**2 / r**2
        analytic = chi0 / 3 * (a / r) ** 3 * (3 * cos2 - 1)
    outside = (r > 2 * a) & (r < 3.5 * a)
    # the voxelised sphere's volume differs slightly from 4/3 pi a^3: compare up to that scale
    scale = chi.sum() / chi0 / (4 / 3 * np.pi * a**3)
    err = np.abs(field[outside] - scale * analytic[outside]).max()
    assert err < 0.03 * np.abs(analytic[outside]).max()
    # inside a uniformly magnetised sphere the (Lorentz-corrected) field is ~0
    assert np.abs(field[r < a / 2]).max() < 0.02 * chi0


def test_forward_field_batched_torch_and_numpy_agree():
    rng = np.random.default_rng(1)
    chi = rng.normal(size=(3, 8, 8, 8)).astype(np.float32)
    f_np = forward_field(chi, (1, 1, 2), (0.1, 0.2, 1.0))
    f_t = forward_field(torch.as_tensor(chi, dtype=torch.float64), (1, 1, 2), (0.1, 0.2, 1.0))
    assert isinstance(f_t, torch.Tensor) and f_np.dtype == np.float32 and f_np.shape == chi.shape
    np.testing.assert_allclose(f_np, f_t.numpy(), atol=1e-5)
    np.testing.assert_allclose(f_np[1], forward_field(chi[1], (1, 1, 2), (0.1, 0.2, 1.0)), atol=1e-6)
    # differentiable
    t = torch.as_tensor(chi[0]).requires_grad_(True)
    forward_field(t).pow(2).sum().backward()
    assert t.grad is not None and torch.isfinite(t.grad).all()


def test_forward_field_linear_and_zero_mean():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(2, 10, 10, 10))
    f = forward_field(2 * a - b, pad=None)
    np.testing.assert_allclose(f, 2 * forward_field(a) - forward_field(b), atol=1e-5)
    assert abs(f.mean()) < 1e-5  # D(0) = 0


def test_padding_changes_only_wraparound():
    chi = np.zeros((16, 16, 16))
    chi[6:10, 6:10, 6:10] = 1.0
    f0, f1 = forward_field(chi), forward_field(chi, pad=True)
    assert f1.shape == chi.shape
    assert np.abs(f0 - f1).max() > 1e-3  # padding matters ...
    assert np.abs(f0 - f1)[6:10, 6:10, 6:10].max() < 0.15 * np.abs(f1).max()  # ... mostly far away


def test_change_resolution_truncation():
    rng = np.random.default_rng(3)
    vol = rng.normal(size=(2, 12, 12, 12))
    low = change_resolution(vol, (1, 1, 1), (1, 1, 3))
    assert low.shape == (2, 12, 12, 4)
    const = np.full((12, 12, 12), 0.7)
    np.testing.assert_allclose(change_resolution(const, (1, 1, 1), (1, 1, 3)), 0.7, atol=1e-6)
    # a band-limited image survives truncation to larger voxels and back
    z = np.arange(12)
    smooth = np.broadcast_to(np.cos(2 * np.pi * z / 12), (12, 12, 12)).astype(np.float64)
    down = change_resolution(smooth, (1, 1, 1), (1, 1, 3))
    up = change_resolution(down, (1, 1, 3), (1, 1, 1))
    np.testing.assert_allclose(up, smooth, atol=1e-6)


def test_change_resolution_even_target_keeps_the_nyquist_pattern():
    # cos(pi x / 2) on 12 samples, coarsened to 6 samples of 2 mm, is exactly (-1)^k: the new
    # Nyquist frequency. Both +-Nyquist bins of the fine spectrum alias onto it; keeping only
    # one (and then taking .real) would halve its amplitude.
    x = np.arange(12)
    vol = np.broadcast_to(np.cos(np.pi * x / 2)[:, None, None], (12, 4, 6)).astype(np.float64)
    down = change_resolution(vol, (1, 1, 1), (2, 1, 1))
    assert down.shape == (6, 4, 6)
    np.testing.assert_allclose(down[:, 0, 0], (-1.0) ** np.arange(6), atol=1e-12)
    # zero filling from an even size splits the Nyquist bin: a real pattern stays real and
    # is the band-limited interpolation cos(pi x' / 2)
    up = change_resolution(down, (2, 1, 1), (1, 1, 1))
    np.testing.assert_allclose(up, vol, atol=1e-12)
    # an oblique pattern on an even 3-D grid: truncation commutes with sampling
    rng = np.random.default_rng(0)
    coarse = rng.normal(size=(6, 4, 8))
    fine = change_resolution(coarse, (2, 2, 2), (1, 1, 1))
    np.testing.assert_allclose(change_resolution(fine, (1, 1, 1), (2, 2, 2)), coarse, atol=1e-12)


def test_gradient_kernel():
    g = gradient_kernel_sq((8, 8, 8), (1.0, 2.0, 1.0))
    assert g[0, 0, 0] == 0
    assert g[4, 0, 0] == pytest.approx(4.0)
    assert g[0, 4, 0] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs",
    [dict(shape=(8, 8)), dict(shape=(8, 8, 8), voxel_size=(1, 0, 1)), dict(shape=(8, 8, 8), b0_dir=(0, 0, 0)),
     dict(shape=(8, 8, 8), b0_dir=(0, 1))],
)
def test_kernel_bad_input(kwargs):
    with pytest.raises(ValueError):
        dipole_kernel(**kwargs)


def test_forward_field_bad_input():
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        forward_field(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="pad"):
        forward_field(np.zeros((4, 4, 4)), pad=(1, 2))
