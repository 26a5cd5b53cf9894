"""Cohort discovery, shard selection and verified outputs (the fit command's cohort mode)."""

import pytest

from qmri_labels.maps.cohort import discover_scans, output_checksums, outputs_verified, parse_shard, select_shard
from qmri_labels.fileio import write_json


def make_cohort(root, subjects=("sub-03", "sub-01", "sub-02"), bvec=True):
    for sub in subjects:
        folder = root / sub / "dwi"
        folder.mkdir(parents=True)
        (folder / f"{sub}_dwi.nii.gz").write_bytes(sub.encode())
        (folder / f"{sub}_dwi.bval").write_text("0 10 20\n")
        if bvec:
            (folder / f"{sub}_dwi.bvec").write_text("1 0 0\n0 1 0\n0 0 1\n")
    return root


def test_folder_discovery_is_sorted_and_pairs_each_series_with_its_bval(tmp_path):
    make_cohort(tmp_path)
    (tmp_path / "sub-01" / "anat").mkdir()
    (tmp_path / "sub-01" / "anat" / "sub-01_T1w.nii.gz").write_bytes(b"x")  # not a diffusion series
    scans = discover_scans(tmp_path)
    assert [s.name for s in scans] == ["sub-01/dwi/sub-01", "sub-02/dwi/sub-02", "sub-03/dwi/sub-03"]
    assert scans[0].bval == tmp_path / "sub-01" / "dwi" / "sub-01_dwi.bval"
    assert scans[0].bvec.name == "sub-01_dwi.bvec" and scans[0].mask is None


def test_a_series_without_bval_or_an_empty_folder_is_an_error(tmp_path):
    make_cohort(tmp_path)
    (tmp_path / "sub-02" / "dwi" / "sub-02_dwi.bval").unlink()
    with pytest.raises(ValueError, match="sub-02_dwi.nii.gz: no b-value file sub-02_dwi.bval"):
        discover_scans(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*_dwi.nii.gz scans"):
        discover_scans(tmp_path / "empty")
    with pytest.raises(ValueError, match="neither a folder nor a list file"):
        discover_scans(tmp_path / "missing")


def test_list_file_with_relative_paths_masks_and_comments(tmp_path):
    make_cohort(tmp_path / "data")
    (tmp_path / "data" / "m.nii.gz").write_bytes(b"m")
    listing = tmp_path / "cohort.txt"
    listing.write_text("# my cohort\ndata/sub-02/dwi/sub-02_dwi.nii.gz data/m.nii.gz\n\n"
                       "data/sub-01/dwi/sub-01_dwi.nii.gz  # no mask\n")
    scans = discover_scans(listing)
    assert [s.name for s in scans] == ["data/sub-01/dwi/sub-01", "data/sub-02/dwi/sub-02"]
    assert scans[1].mask == tmp_path / "data" / "m.nii.gz" and scans[0].mask is None
    listing.write_text("data/sub-09/dwi/sub-09_dwi.nii.gz\n")
    with pytest.raises(ValueError, match="line 1: .*sub-09_dwi.nii.gz does not exist"):
        discover_scans(listing)
    listing.write_text("data/sub-01/dwi/sub-01_dwi.nii.gz\ndata/sub-01/dwi/sub-01_dwi.nii.gz\n")
    with pytest.raises(ValueError, match="several scans named"):
        discover_scans(listing)


@pytest.mark.parametrize("n_scans, count", [(7, 3), (3, 5), (10, 1)])
def test_shards_are_disjoint_balanced_and_cover_every_scan(tmp_path, n_scans, count):
    scans = discover_scans(make_cohort(tmp_path, subjects=[f"sub-{i:02d}" for i in range(n_scans)]))
    shards = [select_shard(scans, i, count) for i in range(count)]
    names = [s.name for shard in shards for s in shard]
    assert sorted(names) == [s.name for s in scans] and len(set(names)) == n_scans
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    # the same shard whatever order the scans come in
    assert select_shard(list(reversed(scans)), count - 1, count) == shards[-1]


def test_parse_shard():
    assert parse_shard("0/4") == (0, 4) and parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "-1/4", "1/0", "1", "a/b", "1/2/3"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_only_a_complete_intact_result_counts_as_done(tmp_path):
    inputs = tmp_path / "dwi.nii.gz"
    inputs.write_bytes(b"series")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_f.nii.gz").write_bytes(b"map f")
    (out / "a_qc.png").write_bytes(b"png")
    outputs = {"a_f.nii.gz": "f map", "a_qc.png": "QC", "manifest.json": "this file"}
    manifest = {"outputs": outputs, "inputs": {"dwi": {"sha256": output_checksums(tmp_path, ["dwi.nii.gz"])[
        "dwi.nii.gz"]}}, "output_sha256": output_checksums(out, ["a_f.nii.gz", "a_qc.png"])}
    write_json(out / "manifest.json", manifest)
    assert outputs_verified(out) and outputs_verified(out, {"dwi": inputs})
    # the input changed since: map it again
    inputs.write_bytes(b"another series")
    assert not outputs_verified(out, {"dwi": inputs}) and outputs_verified(out)
    # a truncated or missing output, or an output without a checksum
    (out / "a_f.nii.gz").write_bytes(b"map")
    assert not outputs_verified(out)
    (out / "a_f.nii.gz").write_bytes(b"map f")
    (out / "a_qc.png").unlink()
    assert not outputs_verified(out)
    (out / "a_qc.png").write_bytes(b"png")
    write_json(out / "manifest.json", {**manifest, "output_sha256": {"a_f.nii.gz": manifest["output_sha256"]["a_f.nii.gz"]}})
    assert not outputs_verified(out)
    # no manifest, or one that does not parse
    (out / "manifest.json").write_text("{")
    assert not outputs_verified(out)
    assert not outputs_verified(tmp_path / "nothing")
