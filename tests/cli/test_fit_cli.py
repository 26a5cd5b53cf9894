"""End-to-end runs of ``python -m qmri_labels.fit`` on small simulated NIfTI volumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from qmri_labels.cli import fit as fit_cli
from qmri_labels.cli import fit_dwi, fit_qsm
from qmri_labels.maps.derivatives import chi_map_name, param_map_name, sd_map_name, status_map_name
from qmri_labels.physics import get_model

OBLIQUE = np.array([[-1.9, 0.3, 0.0, 91.0],
                    [0.2, 2.1, 0.1, -120.5],
                    [0.0, -0.1, 3.0, -47.0],
                    [0.0, 0.0, 0.0, 1.0]])
SHAPE = (6, 6, 3)
#: Epstein's b-values with the b = 0 volume acquired three times (for --sigma auto)
BVALS = np.array([0, 0, 0, 10, 20, 30, 50, 80, 100, 200, 400, 800.0])
EPSTEIN = np.array([0, 10, 20, 30, 50, 80, 100, 200, 400, 800.0])


def simulate(folder, name="sub-01_dwi", bvals=BVALS, model="ivim", snr=200.0, s0=1000.0, seed=0,
             shape=SHAPE, affine=OBLIQUE, background=0):
    """Write a 4-D NIfTI of Rician-noisy signals with known parameters; returns the truth.

    ``background`` adds that many noise-only slices (S0 = 0) along the last spatial axis.
    """
    rng = np.random.default_rng(seed)
    if model == "ivim":
        theta = np.stack([rng.uniform(0.8, 1.2, shape) * s0, rng.uniform(0.1, 0.35, shape),
                          rng.uniform(0.0008, 0.002, shape), rng.uniform(0.02, 0.06, shape)], -1)
    else:
        theta = np.stack([rng.uniform(0.8, 1.2, shape) * s0, rng.uniform(0.0005, 0.0025, shape)], -1)
    if background:
        theta = np.concatenate([theta, np.zeros(shape[:2] + (background, theta.shape[-1]))], axis=2)
    clean = get_model(model).forward(torch.tensor(theta), torch.tensor(bvals, dtype=torch.float64)).numpy()
    sigma = s0 / snr
    noisy = np.hypot(clean + sigma * rng.standard_normal(clean.shape), sigma * rng.standard_normal(clean.shape))
    folder.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(noisy.astype(np.float32), affine)
    image.set_qform(affine, 1)
    image.set_sform(affine, 1)
    nib.save(image, str(folder / f"{name}.nii.gz"))
    np.savetxt(folder / f"{name}.bval", np.asarray(bvals)[None], fmt="%g")
    return {"theta": theta.astype(np.float32), "sigma": sigma, "dwi": folder / f"{name}.nii.gz",
            "bval": folder / f"{name}.bval", "noisy": noisy.astype(np.float32)}


def save(path, data, affine=OBLIQUE):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def run(argv, capsys=None):
    code = fit_cli.main([str(a) for a in argv])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def assert_no_leftovers(folder):
    """A failed run leaves no temporary folder behind."""
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def pname(prefix, name, model="ivim"):
    """The BIDS-derivative file name of a parameter map."""
    return param_map_name(prefix, model, name)


def load_map(out, name):
    image = nib.load(str(out / name))
    return image, np.asarray(image.dataobj)


@pytest.fixture(scope="module")
def ivim_data(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("ivim"))


@pytest.fixture(scope="module")
def ivim_run(ivim_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "maps"
    code = fit_cli.main(["--dwi", str(ivim_data["dwi"]), "--bval", str(ivim_data["bval"]), "--sigma", "auto",
                         "--out", str(out), "--quiet"])
    assert code == 0
    return out


# ----------------------------------------------------------------------------- good runs

def test_ivim_mle_maps_match_truth(ivim_data, ivim_run):
    truth = ivim_data["theta"]
    for i, name in enumerate(("S0", "f", "D", "Dstar")):
        image, values = load_map(ivim_run, pname("sub-01", name))
        assert image.get_data_dtype() == np.float32
        assert values.shape == SHAPE
        relative = np.abs(values - truth[..., i]) / truth[..., i]
        # SNR 200: S0, f and D are recovered to a few percent, D* (least determined) to ~10 %
        limit = {"S0": 0.01, "f": 0.05, "D": 0.03, "Dstar": 0.15}[name]
        assert np.median(relative) < limit, (name, np.median(relative))


def test_output_affine_and_geometry_equal_input(ivim_data, ivim_run):
    source = nib.load(str(ivim_data["dwi"]))
    names = [pname("sub-01", n) for n in ("S0", "f", "D", "Dstar")] + [status_map_name("sub-01", "ivim")]
    for name in names:
        image = nib.load(str(ivim_run / name))
        np.testing.assert_array_equal(image.affine, source.affine)
        np.testing.assert_array_equal(image.header.get_zooms()[:3], source.header.get_zooms()[:3])
        assert int(image.header["sform_code"]) == int(source.header["sform_code"])


def test_manifest_records_inputs_counts_and_sigma(ivim_data, ivim_run):
    from qmri_labels.data.io import sha256_file

    manifest = json.loads((ivim_run / "manifest.json").read_text())
    assert manifest["inputs"]["dwi"]["sha256"] == sha256_file(ivim_data["dwi"])
    assert manifest["inputs"]["bval"]["sha256"] == sha256_file(ivim_data["bval"])
    assert manifest["inputs"]["bval"]["values"] == BVALS.tolist()
    assert manifest["voxels"]["in_mask"] == manifest["voxels"]["estimated"] == int(np.prod(SHAPE))
    assert sum(manifest["voxels"]["skipped"].values()) == 0
    assert manifest["estimator"]["kind"] == "mle"
    assert {"torch", "numpy", "nibabel", "qmri_labels"} <= set(manifest["versions"])
    assert manifest["timings_s"]["fit"] > 0
    # three b = 0 repeats at SNR 200: the repeat-spread estimate is within 15 % of the truth
    assert manifest["noise"]["source"] == "auto" and manifest["noise"]["method"] == "repeats"
    assert abs(manifest["noise"]["value"] - ivim_data["sigma"]) / ivim_data["sigma"] < 0.15
    assert set(manifest["outputs"]) == {p.name for p in ivim_run.iterdir()}
    # every output's checksum, so that a cohort rerun can verify the folder before skipping it
    from qmri_labels.maps.cohort import outputs_verified

    assert set(manifest["output_sha256"]) == set(manifest["outputs"]) - {"manifest.json"}
    assert manifest["output_sha256"]["sub-01_qc.png"] == sha256_file(ivim_run / "sub-01_qc.png")
    assert outputs_verified(ivim_run, {"dwi": ivim_data["dwi"], "bval": ivim_data["bval"]})
    png = (ivim_run / "sub-01_qc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_bids_sidecars_and_dataset_description(ivim_data, ivim_run):
    import qmri_labels
    from qmri_labels.data.io import sha256_file

    description = json.loads((ivim_run / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"]
    assert description["GeneratedBy"][0] == {"Name": "qmri_labels", "Version": qmri_labels.__version__}
    for name in ("S0", "f", "D", "Dstar"):
        sidecar = json.loads((ivim_run / pname("sub-01", name).replace(".nii.gz", ".json")).read_text())
        assert sidecar["Parameter"] == name and sidecar["Model"] == "ivim"
        assert sidecar["Units"] == (get_model("ivim").units[name] if name != "S0" else "input intensity units")
        assert sidecar["Estimator"]["kind"] == "mle" and sidecar["Noise"]["method"] == "repeats"
        assert sidecar["InputChecksums"] == {"dwi": sha256_file(ivim_data["dwi"]), "bval": sha256_file(ivim_data["bval"])}
        assert sidecar["Software"]["Version"] == qmri_labels.__version__


def test_monoexp_with_mask_sigma_value_and_prefix(tmp_path, capsys):
    data = simulate(tmp_path / "in", name="scan", model="monoexp", bvals=np.array([0, 200, 500, 800, 1000.0]))
    mask = np.zeros(SHAPE, np.uint8)
    mask[1:5, 1:5, :] = 1
    save(tmp_path / "mask.nii.gz", mask)
    out = tmp_path / "deep" / "new" / "maps"
    code, _ = run(["--dwi", data["dwi"], "--bval", data["bval"], "--mask", tmp_path / "mask.nii.gz",
                   "--model", "monoexp", "--sigma", data["sigma"], "--prefix", "sub-02", "--out", out], capsys)
    assert code == 0
    _, d_map = load_map(out, pname("sub-02", "D", "monoexp"))
    inside = mask.astype(bool)
    assert np.all(d_map[~inside] == 0)
    relative = np.abs(d_map[inside] - data["theta"][..., 1][inside]) / data["theta"][..., 1][inside]
    assert np.median(relative) < 0.02
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["voxels"]["in_mask"] == manifest["voxels"]["estimated"] == int(inside.sum())
    assert manifest["noise"] == {"model": "rician", "method": "given", "value": data["sigma"]}
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["dataset_description.json", "manifest.json", "sub-02_qc.png"]
                           + [f"sub-02_model-monoexp_{part}.{ext}" for part in ("param-D_dwimap", "param-S0_dwimap",
                                                                                  "desc-status_dseg")
                              for ext in ("nii.gz", "json")])


def test_chunking_does_not_change_the_maps(ivim_data, ivim_run, tmp_path):
    out = tmp_path / "chunked"
    assert fit_cli.main(["--dwi", str(ivim_data["dwi"]), "--bval", str(ivim_data["bval"]), "--sigma", "auto",
                         "--chunk-size", "25", "--out", str(out), "--quiet"]) == 0
    for name in ("f", "D"):
        np.testing.assert_allclose(load_map(out, pname("sub-01", name))[1],
                                   load_map(ivim_run, pname("sub-01", name))[1], rtol=1e-4)


def test_bvec_is_checked_and_recorded(ivim_data, tmp_path, capsys):
    vecs = np.zeros((3, BVALS.size))
    vecs[2, 3:] = 1.0
    np.savetxt(tmp_path / "good.bvec", vecs)
    out = tmp_path / "out"
    code, _ = run(["--dwi", ivim_data["dwi"], "--bval", ivim_data["bval"], "--bvec", tmp_path / "good.bvec",
                   "--model", "monoexp", "--noise", "gaussian", "--out", out, "--quiet"], capsys)
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert "repeat each other" in manifest["inputs"]["bvec"]["note"]
    assert manifest["protocol"]["directions"]["bvecs_given"] is True


def test_sigma_auto_background_method_with_one_b0(tmp_path, capsys):
    from qmri_labels.fitting.noise import estimate_noise

    data = simulate(tmp_path, model="monoexp", bvals=np.array([0, 300, 600, 1000.0]), snr=50, background=3,
                    shape=(10, 10, 3))
    mask = np.zeros((10, 10, 6), bool)
    mask[:, :, :3] = True
    estimate = estimate_noise(data["noisy"], [0, 300, 600, 1000.0], mask)
    assert estimate.method == "background" and estimate.n_voxels == 300
    assert abs(estimate.sigma - data["sigma"]) / data["sigma"] < 0.15
    save(tmp_path / "mask.nii.gz", mask.astype(np.uint8))
    out = tmp_path / "out"
    code, err = run(["--dwi", data["dwi"], "--bval", data["bval"], "--mask", tmp_path / "mask.nii.gz", "--model",
                     "monoexp", "--sigma", "auto", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["noise"]["method"] == "background"


def test_no_b0_volume_one_low_b_and_no_background_is_mapped_with_mppca(tmp_path, capsys):
    """The issue's case: lowest b = 15 once, a brain crop without background, --sigma auto (Rician)."""
    bvals = np.array([15, 30, 50, 80, 100, 150, 200, 300, 400, 500, 600, 800, 1000.0])
    data = simulate(tmp_path, bvals=bvals, snr=40, shape=(12, 12, 8), affine=np.eye(4))
    out = tmp_path / "out"
    code, err = run(["--dwi", data["dwi"], "--bval", data["bval"], "--sigma", "auto", "--out", out, "--quiet"],
                    capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["noise"]["method"] == "mppca" and manifest["noise"]["per_voxel"]
    # MP-PCA recovers the noise level of a series without b = 0 or background to within 15 %
    assert abs(manifest["noise"]["value"] - data["sigma"]) / data["sigma"] < 0.15
    _, sigma_map = load_map(out, "sub-01_desc-sigma_noisemap.nii.gz")
    assert sigma_map.shape == (12, 12, 8) and np.all(sigma_map > 0)
    truth = data["theta"]
    # the maps equal (to fitting noise) those of a fit given the true sigma, which are as good as
    # this protocol allows (measured: median relative error S0 0.06, f 0.22, D 0.05 either way)
    from qmri_labels.maps import fit_volume

    oracle = fit_volume(data["noisy"], protocol=bvals, sigma=data["sigma"])
    for name in ("S0", "f", "D"):
        _, values = load_map(out, pname("sub-01", name))
        index = {"S0": 0, "f": 1, "D": 2}[name]
        relative = np.median(np.abs(values - truth[..., index]) / truth[..., index])
        assert relative < {"S0": 0.1, "D": 0.1, "f": 0.3}[name], (name, relative)
        assert np.median(np.abs(values - oracle[name]) / truth[..., index]) < 0.02, name
    assert manifest["voxels"]["estimated"] == 12 * 12 * 8


def test_nan_inf_and_negative_samples_are_fitted_around_or_skipped(ivim_data, tmp_path, capsys):
    noisy = ivim_data["noisy"].copy()
    noisy[0, 0, 0, 6] = np.nan       # one NaN at b = 30: fitted without that sample
    noisy[1, 0, 0, 9] = -5.0         # a negative magnitude at b = 200: fitted without it
    noisy[2, 0, 0, :3] = np.inf      # every b = 0 sample unusable: fitted without them (S0 is free)
    noisy[3, 0, 0, 3:] = np.nan      # only the b = 0 samples left: too few measurements
    noisy[4, 0, 0, :] = 0.0          # background: no positive sample
    save(tmp_path / "bad.nii.gz", noisy)
    out = tmp_path / "out"
    code, _ = run(["--dwi", tmp_path / "bad.nii.gz", "--bval", ivim_data["bval"], "--sigma", ivim_data["sigma"],
                   "--out", out, "--quiet"], capsys)
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    voxels = manifest["voxels"]
    assert voxels["samples_nonfinite"] == 1 + 3 + 9
    assert voxels["samples_negative"] == 1
    assert voxels["estimated_without_some_samples"] == 3
    assert voxels["skipped"]["too_few_usable_measurements"] == 1
    assert voxels["skipped"]["no_positive_sample"] == 1
    assert voxels["estimated"] == int(np.prod(SHAPE)) - 2
    _, status = load_map(out, status_map_name("bad", "ivim"))
    assert status.dtype == np.uint8
    assert [status[i, 0, 0] for i in range(5)] == [2, 2, 2, 5, 3]
    _, f_map = load_map(out, pname("bad", "f"))
    assert np.all(np.isnan(f_map[3:5, 0, 0])) and np.isfinite(f_map[2, 0, 0])
    truth = ivim_data["theta"][..., 1]
    assert np.all(np.abs(f_map[:2, 0, 0] - truth[:2, 0, 0]) < 0.05)


def test_subprocess_module_entry_point(tmp_path):
    data = simulate(tmp_path, model="monoexp", bvals=np.array([0, 500, 1000.0]), shape=(3, 3, 2))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "qmri_labels.fit", "--dwi", str(data["dwi"]), "--bval",
                             str(data["bval"]), "--model", "monoexp", "--sigma", str(data["sigma"]), "--out", str(out)],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "MPLBACKEND": "Agg"})
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stderr and (out / pname("sub-01", "D", "monoexp")).exists()


