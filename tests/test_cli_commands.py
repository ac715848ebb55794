"""The commands end to end through the installed ``volseg`` script, outputs read back with nibabel:
calibrate -> anomaly --model, evaluate anomaly, anomaly without --mask, run with the anomaly
stage, strip --border/--tta.

A tiny random-weight autoencoder (no N4 in its maps) keeps the anomaly commands quick; the
skull stripping is the shipped network, with a fast N4 setting where the command takes -c.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from test_cohort import fast_cfg  # noqa: F401  (a fixture)
from volseg.nets.folder import PACKAGE_MODELS



def _save(arr, affine, path: Path) -> Path:
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def _head(path: Path, seed: int, voxel: float, brain_only: bool = False) -> Path:
    """A synthetic T1 head (or its brain only, 0 outside) at ``voxel`` mm."""
    from volseg.synth import synth_head

    subj = synth_head(seed, voxel_size=voxel)
    arr = np.where(subj.brain_mask > 0, subj.image, 0) if brain_only else subj.image
    return _save(arr.astype(np.float32), subj.affine, path)


def _outputs(stdout: str) -> list[Path]:
    """The output paths that strip/anomaly print, one ``INPUT -> OUTPUT ...`` line per scan."""
    return [Path(m.group(1)) for m in re.finditer(r" -> (\S+\.nii\.gz)", stdout)]


def _sidecar(image: Path) -> dict:
    return json.loads(Path(str(image).removesuffix(".nii.gz") + ".json").read_text())


def _same_grid(img, ref) -> None:
    assert img.shape == ref.shape
    np.testing.assert_allclose(img.affine, ref.affine, atol=1e-4)


def _one_error_line(res, *names) -> None:
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and all(n in lines[0] for n in names), res.stderr


@pytest.fixture(scope="module")
def calibrated(run_cli, tiny_ae, tmp_path_factory):
    """``volseg calibrate --model TINY --synth 2 -o DIR``: (DIR, the finished process)."""
    dest = tmp_path_factory.mktemp("calibrated") / "site_model"
    res = run_cli("calibrate", "--model", tiny_ae, "--synth", 2, "-o", dest, "--device", "cpu")
    assert res.returncode == 0, res.stderr[-3000:]
    return dest, res


def test_calibrate_writes_a_model_folder_that_anomaly_uses(run_cli, calibrated, tiny_ae, tmp_path):
    dest, res = calibrated
    assert {"model.safetensors", "model.json", "calibration.json"} <= {p.name for p in dest.iterdir()}
    assert not (tiny_ae / "calibration.json").exists()  # the source folder is left alone
    calib = json.loads((dest / "calibration.json").read_text())
    info = json.loads((dest / "model.json").read_text())
    for key in ("voxel_threshold", "scan_threshold"):
        assert math.isfinite(calib[key]) and calib[key] > 0, (key, calib[key])
    assert calib["model_sha256"] == info["sha256"] == json.loads((tiny_ae / "model.json").read_text())["sha256"]
    assert len(calib["healthy_scans"]) == 2 and all(k.startswith("synth") for k in calib["healthy_scans"])
    assert f"voxel threshold {calib['voxel_threshold']:.4f}" in res.stdout
    assert f"scan threshold {calib['scan_threshold']:.4f}" in res.stdout and str(dest) in res.stdout

    brain = _head(tmp_path / "sub-probe_T1w.nii.gz", 320, 3.0, brain_only=True)
    r = run_cli("anomaly", brain, "--mask", brain, "--model", dest, "-o", tmp_path / "out", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    [amap] = _outputs(r.stdout)
    side = _sidecar(amap)
    assert side["VoxelThreshold"] == pytest.approx(calib["voxel_threshold"])
    assert side["ScanThreshold"] == pytest.approx(calib["scan_threshold"])
    assert side["Anomalous"] == (side["ScanScore"] > calib["scan_threshold"])
    img, src = nib.load(amap), nib.load(brain)
    _same_grid(img, src)
    a = np.asarray(img.dataobj)
    assert np.isfinite(a).all() and (a[np.asarray(src.dataobj) == 0] == 0).all() and a.max() > 0
    amask = np.asarray(nib.load(amap.parent / amap.name.replace("_desc-anomaly_map", "_label-anomaly_mask")).dataobj)
    np.testing.assert_array_equal(amask > 0, a > calib["voxel_threshold"])


def test_calibrate_maps_sets_a_multiscale_map_that_anomaly_then_uses(run_cli, tiny_ae, tmp_path):
    dest = tmp_path / "ms_model"
    res = run_cli("calibrate", "--model", tiny_ae, "--synth", 2, "-o", dest, "--device", "cpu",
                  "--maps", "residual=signed", "--maps", "median_sizes=[3, 5, 3]", "--maps", "scale_steps=[1, 1, 2]")
    assert res.returncode == 0, res.stderr[-3000:]
    maps = json.loads((dest / "model.json").read_text())["config"]["maps"]
    assert maps["residual"] == "signed" and maps["median_sizes"] == [3, 5, 3] and maps["scale_steps"] == [1, 1, 2]
    assert not json.loads((tiny_ae / "model.json").read_text())["config"]["maps"].get("median_sizes")  # source untouched
    gains = json.loads((dest / "calibration.json").read_text())["scale_gains"]
    assert set(gains) == {"3", "5", "3x2"} and gains["3"] == 1.0 and gains["5"] > 0 and gains["3x2"] > 0
    brain = _head(tmp_path / "sub-probe_T1w.nii.gz", 320, 3.0, brain_only=True)
    r = run_cli("anomaly", brain, "--mask", brain, "--model", dest, "-o", tmp_path / "out", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    side = _sidecar(_outputs(r.stdout)[0])
    assert side["Maps"]["median_sizes"] == [3, 5, 3] and side["ScaleGains"] == pytest.approx(gains)
    bad = run_cli("calibrate", "--model", tiny_ae, "--synth", 1, "-o", tmp_path / "bad", "--device", "cpu",
                  "--maps", "residual=sideways")
    _one_error_line(bad, "residual")
    assert not (tmp_path / "bad").exists()
    bad = run_cli("calibrate", "--model", tiny_ae, "--synth", 1, "-o", tmp_path / "bad", "--device", "cpu",
                  "--maps", "median_sizes=[3, 5]", "--maps", "scale_steps=[1]")
    _one_error_line(bad, "scale_steps")
    assert not (tmp_path / "bad").exists()


def test_calibrate_without_output_refuses_the_shipped_model(run_cli):
    shipped = PACKAGE_MODELS / "ae"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in shipped.iterdir())
    res = run_cli("calibrate", "--synth", 1, "--device", "cpu")
    _one_error_line(res, "volseg calibrate: error:", "give -o DIR")
    assert res.returncode == 2 and res.stdout == ""
    assert sorted((p.name, p.stat().st_mtime_ns) for p in shipped.iterdir()) == before


def test_an_uncalibrated_model_is_refused_in_one_line(run_cli, tiny_ae, tiny_head, tmp_path):
    image, mask = tiny_head
    res = run_cli("anomaly", image, "--mask", mask, "--model", tiny_ae, "-o", tmp_path / "out")
    _one_error_line(res, "volseg anomaly: error:", str(tiny_ae), "calibrat")
    assert res.returncode == 1


def test_evaluate_anomaly_on_inserted_lesions(run_cli, calibrated, tmp_path):
    dest, _ = calibrated
    brain = _head(tmp_path / "sub-held_T1w.nii.gz", 340, 3.0, brain_only=True)
    out = tmp_path / "eval"
    res = run_cli("evaluate", "anomaly", "--healthy", brain, "--insert-lesions", 2, "--seed", 5, "--no-panels",
                  "--model", dest, "-o", out, "--device", "cpu")
    assert res.returncode == 0, res.stderr[-3000:]
    with open(out / "anomaly_cases.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert [r["id"] for r in rows] == ["sub-held_healthy", "sub-held_lesions5", "sub-held_lesions6"]
    assert rows[0]["lesion_voxels"] == "0" and all(int(r["lesion_voxels"]) > 0 for r in rows[1:])
    for r in rows[1:]:
        assert 0 <= float(r["auroc"]) <= 1 and 0 <= float(r["auprc"]) <= 1
    summary = json.loads((out / "anomaly_metrics.json").read_text())
    calib = json.loads((dest / "calibration.json").read_text())
    assert summary["cases"] == 3 and summary["lesion_cases"] == 2
    assert summary["voxel_threshold"] == pytest.approx(calib["voxel_threshold"])
    assert f"AUROC {summary['voxel']['auroc']:.4f}" in res.stdout
    assert "pooled over 2 lesion cases" in res.stdout
    assert not (out / "panels").exists() or not any((out / "panels").iterdir())


def test_anomaly_without_mask_skull_strips_first(run_cli, calibrated, tiny_head, tmp_path):
    from scipy import ndimage as ndi

    dest, _ = calibrated
    image, truth = tiny_head
    res = run_cli("anomaly", image, "--model", dest, "-o", tmp_path / "out", "--device", "cpu")
    assert res.returncode == 0, res.stderr[-3000:]
    [amap] = _outputs(res.stdout)
    src, img = nib.load(image), nib.load(amap)
    _same_grid(img, src)
    a = np.asarray(img.dataobj)
    brain = np.asarray(nib.load(truth).dataobj) > 0
    near = ndi.binary_dilation(brain, iterations=2)  # the stripped brain, give or take a 4 mm voxel
    assert (a[~near] == 0).all()  # 0 outside the brain: scalp, skull and background untouched
    assert (a[brain] > 0).mean() > 0.5
    side = _sidecar(amap)
    assert math.isfinite(side["ScanScore"]) and side["Sources"][0].endswith(image.name)
    assert side["VoxelThreshold"] == pytest.approx(json.loads((dest / "calibration.json").read_text())
                                                   ["voxel_threshold"])


def test_run_with_the_anomaly_stage(run_cli, calibrated, fast_cfg, tmp_path):
    dest, _ = calibrated
    calib = json.loads((dest / "calibration.json").read_text())
    root = tmp_path / "bids"
    (root).mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    heads = {sub: _head(root / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz", seed, 4.0)
             for sub, seed in (("01", 41), ("02", 42))}
    out = tmp_path / "deriv"
    res = run_cli("run", root, "-o", out, "--stages", "n4,strip,anomaly", "--anomaly-model", dest, "-c", fast_cfg,
                  "--no-report", "--device", "cpu")
    assert res.returncode == 0, res.stderr[-3000:]
    for sub, head in heads.items():
        anat = out / f"sub-{sub}" / "anat"
        src = nib.load(head)
        amap = nib.load(anat / f"sub-{sub}_desc-anomaly_map.nii.gz")
        amask = nib.load(anat / f"sub-{sub}_label-anomaly_mask.nii.gz")
        brain = np.asarray(nib.load(anat / f"sub-{sub}_desc-brain_mask.nii.gz").dataobj) > 0
        for img in (amap, amask):
            _same_grid(img, src)
        a, m = np.asarray(amap.dataobj), np.asarray(amask.dataobj) > 0
        assert brain.any() and (a[~brain] == 0).all() and a[brain].max() > 0
        assert not (m & ~brain).any()
        side = json.loads((anat / f"sub-{sub}_desc-anomaly_map.json").read_text())
        assert side["Anomaly"]["VoxelThreshold"] == pytest.approx(calib["voxel_threshold"])
    with open(out / "volseg_summary.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert sorted(r["subject"].removeprefix("sub-") for r in rows) == ["01", "02"]
    for r in rows:
        assert r["status"] == "ok"
        score = float(r["anomaly_score"])
        assert math.isfinite(score) and score >= 0
        assert r["anomaly_flag"] in ("true", "false")
        if abs(score - calib["scan_threshold"]) > 1e-5:
            assert (r["anomaly_flag"] == "true") == (score > calib["scan_threshold"])


def test_strip_border_grows_and_shrinks_and_tta_is_recorded(run_cli, fast_cfg, tmp_path):
    head = _head(tmp_path / "sub-b_T1w.nii.gz", 5, 2.5)  # voxels under 3 mm: a 3 mm border moves the edge
    src = nib.load(head)
    masks, sides = {}, {}
    for name, extra in (("0", ["--border", "0"]), ("+3", ["--border", "3"]), ("-3", ["--border", "-3"]),
                        ("tta", ["--tta"])):
        res = run_cli("strip", head, "-o", tmp_path / name, "-c", fast_cfg, "--device", "cpu", *extra)
        assert res.returncode == 0, res.stderr[-3000:]
        [path] = _outputs(res.stdout)
        img = nib.load(path)
        _same_grid(img, src)
        assert img.get_data_dtype() == np.uint8
        masks[name], sides[name] = np.asarray(img.dataobj) > 0, _sidecar(path)
    m0, grown, shrunk = masks["0"], masks["+3"], masks["-3"]
    assert not (m0 & ~grown).any() and not (shrunk & ~m0).any()  # nested: shrunk <= plain <= grown
    assert 1.05 < grown.sum() / m0.sum() < 1.3 and 0.75 < shrunk.sum() / m0.sum() < 0.95  # one 2.5 mm layer
    assert [sides[k]["Inference"]["border_mm"] for k in ("0", "+3", "-3")] == [0, 3, -3]
    vox_ml = float(np.prod(src.header.get_zooms()[:3])) / 1000
    assert sides["+3"]["BrainVolume_mL"] == pytest.approx(grown.sum() * vox_ml, abs=0.01)
    assert sides["tta"]["Inference"]["tta"] is True
    assert all(sides[k]["Inference"]["tta"] is False for k in ("0", "+3", "-3"))
    dice = 2 * (masks["tta"] & m0).sum() / (masks["tta"].sum() + m0.sum())
    assert dice > 0.95


def test_strip_writes_and_prints_each_scans_self_qc(run_cli, fast_cfg, tmp_path):
    """``volseg strip`` gives a single scan the self-QC of ``volseg run``: in both sidecars as
    ``QC`` and on the printed line; a head whose brain is cut by the field of view is sent to
    ``check`` with its reason; ``--no-qc`` leaves it out."""
    good = _head(tmp_path / "sub-good_T1w.nii.gz", 7, 2.0)
    src = nib.load(good)
    arr = np.asarray(src.dataobj, dtype=np.float32)
    ras = nib.orientations.io_orientation(src.affine)
    si = int(ras[2, 0])  # the array axis that runs inferior-superior
    keep = [slice(None)] * 3
    n = arr.shape[si]
    # cut the top 30% of the field of view: the brain now touches its edge
    keep[si] = slice(0, int(n * 0.7)) if ras[2, 1] > 0 else slice(int(n * 0.3), n)
    cut = tmp_path / "sub-cut_T1w.nii.gz"
    lo = [k.start or 0 for k in keep]
    aff = src.affine.copy()
    aff[:3, 3] = src.affine[:3, :3] @ np.asarray(lo) + src.affine[:3, 3]
    nib.save(nib.Nifti1Image(arr[tuple(keep)], aff), cut)
    res = run_cli("strip", good, cut, "-o", tmp_path / "out", "-c", fast_cfg, "--device", "cpu")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = {ln.split(" -> ")[0]: ln for ln in res.stdout.splitlines() if " -> " in ln}
    qcs = {}
    for name in ("good", "cut"):
        [mask] = _outputs(lines[str(tmp_path / f"sub-{name}_T1w.nii.gz")])
        side = _sidecar(mask)
        brain_side = _sidecar(Path(str(mask).replace("_desc-brain_mask", "_desc-brain_T1w")))
        assert side["QC"] == brain_side["QC"]
        qcs[name] = side["QC"]
        assert qcs[name]["qc"] in lines[str(tmp_path / f"sub-{name}_T1w.nii.gz")]
        assert {"qc_tta_dice", "qc_boundary_uncertainty"} <= set(side["QC"]["measures"])
    assert qcs["good"]["qc"] == "ok", qcs["good"]
    assert qcs["cut"]["qc"] == "check" and "fov" in qcs["cut"]["reasons"], qcs["cut"]
    res = run_cli("strip", good, "-o", tmp_path / "noqc", "-c", fast_cfg, "--device", "cpu", "--no-qc")
    assert res.returncode == 0, res.stderr[-3000:]
    [mask] = _outputs(res.stdout)
    assert "QC" not in _sidecar(mask) and "[qc:" not in res.stdout
