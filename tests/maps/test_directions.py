"""Directions are part of the protocol, and a protocol that cannot identify a model is refused.

An anisotropic DWI acquired the clinical way (three orthogonal directions per b-value): its
volumes at one b-value differ because of the tissue, so only volumes of one b-value *and* one
direction repeat each other (b = 0 volumes always); the isotropic models are fitted to every
volume or to the per-shell geometric mean, whose noise is Rician with sigma / sqrt(N).
"""

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from qmri_labels.cli import fit as fit_cli
from qmri_labels.data import io as qio
from qmri_labels.fitting import fit_mle
from qmri_labels.fitting.noise import estimate_noise, sigma_from_repeats
from qmri_labels.maps import ProtocolNotIdentifiable, fit_volume
from qmri_labels.physics import get_model
from qmri_labels.physics.protocol import ShellAverage, protocol_problems, repeat_groups, shell_labels

SHELLS = (10, 20, 50, 100, 200, 400, 800)


def anisotropic_dwi(shape=(16, 16, 8), sigma=20.0, seed=0, n_b0=3, shells=SHELLS):
    """A diffusion tensor per voxel (FA 0.3-0.7, MD 0.7-1.0e-3 mm^2/s, random orientation),
    IVIM on top (f 0.05-0.2, D* 0.01-0.05), S0 800-1200, Rician noise; ``n_b0`` b = 0 volumes
    (b-vector NaN on the first, zero on the others) and three orthogonal directions per shell."""
    rng = np.random.default_rng(seed)
    bvals = np.array([0.0] * n_b0 + [float(b) for b in shells for _ in range(3)])
    bvecs = np.array([[np.nan] * 3 if i == 0 else [0.0] * 3 for i in range(n_b0)]
                     + [list(d) for _ in shells for d in np.eye(3)]).T
    n = int(np.prod(shape))
    md = rng.uniform(0.7e-3, 1.0e-3, n)
    fa = rng.uniform(0.3, 0.7, n)
    a = fa / np.sqrt(3 - 2 * fa ** 2)  # eigenvalues md (1 + 2a), md (1 - a) twice have this FA
    eigenvalues = np.stack([md * (1 + 2 * a), md * (1 - a), md * (1 - a)], -1)
    rotation, _ = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    tensor = np.einsum("nij,nj,nkj->nik", rotation, eigenvalues, rotation)
    f, dstar, s0 = rng.uniform(0.05, 0.2, n), rng.uniform(0.01, 0.05, n), rng.uniform(800, 1200, n)
    g = np.nan_to_num(bvecs.T)
    adc = np.einsum("mi,nij,mj->nm", g, tensor, g)
    clean = s0[:, None] * (f[:, None] * np.exp(-bvals * dstar[:, None]) + (1 - f[:, None]) * np.exp(-bvals * adc))
    noisy = np.hypot(clean + rng.normal(0, sigma, clean.shape), rng.normal(0, sigma, clean.shape))
    return noisy.reshape(shape + (bvals.size,)).astype(np.float32), bvals, bvecs, md.reshape(shape)


def write_scan(folder, noisy, bvals, bvecs=None, name="scan_dwi"):
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(noisy, np.eye(4)), folder / f"{name}.nii.gz")
    np.savetxt(folder / f"{name}.bval", np.asarray(bvals)[None], fmt="%g")
    paths = {"dwi": folder / f"{name}.nii.gz", "bval": folder / f"{name}.bval"}
    if bvecs is not None:
        np.savetxt(folder / f"{name}.bvec", bvecs, fmt="%.6f")
        paths["bvec"] = folder / f"{name}.bvec"
    return paths


def run(argv, capsys):
    code = fit_cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------- the case


