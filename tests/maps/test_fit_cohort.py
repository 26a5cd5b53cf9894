"""``python -m qmri_labels.fit --cohort ... --shard I/N``: a small generated cohort mapped in shards."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from qmri_labels.cli import fit as fit_cli
from qmri_labels.cli.fit_cohort import SUMMARY_COLUMNS, summary_name
from qmri_labels.physics import get_model

B = np.array([0, 10, 20, 30, 50, 80, 100, 200, 400, 800.0])
SHAPE = (4, 3, 2)
SUBJECTS = ("sub-05", "sub-01", "sub-03", "sub-02", "sub-04")
SIGMA = "10"


def write_scan(folder, name, seed, shape=SHAPE, bvals=B):
    rng = np.random.default_rng(seed)
    theta = np.stack([rng.uniform(800, 1200, shape), rng.uniform(0.1, 0.3, shape),
                      rng.uniform(0.0008, 0.002, shape), rng.uniform(0.02, 0.08, shape)], -1)
    clean = get_model("ivim").forward(torch.tensor(theta), torch.tensor(bvals)).numpy()
    noisy = np.hypot(clean + 10 * rng.standard_normal(clean.shape), 10 * rng.standard_normal(clean.shape))
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(noisy.astype(np.float32), np.diag([2.0, 2.0, 3.0, 1.0])),
             str(folder / f"{name}_dwi.nii.gz"))
    np.savetxt(folder / f"{name}_dwi.bval", np.asarray(bvals)[None], fmt="%g")
    return folder / f"{name}_dwi.nii.gz"


def make_cohort(root):
    """Five BIDS-like scans (one with a session) plus a T1w that is not a diffusion series."""
    for i, sub in enumerate(SUBJECTS):
        session = "ses-1/" if sub == "sub-03" else ""
        write_scan(root / sub / f"{session}dwi", f"{sub}_{session[:-1]}" if session else sub, seed=i)
    (root / "sub-01" / "anat").mkdir()
    (root / "sub-01" / "anat" / "sub-01_T1w.nii.gz").write_bytes(b"not a dwi")
    return root


NAMES = sorted(["sub-01/dwi/sub-01", "sub-02/dwi/sub-02", "sub-03/ses-1/dwi/sub-03_ses-1", "sub-04/dwi/sub-04",
                "sub-05/dwi/sub-05"])


def run(argv, capsys=None):
    code = fit_cli.main([str(a) for a in argv] + ["--quiet"])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def read_summary(path):
    lines = path.read_text().splitlines()
    assert tuple(lines[0].split("\t")) == SUMMARY_COLUMNS
    return [dict(zip(SUMMARY_COLUMNS, line.split("\t"))) for line in lines[1:]]


def arrays(folder):
    """``{relative path: (dtype, shape, raw bytes)}`` of every NIfTI image below ``folder``."""
    out = {}
    for path in sorted(folder.rglob("*.nii.gz")):
        data = np.asarray(nib.load(str(path)).dataobj)
        out[str(path.relative_to(folder))] = (data.dtype, data.shape, data.tobytes())
    return out


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture(scope="module")
def unsharded(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "all"
    code, _ = run(["--cohort", cohort, "--sigma", SIGMA, "--out", out])
    assert code == 0
    return out


def test_unsharded_run_maps_every_scan_into_its_folder(cohort, unsharded):
    rows = read_summary(unsharded / summary_name(0, 1))
    assert [r["scan"] for r in rows] == NAMES and {r["status"] for r in rows} == {"mapped"}
    assert all(int(r["voxels_estimated"]) == int(np.prod(SHAPE)) for r in rows)
    for name in NAMES:
        folder = unsharded / name
        prefix = name.rsplit("/", 1)[1]
        assert (folder / f"{prefix}_model-ivim_param-D_dwimap.nii.gz").is_file()
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["cohort"]["scan"] == name and manifest["cohort"]["shard"] == "0/1"
        assert set(manifest["output_sha256"]) == set(manifest["outputs"]) - {"manifest.json"}
        assert manifest["inputs"]["dwi"]["path"].endswith(f"{prefix}_dwi.nii.gz")
    # the T1w is not a scan; nothing else was written at the top
    assert sorted(p.name for p in unsharded.iterdir()) == ["sub-01", "sub-02", "sub-03", "sub-04", "sub-05",
                                                          summary_name(0, 1)]


@pytest.mark.parametrize("count", [2, 3])
def test_shards_split_the_cohort_and_give_the_unsharded_maps(count, cohort, unsharded, tmp_path):
    out = tmp_path / "sharded"
    done = []
    for index in range(count):
        code, _ = run(["--cohort", cohort, "--shard", f"{index}/{count}", "--sigma", SIGMA, "--out", out])
        assert code == 0
        rows = read_summary(out / summary_name(index, count))
        assert {r["status"] for r in rows} == {"mapped"}
        done += [r["scan"] for r in rows]
    # every scan by exactly one shard, and the shards' sizes differ by at most one
    assert sorted(done) == NAMES and len(set(done)) == len(NAMES)
    sizes = [len(read_summary(out / summary_name(i, count))) for i in range(count)]
    assert max(sizes) - min(sizes) <= 1
    expected = arrays(unsharded)
    got = arrays(out)
    assert set(got) == set(expected) and len(got) == len(NAMES) * 5  # 4 maps + status per scan
    for key in expected:
        assert got[key] == expected[key], key  # byte-identical arrays


def test_rerun_skips_verified_scans_and_redoes_a_corrupted_or_changed_one(cohort, unsharded, tmp_path, capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(unsharded, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.suffix != ".tsv"}
    code, _ = run(["--cohort", cohort, "--sigma", SIGMA, "--out", out], capsys)
    assert code == 0
    assert {r["status"] for r in read_summary(out / summary_name(0, 1))} == {"skipped"}
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing rewritten

    # a job killed while mapping sub-02 left its hidden staging folder: removed on the rerun;
    # another name's is not this scan's to remove
    stale = out / "sub-02" / "dwi" / ".sub-02.abc123_x.tmp"
    other = out / "sub-02" / "dwi" / ".sub-02x.abc123_x.tmp"
    for folder in (stale, other):
        folder.mkdir()
        (folder / "partial.nii.gz").write_bytes(b"half")
    # a damaged map (truncated, as by a job killed while copying) and a deleted QC figure
    damaged = out / NAMES[1] / "sub-02_model-ivim_param-f_dwimap.nii.gz"
    damaged.write_bytes(damaged.read_bytes()[:100])
    (out / NAMES[3] / "sub-04_qc.png").unlink()
    code, _ = run(["--cohort", cohort, "--sigma", SIGMA, "--out", out], capsys)
    assert code == 0
    status = {r["scan"]: r["status"] for r in read_summary(out / summary_name(0, 1))}
    assert status == {n: ("mapped" if n in (NAMES[1], NAMES[3]) else "skipped") for n in NAMES}
    assert not stale.exists() and other.exists()
    other.joinpath("partial.nii.gz").unlink()
    other.rmdir()
    assert arrays(out) == arrays(unsharded)

    # other settings are not the verified result: mapped again, with SD maps this time
    code, _ = run(["--cohort", cohort, "--shard", "0/1", "--sigma", SIGMA, "--uncertainty", "--out", out], capsys)
    assert code == 0
    assert {r["status"] for r in read_summary(out / summary_name(0, 1))} == {"mapped"}
    assert (out / NAMES[0] / "sub-01_model-ivim_param-D_desc-sd_dwimap.nii.gz").is_file()
    # a changed input is mapped again
    write_scan(cohort / "sub-04" / "dwi", "sub-04", seed=99)
    try:
        code, _ = run(["--cohort", cohort, "--sigma", SIGMA, "--uncertainty", "--out", out], capsys)
        status = {r["scan"]: r["status"] for r in read_summary(out / summary_name(0, 1))}
        assert status == {n: ("mapped" if n == NAMES[3] else "skipped") for n in NAMES}
    finally:
        write_scan(cohort / "sub-04" / "dwi", "sub-04", seed=SUBJECTS.index("sub-04"))
    # --overwrite maps every scan again
    code, _ = run(["--cohort", cohort, "--sigma", SIGMA, "--uncertainty", "--overwrite", "--out", out], capsys)
    assert {r["status"] for r in read_summary(out / summary_name(0, 1))} == {"mapped"}


def test_list_file_with_masks_and_a_failing_scan(tmp_path, capsys):
    write_scan(tmp_path / "data", "a", seed=1)
    write_scan(tmp_path / "data", "b", seed=2)
    (tmp_path / "data" / "b_dwi.bval").write_text("0 10 20\n")  # three b-values for ten volumes
    mask = np.zeros(SHAPE, np.uint8)
    mask[:2] = 1
    nib.save(nib.Nifti1Image(mask, np.diag([2.0, 2.0, 3.0, 1.0])), str(tmp_path / "data" / "a_mask.nii.gz"))
    listing = tmp_path / "scans.txt"
    listing.write_text("# two scans\ndata/a_dwi.nii.gz data/a_mask.nii.gz\ndata/b_dwi.nii.gz\n")
    out = tmp_path / "out"
    code, err = run(["--cohort", listing, "--sigma", SIGMA, "--out", out], capsys)
    assert code == 1  # a scan failed; the other was mapped
    rows = {r["scan"]: r for r in read_summary(out / summary_name(0, 1))}
    assert rows["data/a"]["status"] == "mapped" and int(rows["data/a"]["voxels_in_mask"]) == int(mask.sum())
    assert rows["data/b"]["status"] == "failed" and "3 b-values" in rows["data/b"]["message"]
    assert "data/b" in err and "3 b-values" in err
    assert not (out / "data" / "b").exists() and not [p for p in (out / "data").iterdir() if p.name.startswith(".")]
    d_map = np.asarray(nib.load(str(out / "data" / "a" / "a_model-ivim_param-D_dwimap.nii.gz")).dataobj)
    assert np.all(d_map[2:] == 0) and np.all(d_map[:2] > 0)
    # a rerun after the fix maps only the failed scan
    np.savetxt(tmp_path / "data" / "b_dwi.bval", B[None], fmt="%g")
    code, err = run(["--cohort", listing, "--sigma", SIGMA, "--out", out], capsys)
    assert code == 0, err
    assert {r["scan"]: r["status"] for r in read_summary(out / summary_name(0, 1))} == {"data/a": "skipped",
                                                                                        "data/b": "mapped"}


@pytest.mark.parametrize("argv, message", [
    (["--shard", "2/2"], "0 <= I < N"),
    (["--shard=-1/2"], "0 <= I < N"),
    (["--shard", "1/0"], "N >= 1"),
    (["--shard", "1"], "--shard must be I/N"),
    (["--shard", "a/b"], "--shard must be I/N"),
    (["--shard", "1/2/3"], "--shard must be I/N"),
    (["--dwi", "x_dwi.nii.gz"], "--dwi does not apply to --cohort"),
    (["--mask", "m.nii.gz"], "--mask does not apply to --cohort"),
    (["--prefix", "p"], "--prefix does not apply to --cohort"),
    (["--model", "qsm"], "QSM takes one --field"),
])
def test_bad_cohort_options_are_refused(argv, message, cohort, tmp_path, capsys):
    code, err = run(["--cohort", cohort, *argv, "--out", tmp_path / "out"], capsys)
    assert code == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_shard_without_cohort_and_a_missing_cohort(tmp_path, capsys):
    code, err = run(["--shard", "0/2", "--out", tmp_path / "out"], capsys)
    assert code == 1 and "--shard needs --cohort" in err
    code, err = run(["--cohort", tmp_path / "missing", "--out", tmp_path / "out"], capsys)
    assert code == 1 and "neither a folder nor a list file" in err
    (tmp_path / "empty").mkdir()
    code, err = run(["--cohort", tmp_path / "empty", "--out", tmp_path / "out"], capsys)
    assert code == 1 and "no *_dwi.nii.gz scans" in err
    assert not (tmp_path / "out").exists()


def test_a_scan_folder_inside_another_is_refused(tmp_path, capsys):
    write_scan(tmp_path / "data", "a", seed=1)
    write_scan(tmp_path / "data" / "a", "x", seed=2)
    listing = tmp_path / "scans.txt"
    listing.write_text("data/a_dwi.nii.gz\ndata/a/x_dwi.nii.gz\n")
    code, err = run(["--cohort", listing, "--sigma", SIGMA, "--out", tmp_path / "out"], capsys)
    assert code == 1 and "'data/a' and 'data/a/x'" in err and "inside the other's" in err
    assert not (tmp_path / "out").exists()
