"""The anomaly benchmark (lesion families, baselines, metrics), registration, and site adaptation
(fine-tuning with --init, calibrate into a model folder, that folder used by anomaly and run)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from volseg.anomaly.families import FAMILIES, SITES, SIZE_BANDS_MM, insert_family, lesion_alpha, lesion_box, tissue_sites


def _synthetic_brain(seed=11):
    from volseg.anomaly.data import synth_brain

    return synth_brain(seed)


def test_families_paint_their_contrast_at_every_site_and_size():
    from volseg.anomaly.prep import wm_peak

    data, mask, meta = _synthetic_brain(11)
    sites = tissue_sites(data, mask, meta.zooms)
    assert set(sites) == set(SITES) and all(v.sum() >= 20 for v in sites.values())
    assert all(not (v & ~mask).any() for v in sites.values())
    wm = wm_peak(data[mask])
    for k, (family, (lo, hi)) in enumerate(FAMILIES.items()):
        img, truth, params = insert_family(data, mask, meta.zooms, family, np.random.default_rng(k), sites=sites)
        assert truth.any() and not (truth & ~mask).any()
        assert sorted(p["site"] for p in params) == sorted(SITES)
        for p, (rlo, rhi) in zip(params, SIZE_BANDS_MM):
            assert rlo <= p["radius_mm"] <= rhi and lo <= p["level_x_wm"] <= hi
        # the painted core sits in the family's band (texture and soft edges aside)
        core = np.median(img[truth]) / wm
        assert lo - 0.07 < core < hi + 0.07, (family, core)
        # outside the lesion masks only their soft edges (occupancy < 0.5) changed
        changed = np.abs(img - data) > 1e-3 * wm
        assert (changed & ~truth).sum() < truth.sum()


def test_families_on_a_biased_scan_keep_their_contrast_to_the_tissue_around_them():
    """With the scan's field given, a family's contrast is the lesions' contrast to their own
    surroundings, wherever the field puts them; painted against the raw global white-matter
    level (no field) it is not."""
    from scipy import ndimage as ndi

    from volseg.anomaly.families import brain_bias_field
    from volseg.anomaly.prep import wm_peak

    data, mask, meta = _synthetic_brain(11)
    # a strong known field: x2 across the brain along its first axis
    ramp = np.exp(np.linspace(-0.35, 0.35, data.shape[0], dtype=np.float32))[:, None, None]
    biased = np.where(mask, data * ramp, 0).astype(np.float32)
    field = brain_bias_field(biased, mask, meta.zooms)
    flat = biased / field
    added = np.log(field[mask]) - np.log(brain_bias_field(data, mask, meta.zooms)[mask])
    corr = np.corrcoef(added, np.log(np.broadcast_to(ramp, data.shape)[mask]))[0, 1]
    assert corr > 0.9, corr  # N4 found the added ramp (the synthetic brain has its own field too)
    sites = tissue_sites(flat, mask, meta.zooms)
    off_band = {}
    for name, kw in (("aware", dict(field=field, sites=sites)), ("raw", dict(sites=tissue_sites(biased, mask, meta.zooms)))):
        img, truth, params = insert_family(biased, mask, meta.zooms, "bright", np.random.default_rng(3), **kw)
        seen = img / field  # what a pipeline sees after the same correction
        wm = wm_peak(seen[mask & ~truth])
        off = []
        for p in params:
            c = tuple(p["centre_vox"])
            lab = np.zeros(mask.shape, bool)
            lab[c] = True
            core = truth & ndi.binary_dilation(lab, iterations=max(1, int(p["radius_mm"] * 0.4 / min(meta.zooms))))
            off.append(abs(float(np.median(seen[core])) / wm - p["level_x_wm"]))
        off_band[name] = max(off)
    assert off_band["aware"] < 0.08, off_band
    assert off_band["raw"] > off_band["aware"], off_band


def test_lesion_shapes_have_the_asked_size():
    rng = np.random.default_rng(0)
    shape, centre, zooms = (61, 61, 61), (30, 30, 30), (1.0, 1.0, 1.0)
    ell = lesion_alpha(shape, centre, 10.0, zooms, "ellipsoid", rng) >= 0.5
    vol = ell.sum()
    # semi-axes are 0.6-1.0 x the radius: between the two spheres' volumes
    assert 4 / 3 * np.pi * 6 ** 3 * 0.9 < vol < 4 / 3 * np.pi * 10 ** 3 * 1.1
    lobed = lesion_alpha(shape, centre, 10.0, zooms, "lobed", np.random.default_rng(1)) >= 0.5
    assert lobed.sum() > 100
    with pytest.raises(ValueError, match="shape"):
        lesion_alpha(shape, centre, 10.0, zooms, "cube", rng)


def test_registration_recovers_a_known_affine():
    from scipy import ndimage as ndi

    from volseg.transforms.register import register_affine, warp

    data, mask, meta = _synthetic_brain(12)
    from volseg.anomaly.config import AEConfig
    from volseg.anomaly.prep import prepare_brain

    prep = prepare_brain(data, mask, meta, AEConfig(), n4=False)
    fixed, fmask = prep.grid_image[0].numpy(), prep.grid_mask
    # moving: the same brain shifted by (3, -2, 4) voxels and scaled by 1.08 about the centre
    c = (np.asarray(fixed.shape) - 1) / 2
    mat = np.eye(3) / 1.08
    off = c - mat @ c - np.asarray([3.0, -2.0, 4.0])
    moving = ndi.affine_transform(fixed, mat, offset=off, order=1)
    before = np.corrcoef(fixed[fmask], moving[fmask])[0, 1]
    tr = register_affine(fixed, moving, 2.0, fixed_mask=fmask)
    back = warp(moving, tr, fixed.shape, 2.0)
    after = np.corrcoef(fixed[fmask], back[fmask])[0, 1]
    assert before < 0.9 and after > 0.97, (before, after)


def test_suite_scores_agree_with_sklearn_on_the_same_voxels(tmp_path, tiny_ae_model):
    from sklearn.metrics import average_precision_score

    from volseg.anomaly.benchmark import SuiteCase, baseline_maps, run_suite
    from volseg.anomaly.infer import anomaly_volume, load_anomaly_model

    data, mask, meta = _synthetic_brain(13)
    img, truth, _ = insert_family(data, mask, meta.zooms, "dark", np.random.default_rng(3))
    model = load_anomaly_model(tiny_ae_model)
    cases = [SuiteCase("b_healthy", "healthy", "b", lambda: (data, mask, None, meta)),
             SuiteCase("b_dark0", "dark", "b", lambda: (img, mask, truth, meta))]
    summary = run_suite(model, cases, tmp_path / "suite", template=True)
    g = summary["groups"]["dark"]
    assert set(g) >= {"model", "raw", "wm_distance", "template", "ratio_to_best_baseline"}
    res = anomaly_volume(img, mask, meta, model)
    assert g["model"]["auprc"] == pytest.approx(average_precision_score(truth[mask], res.map[mask]), abs=1e-3)
    base = baseline_maps(res, model.cfg, None)
    assert g["raw"]["auprc"] == pytest.approx(average_precision_score(truth[mask], base["raw"][mask]), abs=1e-3)
    # a dark lesion: |x - WM| finds it better than raw intensity, which ranks it lowest
    assert g["wm_distance"]["auprc"] > g["raw"]["auprc"]
    for name in ("suite_cases.tsv", "suite_groups.tsv", "suite.md"):
        assert (tmp_path / "suite" / name).stat().st_size > 50
    healthy = json.loads((tmp_path / "suite" / "suite.json").read_text())["healthy"]
    assert [h["id"] for h in healthy] == ["b_healthy"]
    flagged_ml = anomaly_volume(data, mask, meta, model).mask.sum() * np.prod(meta.zooms) / 1000
    assert healthy[0]["anomalous_ml"] == pytest.approx(flagged_ml, abs=0.01)


@pytest.fixture(scope="module")
def tiny_ae_model(tmp_path_factory):
    """A small random-weight residual autoencoder with its training settings and a calibration."""
    from volseg.anomaly.evaluate import Case, calibrate
    from volseg.nets.folder import write_calibration
    from volseg.anomaly.infer import load_anomaly_model
    from volseg.anomaly.train import export_weights
    from volseg.config import config_from_dict, config_to_dict
    from volseg.anomaly.config import AEConfig
    from volseg.nets.autoencoder import build_autoencoder

    tmp = tmp_path_factory.mktemp("aemodel")
    cfg = config_from_dict({
        "net": {"channels": [4, 8], "bottleneck": 4, "residual": True},
        "data": {"healthy": [], "synth_count": 0, "cache_dir": str(tmp / "cache")},
        "train": {"steps": 4, "steps_per_epoch": 2, "batch_size": 2, "patch": [32, 32, 32],
                  "out_dir": str(tmp / "run"), "threads": 1, "amp": False},
        "maps": {"n4": False, "median_size": 3},
    }, AEConfig)
    torch.manual_seed(0)
    net = build_autoencoder(cfg.net)
    export_weights(net, cfg, tmp / "model", {"config": config_to_dict(cfg)})
    model = load_anomaly_model(tmp / "model")
    data, mask, meta = _synthetic_brain(40)
    write_calibration(calibrate(model, [Case("h", arrays=(data, mask, None, meta))]), tmp / "model")
    return tmp / "model"


def _write_brain(path, seed, voxel=3.0, head=False):
    from volseg.synth import synth_head

    subj = synth_head(seed, voxel_size=(voxel,) * 3)
    arr = subj.image if head else np.where(subj.brain_mask > 0, subj.image, 0)
    img = nib.Nifti1Image(arr.astype(np.float32), subj.affine)
    img.set_qform(subj.affine, code=1)
    img.set_sform(subj.affine, code=1)
    nib.save(img, path)
    return path


@pytest.mark.slow
def test_site_adaptation_end_to_end(run_cli, tmp_path, tiny_ae_model):
    """train ae --init on a site's controls (a folder) -> calibrate on other controls -> the model
    folder works in volseg anomaly --model and volseg run --anomaly-model."""
    from safetensors.torch import load_file

    controls = tmp_path / "controls"
    controls.mkdir()
    for i in range(2):
        _write_brain(controls / f"sub-c{i}_T1w.nii.gz", 300 + i)
    held = _write_brain(tmp_path / "sub-h_T1w.nii.gz", 310)
    r = run_cli("train", "ae", "--init", tiny_ae_model, "--healthy", controls, "--steps", 2,
                "-o", tmp_path / "ft", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    final = tmp_path / "ft" / "final"
    before, after = load_file(str(tiny_ae_model / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert before.keys() == after.keys() and all(before[k].shape == after[k].shape for k in before)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    info = json.loads((final / "model.json").read_text())
    assert info["init"]["sha256"] == json.loads((tiny_ae_model / "model.json").read_text())["sha256"]
    assert info["config"]["data"]["healthy"] and info["config"]["net"]["residual"] is True

    site = tmp_path / "site_model"
    r = run_cli("calibrate", "--model", final, held, "-o", site)
    assert r.returncode == 0, r.stderr[-3000:]
    calib = json.loads((site / "calibration.json").read_text())
    assert calib["model_sha256"] == info["sha256"] and list(calib["healthy_scans"]) == ["sub-h"]
    assert (site / "model.safetensors").exists() and (site / "model.json").exists()

    probe = _write_brain(tmp_path / "probe.nii.gz", 320)
    r = run_cli("anomaly", probe, "--mask", probe, "--model", site, "-o", tmp_path / "anom")
    assert r.returncode == 0, r.stderr[-3000:]
    side = json.loads((tmp_path / "anom" / "probe_desc-anomaly_map.json").read_text())
    assert side["VoxelThreshold"] == pytest.approx(calib["voxel_threshold"])

    (tmp_path / "in").mkdir()
    head = _write_brain(tmp_path / "in" / "sub-p_T1w.nii.gz", 321, voxel=2.0, head=True)
    r = run_cli("run", head, "-o", tmp_path / "deriv", "--anomaly-model", site, "--no-report")
    assert r.returncode == 0, r.stderr[-3000:]
    sidecars = list((tmp_path / "deriv").rglob("*_desc-anomaly_map.json"))
    assert len(sidecars) == 1
    assert json.loads(sidecars[0].read_text())["Anomaly"]["VoxelThreshold"] == pytest.approx(calib["voxel_threshold"])


def test_calibrate_refuses_to_write_into_the_package(run_cli, tmp_path):
    brain = _write_brain(tmp_path / "b.nii.gz", 330)
    r = run_cli("calibrate", brain)
    assert r.returncode != 0 and "give -o DIR" in r.stderr
    r = run_cli("train", "ae", "--init", "shipped", "-o", tmp_path / "x")
    assert r.returncode != 0 and "--healthy" in r.stderr


def test_evaluate_suite_cli_writes_every_family_beside_its_baselines(run_cli, tmp_path, tiny_ae_model):
    import os

    brain = _write_brain(tmp_path / "held.nii.gz", 340)
    env = dict(os.environ, VOLSEG_SHARED_DATA=str(tmp_path / "none"))
    r = run_cli("evaluate", "anomaly", "--suite", "--healthy", brain, "--per-family", 1, "--no-template",
                "--model", tiny_ae_model, "-o", tmp_path / "suite", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = (tmp_path / "suite" / "suite_groups.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    assert {"model_auprc", "raw_auprc", "wm_distance_auprc", "model_dice_calibrated"} <= set(header)
    assert sorted(r.split("\t")[0] for r in rows[1:]) == sorted(FAMILIES)
    assert "| held |" in r.stdout  # the held-out healthy brain's score and anomalous volume
    r = run_cli("evaluate", "anomaly", "--suite", "--model", tiny_ae_model, "-o", tmp_path / "x")
    assert r.returncode != 0 and "--healthy" in r.stderr


@pytest.fixture(scope="module")
def normative_model(tmp_path_factory, tiny_ae_model):
    """The tiny model with maps.normative on, calibrated (leave-one-out) on 3 synthetic brains."""
    import shutil

    from volseg.anomaly.evaluate import Case, calibrate
    from volseg.nets.folder import write_calibration
    from volseg.anomaly.infer import load_anomaly_model

    d = tmp_path_factory.mktemp("normative") / "model"
    shutil.copytree(tiny_ae_model, d)
    (d / "calibration.json").unlink()
    info = json.loads((d / "model.json").read_text())
    info["config"]["maps"]["normative"] = True
    (d / "model.json").write_text(json.dumps(info))
    model = load_anomaly_model(d)
    assert model.normative is None  # not calibrated yet
    cases = []
    for s in (41, 42, 43):
        data, mask, meta = _synthetic_brain(s)
        cases.append(Case(f"h{s}", arrays=(data, mask, None, meta)))
    calib = calibrate(model, cases)
    assert calib["normative_brains"] == 3 and set(calib["healthy_scans"]) == {"h41", "h42", "h43"}
    write_calibration(calib, d)
    return d


def test_normative_statistics_are_written_and_shape_the_map(normative_model, tiny_ae_model):
    from volseg.anomaly.infer import anomaly_volume, load_anomaly_model
    from volseg.anomaly.normative import NORMATIVE_FILE

    assert (normative_model / NORMATIVE_FILE).exists()
    calib = json.loads((normative_model / "calibration.json").read_text())
    assert "normative" not in calib and calib["voxel_threshold"] > 0
    model = load_anomaly_model(normative_model, require_calibration=True)
    n = model.normative
    assert n.brains == 3 and n.mean.shape == n.template.shape and (n.std[n.template_mask] > 0).all()
    data, mask, meta = _synthetic_brain(44)
    img, truth, _ = insert_family(data, mask, meta.zooms, "bright", np.random.default_rng(4))
    res = anomaly_volume(img, mask, meta, model)
    plain = anomaly_volume(img, mask, meta, load_anomaly_model(tiny_ae_model))
    assert res.map.shape == img.shape and (res.map[~mask] == 0).all()
    assert not np.allclose(res.map[mask], plain.map[mask])  # z units, not white-matter units
    # missing statistics for a calibrated normative model: refused, naming the file
    from volseg.nets.folder import WeightsError

    (normative_model / NORMATIVE_FILE).rename(normative_model / "moved.npz")
    try:
        with pytest.raises(WeightsError, match=NORMATIVE_FILE):
            load_anomaly_model(normative_model)
    finally:
        (normative_model / "moved.npz").rename(normative_model / NORMATIVE_FILE)


@pytest.mark.parametrize("axcodes,oblique", [("RAS", False), ("LIA", False), ("RAS", True)])
def test_normative_maps_come_back_on_the_input_grid(run_cli, tmp_path, normative_model, axcodes, oblique):
    from volseg.synth import synth_head

    subj = synth_head(50, voxel_size=(1.6, 1.6, 2.4), axcodes=axcodes, oblique=oblique)
    brain = np.where(subj.brain_mask > 0, subj.image, 0).astype(np.float32)
    img = nib.Nifti1Image(brain, subj.affine)
    img.set_qform(subj.affine, code=1)
    img.set_sform(subj.affine, code=1)
    p = tmp_path / "sub-x_T1w.nii.gz"
    nib.save(img, p)
    r = run_cli("anomaly", p, "--mask", p, "--model", normative_model, "-o", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-3000:]
    amap = nib.load(tmp_path / "out" / "sub-x_desc-anomaly_map.nii.gz")
    assert amap.shape == brain.shape
    np.testing.assert_allclose(amap.affine, subj.affine, atol=1e-4)
    a = amap.get_fdata()
    assert (a[brain == 0] == 0).all() and a.max() > 0
    side = json.loads((tmp_path / "out" / "sub-x_desc-anomaly_map.json").read_text())
    assert side["Maps"]["normative"] is True


def _paint(data, mask, zooms, centre, radius_mm, level_x_wm, rng):
    """One ellipsoid lesion of ``radius_mm`` at ``centre`` (voxel), ``level_x_wm`` x white matter."""
    from volseg.anomaly.prep import wm_peak

    box, alpha = lesion_box(mask, centre, radius_mm, zooms, "ellipsoid", rng)
    img = data.astype(np.float32).copy()
    img[box] = img[box] * (1 - alpha) + level_x_wm * wm_peak(data[mask]) * alpha
    truth = np.zeros(mask.shape, bool)
    truth[box] = alpha >= 0.5
    return img, truth & mask


def _shipped_map_in_lesion(level, radius_mm):
    from volseg.anomaly.infer import anomaly_volume, load_anomaly_model

    model = load_anomaly_model(None)
    data, mask, meta = _synthetic_brain(778)  # a synthetic brain the model never saw (seed outside training)
    sites = tissue_sites(data, mask, meta.zooms)
    cand = np.argwhere(sites["deep_wm"])
    centre = cand[len(cand) // 2]
    img, truth = _paint(data, mask, meta.zooms, centre, radius_mm, level, np.random.default_rng(0))
    assert truth.sum() > 5
    res = anomaly_volume(img, mask, meta, model)
    return res.map[truth], res.map[mask & ~truth]


@pytest.mark.slow
@pytest.mark.parametrize("level", [0.4, 1.5])
@pytest.mark.parametrize("radius_mm", [4.0, 10.0])
def test_shipped_model_maps_dark_and_bright_lesions_above_healthy_tissue(level, radius_mm):
    """The shipped model's map (median filter included) is higher inside an inserted lesion than in
    healthy tissue, dark or bright, a 4 mm one too."""
    inside, healthy = _shipped_map_in_lesion(level, radius_mm)
    assert inside.mean() > 3 * healthy.mean(), (inside.mean(), healthy.mean())
    if radius_mm >= 10:
        assert inside.mean() > np.percentile(healthy, 99)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="known limit (model card): after the 10 mm median filter a 4 mm dark "
                                       "lesion's map sits near the healthy 95th percentile")
def test_shipped_model_small_dark_lesion_stands_out_of_healthy_tissue():
    inside, healthy = _shipped_map_in_lesion(0.4, 4.0)
    assert inside.mean() > np.percentile(healthy, 95)


def test_validation_cases_cover_four_brains_and_keep_lesions_inside_the_given_mask(shared_data):
    from volseg.anomaly.benchmark import VALIDATION_OPEN_MS, validation_cases

    shared = shared_data
    if not (shared / "healthy" / "T1_brain_c1.nii.gz").exists():
        pytest.skip("shared data not present")
    cases = validation_cases(shared, per_family=1)
    brains = {c.brain for c in cases}
    assert brains == {"T1_brain_c1", *VALIDATION_OPEN_MS}
    assert {c.group for c in cases} == set(FAMILIES)  # no healthy case unless asked
    assert len(cases) == 4 * len(FAMILIES)
    case = next(c for c in cases if c.brain == "patient04_study1" and c.group == "bright")
    img, mask, lesion, meta = case.load()
    given = nib.load(str(shared / "wholehead" / "open_ms" / "patient04_study1_T1W_brainmask.nii.gz")).get_fdata() > 0
    assert np.array_equal(mask, given)  # the dataset's own mask, no volseg model involved
    assert lesion.any() and not (lesion & ~mask).any()
    assert float(np.median(img[lesion])) > 1.2 * float(np.median(img[mask & ~lesion]))
    assert len(validation_cases(shared, per_family=1, healthy=True)) == 4 * (len(FAMILIES) + 1)


def test_diagnose_script_reports_the_painted_contrast_and_the_map_in_a_validation_case(shared_data):
    """scripts/anomaly_diagnose.py on one validation case: the grey-like lesions it paints measure
    0.6-0.8x the tissue around them, and the map level inside them is reported."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    if not (shared_data / "healthy" / "T1_brain_c1.nii.gz").exists():
        pytest.skip("T1_brain_c1 not in the shared data")
    script = Path(__file__).resolve().parents[1] / "scripts" / "anomaly_diagnose.py"
    out = subprocess.run([sys.executable, str(script), "--groups", "grey", "--brains", "T1_brain_c1",
                          "--per-family", "1"], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, VOLSEG_SHARED_DATA=str(shared_data)), check=True).stdout
    line = [ln for ln in out.splitlines() if ln.startswith("T1_brain_c1_grey0:")]
    assert len(line) == 1, out
    contrasts = [float(v) for v in re.search(r"surroundings \[([^\]]*)\]", line[0]).group(1).split(",")]
    assert contrasts and np.median(contrasts) == pytest.approx(0.72, abs=0.1)
    level = float(re.search(r"median map in lesions ([0-9.]+)", line[0]).group(1))
    assert level > 0.05  # in this 3D T1 brain the shipped model does see grey-like lesions