def test_anisotropic_three_direction_dwi_gives_the_true_sigma(tmp_path, capsys):
    noisy, bvals, bvecs, md = anisotropic_dwi()
    paths = write_scan(tmp_path / "in", noisy, bvals, bvecs)
    # the old grouping (by b-value alone) takes the anisotropy for noise
    by_bvalue = sigma_from_repeats(noisy, bvals, groups=bvals)
    assert by_bvalue.sigma > 2 * 20
    out = tmp_path / "out"
    code, err = run(["--dwi", paths["dwi"], "--bval", paths["bval"], "--bvec", paths["bvec"], "--sigma", "auto",
                     "--out", out, "--quiet"], capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["noise"]["method"] == "repeats"
    assert abs(manifest["noise"]["value"] / 20 - 1) < 0.10
    assert manifest["protocol"]["directions"]["used"] == "average"     # the default with three directions
    assert manifest["protocol"]["directions"]["volumes_per_shell"] == [3] * 8
    assert "sigma / sqrt(N)" in manifest["protocol"]["directions"]["noise_model_of_fitted"]
    sidecar = json.loads((out / "scan_model-ivim_param-D_dwimap.json").read_text())
    assert sidecar["Directions"] == "average" and sidecar["Forced"] is False
    D = nib.load(out / "scan_model-ivim_param-D_dwimap.nii.gz").get_fdata()
    assert abs(np.median((D - md) / md)) < 0.02   # the trace-weighted average gives the mean diffusivity


def test_without_directions_only_b0_volumes_repeat():
    noisy, bvals, bvecs, _ = anisotropic_dwi((8, 8, 4))
    blind = sigma_from_repeats(noisy, bvals)
    assert blind.details["groups"] == [0.0] and abs(blind.sigma / 20 - 1) < 0.15
    told = sigma_from_repeats(noisy, bvals, bvecs=bvecs)
    assert told.details["groups"] == [0.0]   # three directions per shell: no repeats at b > 0
    # fit_mle's own estimate follows the same rule
    with pytest.warns(UserWarning, match="sigma estimated"):
        fit = fit_mle(noisy.reshape(-1, bvals.size), bvals, bvecs=bvecs, n_starts=1, max_iter=3)
    assert fit.sigma_method == told.description and abs(fit.sigma.flat[0] / 20 - 1) < 0.15


def test_no_repeats_says_so_and_falls_to_the_next_source():
    noisy, bvals, bvecs, _ = anisotropic_dwi((12, 12, 8), n_b0=1)
    mask = np.zeros(noisy.shape[:3], dtype=bool)
    mask[2:10, 2:10] = True
    noisy[~mask] = np.hypot(*np.random.default_rng(1).normal(0, 20, (2,) + noisy[~mask].shape))
    estimate = estimate_noise(noisy, bvals, mask, bvecs=bvecs)
    assert estimate.method == "background"
    assert "no volumes repeat each other" in estimate.details["not_used"][0]
    assert "no volumes repeat each other" in estimate.description
    assert abs(estimate.sigma / 20 - 1) < 0.10
    assert estimate_noise(noisy, bvals, bvecs=bvecs).method == "mppca"   # no mask: no background either


def test_repeat_groups_need_one_shell_and_direction():
    bvals = np.array([0, 0, 5, 995, 1000, 1005, 1000, 1000, 500])
    tilt = np.radians(4.0)
    bvecs = np.array([[np.nan] * 3, [0, 0, 0], [1, 0, 0],
                      [1, 0, 0], [-1, 0, 0],                       # g and -g: one direction
                      [math.cos(tilt), math.sin(tilt), 0],         # 4 degrees off: the same
                      [0, 1, 0],                                   # orthogonal: another
                      [math.cos(3 * tilt), math.sin(3 * tilt), 0], # 12 degrees off: another
                      [1, 0, 0]]).T
    labels = repeat_groups(bvals, bvecs)
    assert labels[0] == labels[1]                                  # b = 0 volumes always repeat
    assert labels[3] == labels[4] == labels[5]                     # jitter 995/1000/1005 is one shell
    assert len({labels[3], labels[6], labels[7], labels[8], labels[2]}) == 5
    assert len(set(repeat_groups(bvals)[2:])) == 7                 # no directions: b > 0 repeats nothing
    assert repeat_groups(bvals, b0_threshold=5)[2] == labels[0]
    shells, shell_b = shell_labels(bvals)
    np.testing.assert_allclose(shell_b, [0, 5, 500, 1000])
    assert shells[3] == shells[5]


def test_geometric_mean_of_rician_magnitudes_is_rician_with_sigma_over_sqrt_n():
    """The noise model that the per-shell average is fitted with, checked by simulation: the
    geometric mean of N Rician magnitudes of equal signal has the mean and spread of one Rician
    magnitude with sigma / sqrt(N) where the signal is above ~3 sigma. Along anisotropic
    directions (signals A_i) its spread is larger, (sigma / N) sqrt(sum (G / A_i)^2) with G
    their geometric mean: sigma / sqrt(N) is then a lower bound (5 % low for log-signals
    spread by -0.3..0.2)."""
    rng = np.random.default_rng(0)
    sigma, n_dir, n_rep = 1.0, 3, 400_000
    sigma_eff = sigma / math.sqrt(n_dir)
    average = ShellAverage.of([0, 800, 800, 800])
    np.testing.assert_allclose(average.sigma_scale, [1, 1 / math.sqrt(3)])

    def geometric_mean(amplitudes):
        magnitudes = np.hypot(amplitudes + rng.normal(0, sigma, (n_rep, n_dir)), rng.normal(0, sigma, (n_rep, n_dir)))
        return average.apply(np.concatenate([np.ones((n_rep, 1)), magnitudes], axis=1))[:, 1].astype(np.float64)

    for amplitude, tolerance in ((3.0, 0.05), (5.0, 0.02), (10.0, 0.02), (30.0, 0.02)):
        geometric = geometric_mean(np.full(n_dir, amplitude))
        rician = np.hypot(amplitude + rng.normal(0, sigma_eff, n_rep), rng.normal(0, sigma_eff, n_rep))
        assert abs(geometric.mean() - rician.mean()) < tolerance * sigma_eff, amplitude
        assert abs(geometric.std() / rician.std() - 1) < 1.5 * tolerance, amplitude
        # one volume's Rician sigma would overstate the average's bias three-fold
        single = np.hypot(amplitude + rng.normal(0, sigma, n_rep), rng.normal(0, sigma, n_rep))
        assert single.mean() - amplitude > 2.5 * (geometric.mean() - amplitude), amplitude
    log_spread = np.array([-0.3, 0.1, 0.2])
    for amplitude in (10.0, 30.0):
        geometric = geometric_mean(amplitude * np.exp(log_spread))
        predicted = sigma / n_dir * math.sqrt(np.sum(np.exp(-2 * log_spread)))
        assert abs(geometric.std() / predicted - 1) < 0.02
        assert 1.04 < predicted / sigma_eff < 1.06
    # a sample at or below zero leaves the shell's average undefined (left out of the fit)
    assert np.isnan(average.apply(np.array([[1.0, 0.0, 2.0, 3.0]]))[0, 1])


def test_per_measurement_sigma_in_fit_mle():
    bvals = np.array([0, 10, 20, 50, 100, 200, 400, 800.0])
    theta = np.array([[1000, 0.1, 1e-3, 0.02]] * 200)
    rng = np.random.default_rng(3)
    clean = get_model("ivim").forward(torch.as_tensor(theta), torch.as_tensor(bvals))
    noisy = np.abs(clean.numpy() + rng.normal(0, 10, clean.shape))
    options = {"n_starts": 2, "uncertainty": True, "dtype": torch.float64}
    plain = fit_mle(noisy, bvals, sigma=10.0, **options)
    ones = fit_mle(noisy, bvals, sigma=10.0, sigma_scale=np.ones(bvals.size), **options)
    np.testing.assert_allclose(ones.params, plain.params, rtol=1e-6)
    np.testing.assert_allclose(ones.sd, plain.sd, rtol=1e-6)
    halved = fit_mle(noisy, bvals, sigma=20.0, sigma_scale=np.full(bvals.size, 0.5), **options)
    np.testing.assert_allclose(halved.params, plain.params, rtol=1e-6)
    np.testing.assert_allclose(halved.sd, plain.sd, rtol=1e-6)
    # a noisier measurement weighs less: its residual grows
    skewed = fit_mle(noisy, bvals, sigma=10.0, sigma_scale=[1, 1, 1, 1, 1, 1, 1, 50], **options)
    residual = lambda fit: np.abs(get_model("ivim").forward(torch.as_tensor(fit.params), torch.as_tensor(bvals))
                                  .numpy()[:, -1] - noisy[:, -1]).mean()
    assert residual(skewed) > residual(plain)
    with pytest.raises(ValueError, match="sigma_scale"):
        fit_mle(noisy, bvals, sigma=10.0, sigma_scale=np.ones(3))


def test_directions_all_fits_every_volume_and_says_what_it_assumes():
    noisy, bvals, bvecs, _ = anisotropic_dwi((4, 4, 2))
    maps = fit_volume(noisy, protocol=bvals, bvecs=bvecs, sigma=20.0, directions="all")
    assert maps.protocol["directions"]["used"] == "all"
    assert "anisotropy counts as misfit" in maps.protocol["directions"]["noise_model_of_fitted"]
    # the average is fitted with each shell's own noise level, sigma / sqrt(N)
    averaged = fit_volume(noisy, protocol=bvals, bvecs=bvecs, sigma=20.0, uncertainty=True)
    shells = ShellAverage.of(bvals)
    direct = fit_mle(shells.apply(noisy.reshape(-1, bvals.size)), shells.bvalues, sigma=20.0,
                     sigma_scale=shells.sigma_scale, uncertainty=True)
    np.testing.assert_allclose(averaged.params.reshape(-1, 4), direct.params, rtol=1e-5)
    np.testing.assert_allclose(averaged.sd.reshape(-1, 4), direct.sd, rtol=1e-5)
    # repeats of b = 0 only: nothing to average under auto, the maps are as before
    epstein = np.array([0, 0, 0, 10, 20, 30, 50, 80, 100, 200, 400, 800.0])
    signals = np.abs(noisy[..., :1]) * np.exp(-epstein * 1e-3)
    auto = fit_volume(signals, protocol=epstein, sigma=20.0)
    assert auto.protocol["directions"]["used"] == "all"
    with pytest.raises(ValueError, match="directions must be one of"):
        fit_volume(signals, protocol=epstein, sigma=20.0, directions="mean")


# ----------------------------------------------------------------------------- b-vectors


def test_nan_bvec_on_b0_is_accepted_like_dipys_small_64d(tmp_path):
    vectors = np.array([[np.nan, 1, 0, 0], [np.nan, 0, 1, 0], [np.nan, 0, 0, 1]])
    (tmp_path / "rows.bvec").write_text("nan 1 0 0\nnan 0 1 0\nnan 0 0 1\n")
    (tmp_path / "cols.bvec").write_text("nan nan nan\n1 0 0\n0 1 0\n0 0 1\n")   # small_64D's layout
    for name in ("rows", "cols"):
        read = qio.read_bvecs(tmp_path / f"{name}.bvec", 4, [0, 1000, 1000, 1000])
        np.testing.assert_array_equal(read, vectors)
    with pytest.raises(ValueError, match="only b = 0 volumes may lack a direction"):
        qio.read_bvecs(tmp_path / "rows.bvec", 4, [5, 1000, 1000, 1000])
    (tmp_path / "inf.bvec").write_text("inf 1 0 0\n0 0 1 0\n0 0 0 1\n")
    with pytest.raises(ValueError, match="NaN or Inf"):
        qio.read_bvecs(tmp_path / "inf.bvec", 4)


# ----------------------------------------------------------------------------- refusals


def small_64d_like(tmp_path, shape=(6, 6, 4)):
    """dipy's small_64D protocol: one b = 0 (NaN b-vector) and 64 directions at b ~ 1000 with
    scanner jitter (989-1001)."""
    rng = np.random.default_rng(0)
    bvals = np.concatenate([[0.0], rng.uniform(989, 1001, 64)])
    directions = rng.normal(size=(64, 3))
    bvecs = np.concatenate([[[np.nan] * 3], directions / np.linalg.norm(directions, axis=1, keepdims=True)]).T
    signal = 1000 * np.exp(-bvals * 0.8e-3)
    noisy = np.hypot(signal + rng.normal(0, 20, shape + (65,)), rng.normal(0, 20, shape + (65,))).astype(np.float32)
    return write_scan(tmp_path / "small", noisy, bvals, bvecs.T, name="small_64D"), noisy, bvals


def test_ivim_on_a_two_shell_protocol_is_refused(tmp_path, capsys):
    paths, noisy, bvals = small_64d_like(tmp_path)
    out = tmp_path / "out"
    code, err = run(["--dwi", paths["dwi"], "--bval", paths["bval"], "--bvec", paths["bvec"], "--sigma", "20",
                     "--out", out, "--quiet"], capsys)
    assert code == 1 and not out.exists()
    assert "2 b-value shell(s)" in err and "cannot identify the ivim model" in err
    assert "--model monoexp" in err and "--force" in err
    # the same from Python, with the same message
    with pytest.raises(ProtocolNotIdentifiable, match="2 b-value shell"):
        fit_volume(noisy, protocol=bvals, sigma=20.0)
    # the mono-exponential model is identified by the same protocol
    code, err = run(["--dwi", paths["dwi"], "--bval", paths["bval"], "--bvec", paths["bvec"], "--sigma", "20",
                     "--model", "monoexp", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    D = nib.load(out / "small_64D_model-monoexp_param-D_dwimap.nii.gz").get_fdata()
    assert abs(np.median(D) / 0.8e-3 - 1) < 0.05


def test_forced_ivim_on_a_two_shell_protocol_maps_every_volume_and_records_it(tmp_path, capsys):
    paths, _, _ = small_64d_like(tmp_path, shape=(3, 3, 2))
    out = tmp_path / "out"
    # averaged, two measurements remain for four parameters: not even --force fits that
    code, err = run(["--dwi", paths["dwi"], "--bval", paths["bval"], "--sigma", "20", "--force", "--out", out,
                     "--quiet"], capsys)
    assert code == 1 and "even with force" in err
    code, err = run(["--dwi", paths["dwi"], "--bval", paths["bval"], "--sigma", "20", "--force", "--directions", "all",
                     "--out", out, "--quiet"], capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["force"] is True and manifest["protocol"]["identifiability"]["forced"] is True
    assert "cannot identify" in manifest["protocol"]["identifiability"]["problems"][0]


def test_bvalues_in_ms_per_um2_are_refused_and_force_maps(tmp_path, capsys):
    bvals = np.array([0, 0.2, 0.5, 0.8, 1.0])
    rng = np.random.default_rng(2)
    noisy = np.abs(1000 * np.exp(-bvals * 1000 * 0.8e-3) + rng.normal(0, 10, (4, 4, 2, 5))).astype(np.float32)
    paths = write_scan(tmp_path / "in", noisy, bvals)
    out = tmp_path / "out"
    code, err = run(["--dwi", paths["dwi"], "--bval", paths["bval"], "--model", "monoexp", "--sigma", "10",
                     "--out", out, "--quiet"], capsys)
    assert code == 1 and "ms/um^2" in err and "multiply them by 1000" in err
    with pytest.raises(ProtocolNotIdentifiable, match="ms/um"):
        fit_volume(noisy, protocol=bvals, model="monoexp", sigma=10.0)
    code, err = run(["--dwi", paths["dwi"], "--bval", paths["bval"], "--model", "monoexp", "--sigma", "10",
                     "--force", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["force"] is True and "ms/um^2" in manifest["protocol"]["identifiability"]["problems"][0]
    forced = fit_volume(noisy, protocol=bvals, model="monoexp", sigma=10.0, force=True)
    assert forced.protocol["identifiability"]["forced"] is True


def test_ivim_needs_low_b_values_and_enough_shells():
    ivim, monoexp = get_model("ivim"), get_model("monoexp")
    epstein = [0, 10, 20, 30, 50, 80, 100, 200, 400, 800]
    assert protocol_problems(ivim, epstein) == []
    assert protocol_problems(ivim, [15, 30, 50, 80, 100, 200, 400, 800]) == []    # no b = 0 is fine
    no_low = protocol_problems(ivim, [0, 400, 600, 800, 1000])
    assert len(no_low) == 1 and "between 0 and 200" in no_low[0]
    jitter = protocol_problems(ivim, [0, 10, 995, 1000, 1005])
    assert len(jitter) == 1 and "3 b-value shell(s)" in jitter[0]
    assert protocol_problems(monoexp, [0, 995, 1000, 1005]) == []
    assert "1 b-value shell" in protocol_problems(monoexp, [995, 1000, 1005])[0]
    assert protocol_problems(get_model("t2"), [10, 20, 30]) == []                 # echo times: not checked


# ----------------------------------------------------------------------------- adapters


def test_dipy_and_osipi_adapters_follow_the_same_rules():
    pytest.importorskip("dipy")
    from dipy.core.gradients import gradient_table

    from qmri_labels.interop.dipy import IvimModel
    from qmri_labels.interop.osipi import QmriLabelsIVIM

    noisy, bvals, bvecs, md = anisotropic_dwi((6, 6, 2))
    gtab = gradient_table(bvals, bvecs=np.nan_to_num(bvecs).T, b0_threshold=0)
    fit = IvimModel(gtab, noise="rician", sigma="auto").fit(noisy)
    assert fit.maps.protocol["directions"]["used"] == "average"
    assert fit.maps.noise["method"] == "repeats" and abs(fit.maps.noise["value"] / 20 - 1) < 0.15
    assert abs(np.median((fit.D - md) / md)) < 0.05
    two_shells = gradient_table(np.array([0, 1000, 1000, 1000.0]), bvecs=np.vstack([[0, 0, 0], np.eye(3)]),
                                b0_threshold=0)
    with pytest.raises(ProtocolNotIdentifiable, match="2 b-value shell"):
        IvimModel(two_shells).fit(np.full((2, 4), 100.0))
    osipi = QmriLabelsIVIM(bvalues=bvals, bvecs=bvecs)
    result = osipi.ivim_fit_full_volume(noisy / noisy[..., :3].mean(-1, keepdims=True))
    assert abs(np.median((result["D"] - md) / md)) < 0.05
    with pytest.raises(ProtocolNotIdentifiable, match="ms/um"):
        QmriLabelsIVIM(bvalues=bvals / 1000).ivim_fit_full_volume(noisy)