# ----------------------------------------------------------------------------- bad input

@pytest.fixture()
def bad_inputs(ivim_data, tmp_path):
    """Variants of the good inputs, each broken in one way."""
    noisy = ivim_data["noisy"]
    paths = {
        "three_d": save(tmp_path / "three_d.nii.gz", noisy[..., 0]),
        "short_bval": tmp_path / "short.bval",
        "bad_bvec": tmp_path / "bad.bvec",
        "mask_shape": save(tmp_path / "mask_shape.nii.gz", np.ones((6, 6, 4), np.uint8)),
        "mask_affine": save(tmp_path / "mask_affine.nii.gz", np.ones(SHAPE, np.uint8), affine=np.eye(4)),
        "empty_mask": save(tmp_path / "empty_mask.nii.gz", np.zeros(SHAPE, np.uint8)),
        "a_file": tmp_path / "a_file",
    }
    np.savetxt(paths["short_bval"], BVALS[None, :-1], fmt="%g")
    np.savetxt(paths["bad_bvec"], np.zeros((2, BVALS.size)))
    paths["a_file"].write_text("in the way")
    return paths


BAD_CASES = {
    "3-D image": (["--dwi", "{three_d}"], "is a 3-D image"),
    "b-value count": (["--bval", "{short_bval}"], "11 b-values, but sub-01_dwi.nii.gz has 12 volumes"),
    "bvec shape": (["--bvec", "{bad_bvec}"], "3 rows"),
    "mask shape": (["--mask", "{mask_shape}"], "shape (6, 6, 4) differs"),
    "mask affine": (["--mask", "{mask_affine}"], "affine differs"),
    "empty mask": (["--mask", "{empty_mask}"], "mask is empty"),
    "missing file": (["--dwi", "{a_file}.nii.gz"], "file not found"),
    "sigma": (["--sigma", "-3"], "must be finite and > 0"),
    "device": (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
    "qsm flags": (["--model", "qsm"], "--model qsm needs --field"),
    "estimator": (["--estimator", "no-such-network"], "not a network in"),
    "out not writable": (["--out", "{a_file}/maps"], "is not a folder"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_fails_cleanly(case, ivim_data, bad_inputs, tmp_path, capsys):
    changes, message = BAD_CASES[case]
    out = tmp_path / "out"
    argv = {"--dwi": str(ivim_data["dwi"]), "--bval": str(ivim_data["bval"]), "--out": str(out)}
    extra = []
    for flag, value in zip(changes[::2], changes[1::2]):
        value = value.format(**{k: str(v) for k, v in bad_inputs.items()})
        if flag in argv:
            argv[flag] = value
        else:
            extra += [flag, value]
    if case == "qsm flags":
        argv.pop("--bval")
        argv.pop("--dwi")
    args = [x for kv in argv.items() for x in kv] + extra + ["--quiet"]
    code, err = run(args, capsys)
    assert code == 1
    assert message in err, err
    assert err.startswith("qmri_labels.fit: error:") and "Traceback" not in err
    assert not out.exists()
    assert_no_leftovers(tmp_path)


def test_existing_output_is_refused_then_replaced_with_overwrite(ivim_data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous results")
    argv = ["--dwi", ivim_data["dwi"], "--bval", ivim_data["bval"], "--model", "monoexp", "--sigma", "auto",
            "--out", out, "--quiet"]
    code, err = run(argv, capsys)
    assert code == 1 and "exists" in err and "--overwrite" in err
    assert (out / "old.txt").exists()
    code, _ = run(argv + ["--overwrite"], capsys)
    assert code == 0
    assert not (out / "old.txt").exists() and (out / pname("sub-01", "D", "monoexp")).exists()
    assert_no_leftovers(tmp_path)


def test_failure_while_writing_leaves_no_partial_output(ivim_data, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash after the maps were written")

    monkeypatch.setattr(fit_dwi, "write_qc_figure", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit_cli.main(["--dwi", str(ivim_data["dwi"]), "--bval", str(ivim_data["bval"]), "--model", "monoexp",
                      "--sigma", "auto", "--out", str(out), "--quiet"])
    assert not out.exists()
    assert_no_leftovers(tmp_path)


def test_uncertainty_writes_sd_maps_equal_to_fit_mle(ivim_data, ivim_run, tmp_path, capsys):
    from qmri_labels.fitting import fit_mle

    mask = np.zeros(SHAPE, np.uint8)
    mask[1:5, :, :] = 1
    save(tmp_path / "mask.nii.gz", mask)
    out = tmp_path / "out"
    code, err = run(["--dwi", ivim_data["dwi"], "--bval", ivim_data["bval"], "--mask", tmp_path / "mask.nii.gz",
                     "--sigma", ivim_data["sigma"], "--uncertainty", "--chunk-size", "17", "--out", out, "--quiet"],
                    capsys)
    assert code == 0, err
    inside = mask.astype(bool)
    direct = fit_mle(ivim_data["noisy"][inside], BVALS, sigma=ivim_data["sigma"], uncertainty=True)
    manifest = json.loads((out / "manifest.json").read_text())
    for i, name in enumerate(("S0", "f", "D", "Dstar")):
        image, sd = load_map(out, sd_map_name("sub-01", "ivim", name))
        assert sd_map_name("sub-01", "ivim", name) == f"sub-01_model-ivim_param-{name}_desc-sd_dwimap.nii.gz"
        assert image.get_data_dtype() == np.float32 and sd.shape == SHAPE
        np.testing.assert_array_equal(image.affine, nib.load(str(ivim_data["dwi"])).affine)
        np.testing.assert_allclose(sd[inside], direct.sd[:, i], rtol=1e-5, equal_nan=True)
        assert np.all(sd[~inside] == 0)
        sidecar = json.loads((out / sd_map_name("sub-01", "ivim", name).replace(".nii.gz", ".json")).read_text())
        assert sidecar["Parameter"] == name and sidecar["Statistic"] == "standard deviation"
        assert sidecar["Units"] == (get_model("ivim").units[name] if name != "S0" else "input intensity units")
        assert "Fisher information" in sidecar["Method"]
        assert sum(sidecar["NaNReasons"].values()) == int(np.isnan(sd[inside]).sum())
        assert manifest["uncertainty"]["sd_reasons"][name].get("reported", 0) == int(np.isfinite(sd[inside]).sum())
    assert set(manifest["outputs"]) == {p.name for p in out.iterdir()}
    # without the flag: no SD maps, and the parameter maps are the same
    assert not any("desc-sd" in p.name for p in ivim_run.iterdir())
    assert json.loads((ivim_run / "manifest.json").read_text())["uncertainty"] is None
    for name in ("f", "D"):
        np.testing.assert_allclose(load_map(out, pname("sub-01", name))[1][inside],
                                   direct.params[:, ("S0", "f", "D", "Dstar").index(name)], rtol=1e-5)


def test_uncertainty_is_refused_for_the_default_qsm_inversion(tmp_path, capsys):
    # (a U-Net ensemble writes a chi SD map: tests/estimators/test_qsm_ensemble.py)
    save(tmp_path / "field.nii.gz", np.zeros((4, 4, 4), np.float32))
    save(tmp_path / "mask.nii.gz", np.ones((4, 4, 4), np.uint8))
    code, err = run(["--field", tmp_path / "field.nii.gz", "--mask", tmp_path / "mask.nii.gz", "--uncertainty",
                     "--out", tmp_path / "out"], capsys)
    assert code == 1 and "--uncertainty: the tkd inversion reports no standard deviation" in err
    assert "QSM U-Net ensemble" in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- networks

@pytest.fixture(scope="module")
def network_bundle(tmp_path_factory):
    """A tiny IVIM network for Epstein's protocol (one epoch: the tests check the plumbing,
    not the accuracy, by comparing the maps with the estimator's own predictions)."""
    from qmri_labels.data import DatasetSpec
    from qmri_labels.estimators import NetworkEstimator

    dataset = DatasetSpec(model="ivim", protocol=tuple(EPSTEIN), snr=50, n=64, seed=3).generate()
    network = NetworkEstimator(label="gt", max_epochs=1, batch_size=64, patience=0, val_fraction=0.0,
                               progress=False, accelerator="cpu", devices=1).fit(dataset)
    folder = tmp_path_factory.mktemp("models")
    network.save(folder / "tiny-ivim")
    return folder / "tiny-ivim"


@pytest.fixture(scope="module")
def epstein_data(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("epstein"), bvals=EPSTEIN, snr=100)


def _expected_network_maps(bundle, noisy, b0_column=0):
    """The network's own predictions with the preprocessing it records: the whole volume divided
    by one number, median(b = 0 signal) / the training data's median b = 0 signal."""
    from qmri_labels.estimators import NetworkEstimator

    network = NetworkEstimator.load(bundle)
    assert network.manifest_["preprocessing"]["kind"] == "global_scale"
    scale = np.median(noisy[..., b0_column]) / network.manifest_["preprocessing"]["reference"]
    expected = network.predict(noisy / scale, signal_scale=1.0)
    expected[..., 0] *= scale
    return expected


def test_network_estimator_by_path(network_bundle, epstein_data, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run(["--dwi", epstein_data["dwi"], "--bval", epstein_data["bval"], "--estimator", network_bundle,
                     "--out", out, "--quiet"], capsys)
    assert code == 0, err
    expected = _expected_network_maps(network_bundle, epstein_data["noisy"])
    for i, name in enumerate(("S0", "f", "D", "Dstar")):
        np.testing.assert_allclose(load_map(out, pname("sub-01", name))[1], expected[..., i], rtol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["estimator"]["kind"] == "network"
    assert manifest["estimator"]["protocol"] == EPSTEIN.tolist()
    assert len(manifest["estimator"]["bundle_sha256"]) == 64
    assert manifest["noise"] == {"model": None}
    assert manifest["estimator"]["preprocessing"]["source"] == "manifest"


def test_network_by_name_with_volumes_in_another_order(network_bundle, epstein_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QMRI_LABELS_MODELS", str(network_bundle.parent))
    order = np.random.default_rng(5).permutation(EPSTEIN.size)
    save(tmp_path / "shuffled.nii.gz", epstein_data["noisy"][..., order])
    np.savetxt(tmp_path / "shuffled.bval", EPSTEIN[order][None], fmt="%g")
    out = tmp_path / "out"
    code, err = run(["--dwi", tmp_path / "shuffled.nii.gz", "--bval", tmp_path / "shuffled.bval",
                     "--estimator", "tiny-ivim", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    expected = _expected_network_maps(network_bundle, epstein_data["noisy"])
    np.testing.assert_allclose(load_map(out, pname("shuffled", "f"))[1], expected[..., 1], rtol=1e-5)


def test_network_for_another_protocol_names_both(network_bundle, ivim_data, tmp_path, capsys):
    code, err = run(["--dwi", ivim_data["dwi"], "--bval", ivim_data["bval"], "--estimator", network_bundle,
                     "--out", tmp_path / "out"], capsys)
    assert code == 1
    assert "trained for the protocol b = [0, 10, 20, 30, 50, 80, 100, 200, 400, 800]" in err
    assert "b = [0, 0, 0, 10, 20" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", [["--sigma", "3"], ["--noise", "gaussian"]])
def test_mle_options_are_refused_with_a_network(flag, network_bundle, epstein_data, tmp_path, capsys):
    code, err = run(["--dwi", epstein_data["dwi"], "--bval", epstein_data["bval"], "--estimator", network_bundle,
                     *flag, "--out", tmp_path / "out"], capsys)
    assert code == 1 and f"{flag[0]} applies to the MLE" in err
    assert not (tmp_path / "out").exists()


def test_uncertainty_with_a_network_without_sd_names_the_option(network_bundle, epstein_data, tmp_path, capsys):
    code, err = run(["--dwi", epstein_data["dwi"], "--bval", epstein_data["bval"], "--estimator", network_bundle,
                     "--uncertainty", "--out", tmp_path / "out"], capsys)
    assert code == 1
    assert "--uncertainty: network tiny-ivim" in err and "does not report standard deviations" in err
    assert not (tmp_path / "out").exists()


def test_network_model_mismatch(network_bundle, epstein_data, tmp_path, capsys):
    code, err = run(["--dwi", epstein_data["dwi"], "--bval", epstein_data["bval"], "--estimator", network_bundle,
                     "--model", "monoexp", "--out", tmp_path / "out"], capsys)
    assert code == 1 and "fits the ivim model" in err


@pytest.mark.parametrize("damage", ["weights", "manifest", "missing"])
def test_tampered_or_corrupt_bundle_is_refused(damage, network_bundle, epstein_data, tmp_path, capsys):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(network_bundle, bundle)
    weights = next(p for p in bundle.iterdir() if p.name.startswith("weights"))
    if damage == "weights":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "manifest":
        (bundle / "manifest.json").write_text("{not json")
    else:
        weights.unlink()
    code, err = run(["--dwi", epstein_data["dwi"], "--bval", epstein_data["bval"], "--estimator", bundle,
                     "--out", tmp_path / "out"], capsys)
    assert code == 1
    assert "corrupt or tampered model bundle" in err
    assert not (tmp_path / "out").exists()
    assert_no_leftovers(tmp_path)


def test_network_skips_voxels_with_missing_samples(network_bundle, epstein_data, tmp_path, capsys):
    noisy = epstein_data["noisy"].copy()
    noisy[0, 0, 0, 4] = np.nan
    save(tmp_path / "gap.nii.gz", noisy)
    out = tmp_path / "out"
    code, _ = run(["--dwi", tmp_path / "gap.nii.gz", "--bval", epstein_data["bval"], "--estimator", network_bundle,
                   "--out", out, "--quiet"], capsys)
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["voxels"]["skipped"]["missing_measurements_for_network"] == 1
    assert np.isnan(load_map(out, pname("gap", "f"))[1][0, 0, 0])


# ----------------------------------------------------------------------------- QSM

QSM_VOXEL = (1.0, 1.0, 2.0)


@pytest.fixture(scope="module")
def qsm_data(tmp_path_factory):
    from qmri_labels.physics.qsm import forward_field

    folder = tmp_path_factory.mktemp("qsm")
    n = 20
    x, y, z = np.meshgrid(*[np.arange(n) - n / 2 + 0.5] * 3, indexing="ij")
    chi = np.zeros((n, n, n), np.float32)
    chi[(x - 3) ** 2 + y ** 2 + (2 * z) ** 2 < 16] = 0.1
    chi[(x + 4) ** 2 + (y - 2) ** 2 + (2 * z) ** 2 < 9] = -0.05
    mask = (x ** 2 + y ** 2 + (2 * z) ** 2) < 81
    field = forward_field(chi, QSM_VOXEL, (0, 0, 1), pad=True).astype(np.float32)
    affine = np.diag(QSM_VOXEL + (1.0,))
    affine[:3, 3] = (-10, -10, -20)
    save(folder / "sub-01_field.nii.gz", field, affine)
    save(folder / "brain_mask.nii.gz", mask.astype(np.uint8), affine)
    return {"chi": chi, "mask": mask, "field": field, "affine": affine,
            "field_path": folder / "sub-01_field.nii.gz", "mask_path": folder / "brain_mask.nii.gz"}


@pytest.mark.parametrize("estimator", ["tkd", "tikhonov"])
def test_qsm_conventional_inversion(estimator, qsm_data, tmp_path, capsys):
    import scipy.io

    from qmri_labels.fitting import qsm_inversion

    out = tmp_path / "out"
    code, err = run(["--model", "qsm", "--field", qsm_data["field_path"], "--mask", qsm_data["mask_path"],
                     "--estimator", estimator, "--mat", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    image, chi = load_map(out, chi_map_name("sub-01"))
    np.testing.assert_array_equal(image.affine, qsm_data["affine"])
    assert image.get_data_dtype() == np.float32
    mask = qsm_data["mask"]
    assert np.all(chi[~mask] == 0)
    # the CLI runs the library's inversion on the field inside the mask, with the header's voxel
    # size and the given B0 direction
    direct = getattr(qsm_inversion, estimator)(qsm_data["field"] * mask, QSM_VOXEL, (0, 0, 1), mask=mask)
    np.testing.assert_allclose(chi, direct, atol=1e-6)
    assert np.corrcoef(chi[mask], qsm_data["chi"][mask])[0, 1] > 0.9
    mat = scipy.io.loadmat(out / "sub-01_chi.mat")
    np.testing.assert_array_equal(mat["chi"], chi)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "qsm" and manifest["estimator"]["name"] == estimator
    assert manifest["voxel_size_mm"] == list(QSM_VOXEL)
    assert (out / "sub-01_qc.png").exists()


def test_qsm_b0_direction_matters_and_affine_option(qsm_data, tmp_path, capsys):
    assert run(["--field", qsm_data["field_path"], "--mask", qsm_data["mask_path"], "--b0-dir", "1,0,0",
                "--out", tmp_path / "x", "--quiet"], capsys)[0] == 0
    _, chi_x = load_map(tmp_path / "x", chi_map_name("sub-01"))
    mask = qsm_data["mask"]
    assert np.corrcoef(chi_x[mask], qsm_data["chi"][mask])[0, 1] < 0.8
    assert run(["--field", qsm_data["field_path"], "--mask", qsm_data["mask_path"], "--b0-dir", "affine",
                "--out", tmp_path / "a", "--quiet"], capsys)[0] == 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    np.testing.assert_allclose(manifest["b0_dir"], [0, 0, 1], atol=1e-12)


def test_b0_dir_from_an_oblique_affine():
    angle = np.deg2rad(30)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.0, 1.0, 2.0])
    direction, _ = fit_qsm.parse_b0_dir("affine", affine)
    np.testing.assert_allclose(direction, [0, np.sin(angle), np.cos(angle)], atol=1e-12)


def test_qsm_bad_input(qsm_data, tmp_path, capsys):
    field4d = save(tmp_path / "f4.nii.gz", np.stack([qsm_data["field"]] * 2, -1), qsm_data["affine"])
    nan_field = qsm_data["field"].copy()
    nan_field[10, 10, 10] = np.nan
    save(tmp_path / "nan.nii.gz", nan_field, qsm_data["affine"])
    cases = [
        (["--field", field4d, "--mask", qsm_data["mask_path"]], "must be 3-D"),
        (["--field", qsm_data["field_path"]], "QSM needs --mask"),
        (["--field", qsm_data["field_path"], "--mask", qsm_data["mask_path"], "--b0-dir", "0,0"], "three numbers"),
        (["--field", qsm_data["field_path"], "--mask", qsm_data["mask_path"], "--b0-dir", "0,0,0"], "zero length"),
        (["--field", qsm_data["field_path"], "--mask", qsm_data["mask_path"], "--estimator", "mle"], "diffusion"),
        (["--field", qsm_data["field_path"], "--mask", qsm_data["mask_path"], "--sigma", "3"], "diffusion option"),
        (["--field", qsm_data["field_path"], "--mask", qsm_data["mask_path"], "--model", "ivim"], "QSM input"),
    ]
    for argv, message in cases:
        code, err = run(argv + ["--out", tmp_path / "out", "--quiet"], capsys)
        assert code == 1 and message in err, (argv, err)
        assert not (tmp_path / "out").exists()
    code, _ = run(["--field", tmp_path / "nan.nii.gz", "--mask", qsm_data["mask_path"], "--out", tmp_path / "out",
                   "--quiet"], capsys)
    assert code == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["voxels"]["skipped"]["nonfinite_field"] == 1
    assert_no_leftovers(tmp_path)


@pytest.fixture(scope="module")
def qsm_network_bundle(tmp_path_factory):
    """A tiny QSM U-Net (toy preset, one epoch on two 16^3 phantoms): plumbing, not accuracy."""
    from qmri_labels.data.qsm import QSMPhantomSpec
    from qmri_labels.estimators import QSMEstimator

    phantoms = QSMPhantomSpec(shape=(16, 16, 16), n=2, n_orientations=1, seed=0).generate()
    network = QSMEstimator(label="gt", preset="toy", patch_size=None, samples_per_epoch=2, batch_size=2,
                           max_epochs=1, device="cpu").fit(phantoms)
    return network.save(tmp_path_factory.mktemp("qsm_models") / "tiny-qsm")


def test_qsm_network_estimator(qsm_network_bundle, qsm_data, tmp_path, capsys):
    from qmri_labels.estimators import QSMEstimator

    out = tmp_path / "out"
    code, err = run(["--field", qsm_data["field_path"], "--mask", qsm_data["mask_path"], "--estimator",
                     qsm_network_bundle, "--out", out, "--quiet"], capsys)
    assert code == 0, err
    # trained on 1 mm isotropic phantoms, applied to 1 x 1 x 2 mm data: it runs, and says so
    assert "trained at voxel size (1.0, 1.0, 1.0)" in err
    mask = qsm_data["mask"]
    expected = QSMEstimator.load(qsm_network_bundle).predict(qsm_data["field"] * mask, mask=mask,
                                                             voxel_size=QSM_VOXEL, b0_dir=(0, 0, 1), device="cpu")
    np.testing.assert_allclose(load_map(out, chi_map_name("sub-01"))[1], expected, atol=1e-6)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["estimator"]["kind"] == "network" and manifest["estimator"]["notes"]


def test_bundle_of_the_wrong_kind_is_refused(qsm_network_bundle, network_bundle, qsm_data, epstein_data, tmp_path,
                                             capsys):
    code, err = run(["--field", qsm_data["field_path"], "--mask", qsm_data["mask_path"], "--estimator",
                     network_bundle, "--out", tmp_path / "a"], capsys)
    assert code == 1 and "not a QSM U-Net" in err
    code, err = run(["--dwi", epstein_data["dwi"], "--bval", epstein_data["bval"], "--estimator", qsm_network_bundle,
                     "--out", tmp_path / "b"], capsys)
    assert code == 1 and "not a voxel-wise (diffusion) network" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_overwrite_never_replaces_a_folder_holding_the_inputs(ivim_data, capsys):
    folder = ivim_data["dwi"].parent
    code, err = run(["--dwi", ivim_data["dwi"], "--bval", ivim_data["bval"], "--out", folder, "--overwrite"], capsys)
    assert code == 1 and "holds the input" in err
    assert ivim_data["dwi"].exists() and ivim_data["bval"].exists()


@pytest.fixture(scope="module")
def qsm_head(tmp_path_factory):
    """One 40^3 head phantom given twice: its total field (brain + skull/air background) and its
    masked local field, from the same seed (same sources, same mask)."""
    from qmri_labels.data.qsm import QSMPhantomSpec

    folder = tmp_path_factory.mktemp("qsm_head")
    spec = QSMPhantomSpec(shape=(40, 40, 40), n=1, seed=5, noise_sigma=0.0)
    local = spec.generate()
    total = spec.replace(field_kind="total").generate()
    np.testing.assert_array_equal(local.mask, total.mask)
    affine = np.eye(4)
    paths = {}
    for name, array in (("total", total.fields[0, 0]), ("local", local.fields[0, 0])):
        paths[name] = save(folder / f"sub-01_{name}field.nii.gz", array.astype(np.float32), affine)
    paths["mask"] = save(folder / "brain_mask.nii.gz", local.mask[0].astype(np.uint8), affine)
    return {"paths": paths, "chi": local.chi[0], "mask": local.mask[0], "local": local.fields[0, 0],
            "total": total.fields[0, 0]}


def test_qsm_total_field_with_bfr_is_inverted_after_background_removal(qsm_head, tmp_path, capsys):
    import torch

    from qmri_labels.analysis.image_metrics import nrmse
    from qmri_labels.fitting import bfr, qsm_inversion

    paths = qsm_head["paths"]
    code, err = run(["--field", paths["total"], "--mask", paths["mask"], "--bfr", "vsharp", "--out", tmp_path / "bfr",
                     "--quiet"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "bfr" / "manifest.json").read_text())
    assert manifest["field"]["input_kind"] == "bfr:vsharp"
    assert manifest["field"]["background_field_removal"]["options"] == bfr.DEFAULTS["vsharp"]
    eroded_count = manifest["voxels"]["estimated"]
    assert 0 < eroded_count < qsm_head["mask"].sum()
    assert manifest["voxels"]["skipped"]["eroded_by_bfr"] == qsm_head["mask"].sum() - eroded_count
    chi = load_map(tmp_path / "bfr", chi_map_name("sub-01_totalfield"))[1]
    # the command is the library: V-SHARP, then TKD on the local field inside the eroded mask
    local, eroded = bfr.vsharp(qsm_head["total"], qsm_head["mask"], (1.0, 1.0, 1.0))
    eroded = np.asarray(eroded, bool)
    direct = qsm_inversion.tkd(torch.as_tensor(np.where(eroded, local, 0), dtype=torch.float32), voxel_size=(1, 1, 1),
                               b0_dir=(0, 0, 1), mask=torch.as_tensor(eroded), threshold=0.19).numpy()
    np.testing.assert_allclose(chi, np.where(eroded, direct, 0), atol=1e-5)
    assert int(eroded.sum()) == eroded_count and np.all(chi[~eroded] == 0)
    # without background removal, the background (about 10x the local field) ruins the map
    assert run(["--field", paths["total"], "--mask", paths["mask"], "--out", tmp_path / "raw", "--quiet"], capsys)[0] == 0
    raw = load_map(tmp_path / "raw", chi_map_name("sub-01_totalfield"))[1]
    truth = qsm_head["chi"]
    assert nrmse(chi, truth, eroded) < 0.5 * nrmse(raw, truth, eroded)


def test_qsm_tv_estimator_through_the_command(qsm_data, tmp_path, capsys):
    import torch

    from qmri_labels.fitting import qsm_inversion

    field, mask = qsm_data["field_path"], qsm_data["mask_path"]
    code, err = run(["--field", field, "--mask", mask, "--estimator", "tv", "--tv-lambda", "5e-4",
                     "--out", tmp_path / "tv", "--quiet"], capsys)
    assert code == 0, err
    chi = load_map(tmp_path / "tv", chi_map_name("sub-01"))[1]
    m = qsm_data["mask"]
    direct = qsm_inversion.tv(torch.as_tensor(qsm_data["field"] * m), torch.as_tensor(m), QSM_VOXEL, (0, 0, 1),
                              lam=5e-4).numpy()
    np.testing.assert_allclose(chi, np.where(m, direct, 0), atol=1e-5)
    assert np.corrcoef(chi[m], qsm_data["chi"][m])[0, 1] > 0.9
    assert json.loads((tmp_path / "tv" / "manifest.json").read_text())["estimator"]["options"] == {"lam": 5e-4}
    for argv, message in ((["--tv-lambda", "1e-3"], "--tv-lambda applies to --estimator tv only"),
                          (["--estimator", "tv", "--tv-lambda", "-1"], "must be a positive number"),
                          (["--allow-input-mismatch"], "applies to QSM networks only")):
        code, err = run(["--field", field, "--mask", mask, *argv, "--out", tmp_path / "bad", "--quiet"], capsys)
        assert code == 1 and message in err, (argv, err)
    assert not (tmp_path / "bad").exists()


def test_qsm_network_refuses_fields_unlike_its_training_inputs(qsm_network_bundle, qsm_head, tmp_path, capsys):
    from qmri_labels.estimators import QSMEstimator

    assert QSMEstimator.load(qsm_network_bundle).manifest_["input_kind"] == "local"
    paths = qsm_head["paths"]
    code, err = run(["--field", paths["total"], "--mask", paths["mask"], "--bfr", "sharp", "--estimator",
                     qsm_network_bundle, "--out", tmp_path / "refused"], capsys)
    assert code == 1 and "'local'" in err and "'bfr:sharp'" in err and "--allow-input-mismatch" in err
    assert not (tmp_path / "refused").exists()
    code, err = run(["--field", paths["total"], "--mask", paths["mask"], "--bfr", "sharp", "--estimator",
                     qsm_network_bundle, "--allow-input-mismatch", "--out", tmp_path / "forced", "--quiet"], capsys)
    assert code == 0, err
    estimator = json.loads((tmp_path / "forced" / "manifest.json").read_text())["estimator"]
    assert estimator["trained_input_kind"] == "local" and estimator["given_input_kind"] == "bfr:sharp"
    assert any("input mismatch allowed" in note for note in estimator["notes"])


def test_qsm_options_are_refused_with_diffusion_data(epstein_data, tmp_path, capsys):
    for argv in (["--bfr", "vsharp"], ["--tv-lambda", "1e-3"], ["--mat"], ["--allow-input-mismatch"]):
        code, err = run(["--dwi", epstein_data["dwi"], "--bval", epstein_data["bval"], *argv, "--out", tmp_path / "o"],
                        capsys)
        assert code == 1 and "is a QSM option" in err, (argv, err)
    assert not (tmp_path / "o").exists()
