"""What a rerun of ``volseg run`` recomputes: exactly the outputs a changed model, calibration or
setting affects (per-output fingerprints in each scan's record)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from test_cohort import FAST_YAML, _snapshot, write_head

# anomaly needs n4 + strip; a 4 mm head keeps it fast
ALL = "n4,strip,anomaly"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    (root / "in").mkdir()
    write_head(root / "in" / "sub-01_T1w.nii.gz", 41)
    write_head(root / "in" / "sub-02_T1w.nii.gz", 42)
    (root / "fast.yaml").write_text(FAST_YAML)
    return root


def _model_copy(dst: Path, voxel_threshold: float | None = None, scan_threshold: float | None = None) -> Path:
    from volseg.nets.folder import PACKAGE_MODELS

    shutil.copytree(PACKAGE_MODELS / "ae", dst)
    cal = json.loads((dst / "calibration.json").read_text())
    if voxel_threshold is not None:
        cal["voxel_threshold"] = voxel_threshold
    if scan_threshold is not None:
        cal["scan_threshold"] = scan_threshold
    (dst / "calibration.json").write_text(json.dumps(cal))
    return dst


def _record(out: Path, prefix: str) -> dict:
    return json.loads((out / ".volseg" / "scans" / f"{prefix}.json").read_text())


def test_rerun_after_recalibration_rewrites_the_flags_and_nothing_else(run_cli, cohort, tmp_path):
    out = tmp_path / "deriv"
    model = _model_copy(tmp_path / "ae")
    res = run_cli("run", cohort / "in", "-o", out, "--stages", ALL, "-c", cohort / "fast.yaml",
                  "--anomaly-model", model)
    assert res.returncode == 0, res.stderr
    before = _snapshot(out)
    rec0 = _record(out, "sub-01")
    score = rec0["measures"]["anomaly_score"]
    anat = out / "sub-01" / "anat"
    amap = np.asarray(nib.load(anat / "sub-01_desc-anomaly_map.nii.gz").dataobj)
    brain = np.asarray(nib.load(anat / "sub-01_desc-brain_mask.nii.gz").dataobj) > 0
    inside = amap[brain]
    # a calibration that flags sub-01 and marks a known share of its map: thresholds between values
    vthr = float(np.quantile(inside, 0.9))
    _model_copy(tmp_path / "ae2", voxel_threshold=vthr, scan_threshold=score / 2)
    shutil.rmtree(model)
    shutil.move(tmp_path / "ae2", model)

    res = run_cli("run", cohort / "in", "-o", out, "--stages", ALL, "-c", cohort / "fast.yaml",
                  "--anomaly-model", model)
    assert res.returncode == 0, res.stderr
    after = _snapshot(out)
    changed = {k for k in after if before.get(k) != after[k]}
    rewritten = {Path(k).name for k in changed if not k.startswith((".volseg", "volseg_", "report", "logs"))}
    expect = {f"{p}_{s}" for p in ("sub-01", "sub-02")
              for s in ("label-anomaly_mask.nii.gz", "label-anomaly_mask.json", "desc-anomaly_map.json",
                        "desc-anomaly_qc.png")}
    assert rewritten == expect
    rec1 = _record(out, "sub-01")
    assert rec1["measures"]["anomaly_score"] == score  # the map was not recomputed
    assert rec1["measures"]["anomaly_flag"] is True
    assert rec1["refreshed"] == "anomaly_mask"
    new_mask = np.asarray(nib.load(anat / "sub-01_label-anomaly_mask.nii.gz").dataobj) > 0
    assert np.array_equal(new_mask, (amap > vthr) & brain)
    side = json.loads((anat / "sub-01_desc-anomaly_map.json").read_text())
    assert side["AnomalyFlag"] is True and side["Anomaly"]["VoxelThreshold"] == pytest.approx(vthr)
    # the summary table follows the new flags
    rows = (out / "volseg_summary.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    row = dict(zip(header, next(r for r in rows if r.startswith("sub-01") or "\tsub-01\t" in r).split("\t")))
    assert row["anomaly_flag"] in ("True", "true", "1")

    # and a third run with nothing changed rewrites nothing
    before = _snapshot(out)
    res = run_cli("run", cohort / "in", "-o", out, "--stages", ALL, "-c", cohort / "fast.yaml",
                  "--anomaly-model", model)
    assert res.returncode == 0, res.stderr
    assert {k for k, v in _snapshot(out).items() if before.get(k) != v and not k.startswith(("logs",))} <= {
        "report.html", "volseg_summary.tsv", "volseg_failures.tsv"} | {
        k for k in before if k.startswith(".volseg")} and _record(out, "sub-01") == rec1


def test_a_changed_strip_setting_recomputes_the_masks(run_cli, cohort, tmp_path):
    out = tmp_path / "deriv"
    args = ("run", cohort / "in", "-o", out, "--stages", "n4,strip", "-c", cohort / "fast.yaml")
    assert run_cli(*args).returncode == 0
    mask = out / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz"
    v0 = int(np.asarray(nib.load(mask).dataobj).sum())
    fp0 = _record(out, "sub-01")["fingerprints"]
    res = run_cli(*args, "--border", "4")
    assert res.returncode == 0, res.stderr
    v1 = int(np.asarray(nib.load(mask).dataobj).sum())
    fp1 = _record(out, "sub-01")["fingerprints"]
    assert v1 > v0  # recomputed with the grown border
    assert fp1["preproc"] == fp0["preproc"] and fp1["mask"] != fp0["mask"]


def test_an_empty_input_folder_fails_alone(run_cli, cohort, tmp_path):
    """An input folder without scans, among other inputs, is one failed input; the rest finish."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no scans here")
    out = tmp_path / "deriv"
    res = run_cli("run", empty, cohort / "in" / "sub-01_T1w.nii.gz", "-o", out, "--stages", "n4,strip",
                  "-c", cohort / "fast.yaml")
    assert res.returncode != 0  # a failed input makes the run's exit status say so
    assert (out / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz").exists()
    failures = (out / "volseg_failures.tsv").read_text().splitlines()
    assert len(failures) == 2 and str(empty) in failures[1] and "no scans" in failures[1]
    assert "inputs" in failures[1].split("\t")
    assert sum(str(empty) in ln and "no scans" in ln for ln in res.stderr.splitlines()) >= 1


def test_a_new_anomaly_setting_reruns_the_anomaly_stage_alone(run_cli, cohort, tmp_path):
    """A changed map setting of the anomaly model: the rerun reads back the N4 image and brain
    mask, rewrites only the anomaly outputs, and they equal those of a fresh run."""
    head = cohort / "in" / "sub-01_T1w.nii.gz"
    model = _model_copy(tmp_path / "ae")
    out = tmp_path / "deriv"
    args = ("run", head, "-o", out, "--stages", ALL, "-c", cohort / "fast.yaml", "--anomaly-model", model)
    assert run_cli(*args).returncode == 0
    before = _snapshot(out)
    info = json.loads((model / "model.json").read_text())
    assert info["config"]["maps"]["median_size"] != 3
    info["config"]["maps"]["median_size"] = 3  # settings live beside the weights; their checksum is unchanged
    (model / "model.json").write_text(json.dumps(info))

    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    changed = {Path(k).name for k, v in _snapshot(out).items()
               if before.get(k) != v and not k.startswith((".volseg", "volseg_", "report"))}
    assert changed == {f"sub-01_{s}" for s in ("desc-anomaly_map.nii.gz", "desc-anomaly_map.json",
                                               "label-anomaly_mask.nii.gz", "label-anomaly_mask.json",
                                               "desc-anomaly_qc.png")}
    rec = _record(out, "sub-01")
    assert rec["refreshed"] == "anomaly" and "n4_s" in rec["timings"]

    fresh = tmp_path / "fresh"
    assert run_cli("run", head, "-o", fresh, "--stages", ALL, "-c", cohort / "fast.yaml",
                   "--anomaly-model", model).returncode == 0
    name = "sub-01/anat/sub-01_desc-anomaly_map.nii.gz"
    rerun_map = np.asarray(nib.load(out / name).dataobj)
    np.testing.assert_allclose(rerun_map, np.asarray(nib.load(fresh / name).dataobj), atol=1e-5)
    assert rec["measures"]["anomaly_score"] == pytest.approx(_record(fresh, "sub-01")["measures"]["anomaly_score"],
                                                             abs=1e-5)
    side = json.loads((out / name.replace(".nii.gz", ".json")).read_text())
    assert side["Anomaly"]["Maps"]["median_size"] == 3
