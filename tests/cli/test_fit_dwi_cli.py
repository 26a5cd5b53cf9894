"""End-to-end runs of ``python -m qmri_labels.fit`` on small simulated diffusion volumes with the
MLE: maps, manifests, sidecars, noise estimates, bad input."""

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
from qmri_labels.cli import fit_dwi
from qmri_labels.maps.derivatives import sd_map_name, status_map_name
from qmri_labels.physics import get_model

from fit_cli_data import SHAPE, BVALS, simulate, save, run, assert_no_leftovers, pname, load_map


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


def test_overwrite_never_replaces_a_folder_holding_the_inputs(ivim_data, capsys):
    folder = ivim_data["dwi"].parent
    code, err = run(["--dwi", ivim_data["dwi"], "--bval", ivim_data["bval"], "--out", folder, "--overwrite"], capsys)
    assert code == 1 and "holds the input" in err
    assert ivim_data["dwi"].exists() and ivim_data["bval"].exists()
