"""The anomaly stage: autoencoder training, maps, calibration/metrics, CLI outputs on the input grid."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from volseg.anomaly.config import AEConfig, load_ae_config
from volseg.anomaly.maps import remove_small, residual_map, scan_score
from volseg.anomaly.metrics import dice, scan_metrics, scan_threshold, voxel_metrics, voxel_threshold
from volseg.nets.folder import PACKAGE_MODELS, WeightsError

SHIPPED = PACKAGE_MODELS / "ae"


def _brain_file(tmp_path, seed=31, axcodes="RAS", oblique=False, voxel=(2.0, 2.0, 2.0), name="brain"):
    """A synthetic brain-only T1 (skull-stripped synthetic head) and its mask, as NIfTI files."""
    from volseg.synth import synth_head

    subj = synth_head(seed, voxel_size=voxel, axcodes=axcodes, oblique=oblique)
    mask = subj.brain_mask > 0
    img = nib.Nifti1Image(np.where(mask, subj.image, 0).astype(np.float32), subj.affine)
    img.set_qform(subj.affine, code=1); img.set_sform(subj.affine, code=1)
    p, m = tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_mask.nii.gz"
    nib.save(img, p)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), subj.affine, img.header), m)
    return p, m


def _tiny_cfg(tmp_path, **train):
    from volseg.config import config_from_dict

    return config_from_dict({
        "net": {"channels": [4, 8], "bottleneck": 4},
        "data": {"healthy": [], "synth_count": 0, "cache_dir": str(tmp_path / "cache")},
        "train": dict({"steps": 6, "steps_per_epoch": 3, "batch_size": 2, "patch": [32, 32, 32],
                       "out_dir": str(tmp_path / "run"), "threads": 1}, **train),
        "maps": {"n4": False},
    }, AEConfig)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A small random-weight autoencoder written like a shipped model, with a calibration."""
    from volseg.anomaly.evaluate import Case, calibrate
    from volseg.nets.folder import write_calibration
    from volseg.anomaly.infer import load_anomaly_model
    from volseg.anomaly.train import export_weights
    from volseg.config import config_to_dict
    from volseg.nets.autoencoder import ConvAutoencoder

    tmp = tmp_path_factory.mktemp("aemodel")
    cfg = _tiny_cfg(tmp)
    torch.manual_seed(0)
    net = ConvAutoencoder(1, cfg.net.channels, cfg.net.bottleneck)
    export_weights(net, cfg, tmp / "model", {"config": config_to_dict(cfg)})
    model = load_anomaly_model(tmp / "model")
    p, m = _brain_file(tmp, seed=40)
    from volseg.anomaly.infer import load_brain_input

    data, mask, meta = load_brain_input(p, m)
    write_calibration(calibrate(model, [Case("h", arrays=(data, mask, None, meta))]), tmp / "model")
    return tmp / "model"


def test_config_file_loads_and_rejects_unknown_keys(tmp_path):
    from volseg.config import ConfigError

    cfg = load_ae_config("configs/ae.yaml")
    assert cfg.maps.median_size == 5 and cfg.net.channels[0] > 0
    assert cfg.net.residual is True and cfg.corruption.log_contrast is True and cfg.augment.csf_grow == 0.0
    for name in ("ae_thick", "ae_contrast"):  # stop 26 experiments: stage 2 plus one augmentation each
        exp = load_ae_config(f"configs/{name}.yaml")
        assert exp.augment.thick_slices + exp.augment.tissue_contrast == 0.5 and cfg.augment.tissue_contrast == 0
    stage2 = load_ae_config("configs/ae_stage2.yaml")  # the fine-tuning stage of the shipped model
    assert stage2.net == cfg.net and stage2.augment.csf_grow == 0.4 and stage2.train.lr < cfg.train.lr
    bad = tmp_path / "bad.yaml"
    bad.write_text("maps:\n  residual: squared\n")
    with pytest.raises(ConfigError, match="maps.residual"):
        load_ae_config(bad)


def test_autoencoder_loss_falls_on_synthetic_patches(tmp_path):
    """A few steps of the real training loss on a synthetic brain's corrupted patches: it falls."""
    from volseg.anomaly.data import _save
    from volseg.anomaly.prep import prepare_brain
    from volseg.anomaly.train import PatchDataset, restoration_loss
    from volseg.anomaly.data import synth_brain
    from volseg.nets.autoencoder import build_autoencoder

    cfg = _tiny_cfg(tmp_path)
    data, mask, meta = synth_brain(7)
    prep = prepare_brain(data, mask, meta, cfg)
    npz = tmp_path / "b.npz"
    _save(npz, image=prep.grid_image[0].numpy(), mask=prep.grid_mask, source="synth")
    ds = PatchDataset([npz], [], cfg, length=4)
    batch = [ds[i] for i in range(2)]
    x, y, w = (torch.stack([b[k] for b in batch]) for k in range(3))
    assert x.shape == (2, 1, 32, 32, 32) and 0 <= float(w.min()) and float(w.max()) <= 1.0
    torch.manual_seed(0)
    net = build_autoencoder(cfg.net)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = restoration_loss(net(x), y, w, 1.0)
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_thick_slice_augmentation_blurs_clean_and_corrupted_patches_along_one_axis(tmp_path):
    import dataclasses

    from volseg.anomaly.data import _save, synth_brain
    from volseg.anomaly.prep import prepare_brain
    from volseg.anomaly.train import PatchDataset, thick_slices

    # the function: slabs averaged along one axis only, a constant kept, fractional widths allowed
    x = np.zeros((20, 20, 20), np.float32); x[:, :, 10] = 1.0
    y = thick_slices(x, 2, 2.5)
    assert y[5, 5, 10] < 0.5 and y[5, 5, 9] > 0 and y[5, 5, 11] > 0  # the sheet spread through-plane
    np.testing.assert_allclose(thick_slices(x, 0, 2.5), x, atol=1e-6)  # in-plane: unchanged
    np.testing.assert_allclose(thick_slices(np.ones_like(x), 1, 1.7), 1.0, atol=1e-6)
    assert np.array_equal(thick_slices(x, 2, 1.0), x)  # a slab of one voxel: nothing to do
    # in the training samples: the same draw with and without it differs only by that blur
    cfg = _tiny_cfg(tmp_path)
    data, mask, meta = synth_brain(7)
    prep = prepare_brain(data, mask, meta, cfg)
    npz = tmp_path / "b.npz"
    _save(npz, image=prep.grid_image[0].numpy(), mask=prep.grid_mask, source="synth")
    thick = dataclasses.replace(cfg, augment=dataclasses.replace(cfg.augment, thick_slices=1.0, slice_mm=(6.0, 6.0)))
    sharp_ds, thick_ds = PatchDataset([npz], [], cfg, length=4), PatchDataset([npz], [], thick, length=4)
    for i in range(3):
        (n0, c0, w0), (n1, c1, w1) = sharp_ds.sample(i), thick_ds.sample(i)
        assert not np.allclose(c0, c1) and not np.allclose(n0, n1)
        m = c0 != 0
        # clean and corrupted patches: the same 6 mm (3-voxel) slabs along one and the same axis
        fits = [a for a in range(3) if np.allclose(c1[m], thick_slices(c0, a, 3.0)[m], atol=1e-5)]
        assert len(fits) == 1
        np.testing.assert_allclose(n1[m], thick_slices(n0, fits[0], 3.0)[m], atol=1e-5)
        assert (c1[~m] == 0).all() and (n1[~m] == 0).all()
        assert 0 <= w1.min() and w1.max() <= 1.0 and (w1 > 0).sum() >= (w0 > 0.5).sum()


def test_tissue_contrast_moves_grey_matter_and_keeps_white_matter_and_brighter():
    from volseg.anomaly.train import tissue_contrast

    x = np.linspace(0, 1.6, 161).astype(np.float32)
    levels = []
    for seed in range(20):
        y = tissue_contrast(x, np.random.default_rng(seed), (0.6, 0.93))
        assert (np.diff(y) >= 0).all()  # monotone: the order of tissues is kept
        assert y[0] == 0 and np.array_equal(y[x >= 1.0], x[x >= 1.0])  # WM, bright tissue unchanged
        levels.append(float(y[75]))  # x = 0.75: grey matter of a 3D T1
    assert min(levels) >= 0.6 - 1e-6 and max(levels) <= 0.93 + 1e-6 and max(levels) - min(levels) > 0.15
    same = tissue_contrast(x, np.random.default_rng(3)), tissue_contrast(x, np.random.default_rng(3))
    np.testing.assert_array_equal(*same)  # deterministic by seed


def test_train_command_writes_checkpoints_and_resumes(tmp_path):
    from volseg.anomaly.train import train

    p, _ = _brain_file(tmp_path, seed=8)
    import dataclasses

    cfg = _tiny_cfg(tmp_path)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, healthy=(str(p),), validation=(str(p),)))
    with pytest.raises(ValueError, match="no training data"):
        train(cfg, progress=False)  # the only healthy brain is the validation brain
    other, _ = _brain_file(tmp_path, seed=9, name="other")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, healthy=(str(other),), validation=(str(p),)))
    s = train(cfg, progress=False, stop_after=3)
    run = tmp_path / "run"
    assert s["steps"] == 3 and (run / "last.pt").exists() and (run / "best" / "model.safetensors").exists()
    s = train(cfg, resume=run / "last.pt", progress=False)
    assert s["steps"] == 6 and (run / "final" / "model.json").exists()
    rows = (run / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("step,")
    assert (run / "learning_curve.png").stat().st_size > 1000


def test_restoration_loss_balances_corrupted_voxels():
    from volseg.anomaly.train import restoration_loss

    clean = torch.zeros(1, 1, 10, 10, 10)
    corrupted = torch.zeros_like(clean); corrupted[..., :1] = 1.0  # 10% of the voxels
    pred = clean.clone(); pred[..., :1] = 1.0  # wrong exactly there, by 1
    # whole-patch L1 = 0.1, corrupted-voxel L1 = 1
    assert float(restoration_loss(pred, clean, corrupted, 1.0)) == pytest.approx(1.1)
    assert float(restoration_loss(pred, clean, corrupted, 0.0)) == pytest.approx(0.1)
    assert float(restoration_loss(pred, clean, torch.zeros_like(clean), 1.0)) == pytest.approx(0.1)
    # relative: the unrepaired fraction; copying a faint corruption costs as much as a strong one
    faint, strong = clean.clone(), clean.clone()
    faint[..., :1] = 0.1
    strong[..., :1] = 0.8
    copy_faint = float(restoration_loss(faint, clean, corrupted, 1.0, noisy=faint))
    copy_strong = float(restoration_loss(strong, clean, corrupted, 1.0, noisy=strong))
    assert copy_faint - 0.01 == pytest.approx(1.0) and copy_strong - 0.08 == pytest.approx(1.0)
    half = clean.clone(); half[..., :1] = 0.05  # half of the faint corruption repaired
    assert float(restoration_loss(half, clean, corrupted, 1.0, noisy=faint)) == pytest.approx(0.005 + 0.5)
    assert float(restoration_loss(pred, clean, corrupted, 1.0)) == pytest.approx(1.1)  # absolute as before


def test_white_matter_peak_ignores_grey_matter_mode():
    from volseg.anomaly.prep import wm_peak

    rng = np.random.default_rng(0)
    gm = rng.normal(95, 12, 60000)  # a grey-matter mode as large as white matter's
    wm = rng.normal(135, 8, 45000)
    csf = rng.normal(30, 10, 15000)
    assert wm_peak(np.concatenate([gm, wm, csf])) == pytest.approx(135, abs=5)


def test_grey_matching_moves_the_median_and_keeps_white_matter_brighter_tissue_and_order():
    from volseg.anomaly.prep import match_grey

    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0.93, 0.03, 6000), rng.normal(1.0, 0.02, 4000),  # low-contrast GM, WM
                        rng.normal(0.35, 0.05, 1000), rng.uniform(1.1, 1.5, 200)]).astype(np.float32)  # CSF, lesion
    x = np.clip(x, 0.0, None).reshape(1, 1, -1)
    mask = np.ones(x.shape, bool)
    mask[..., :5] = False  # outside the brain: 0 after matching
    y, med = match_grey(x, mask, 0.77)
    assert med == pytest.approx(np.median(x[mask]))
    assert np.median(y[mask]) == pytest.approx(0.77, abs=1e-3)
    inside = mask.ravel()
    order = np.argsort(x.ravel()[inside])
    assert np.all(np.diff(y.ravel()[inside][order]) >= -1e-6)  # monotone
    top = x >= 1.0
    np.testing.assert_array_equal(y[top & mask], x[top & mask])  # white matter and bright lesions unchanged
    assert not y[~mask].any()
    csf = mask & (x < 0.5)
    assert np.all(y[csf] < x[csf])
    # "raise" leaves a scan of ordinary contrast alone and treats a low-contrast one as "both" does
    hi = np.where(mask, x * 0.8, 0).astype(np.float32)  # median about 0.74
    assert match_grey(hi, mask, 0.77, "raise")[0] is hi
    assert np.median(match_grey(hi, mask, 0.77, "both")[0][mask]) == pytest.approx(0.77, abs=1e-3)
    np.testing.assert_array_equal(match_grey(x, mask, 0.77, "raise")[0], y)
    assert match_grey(x, mask, 0.0)[0] is x  # off


def test_grey_matching_runs_inside_prepare_brain_and_is_recorded(tiny_model):
    import dataclasses

    from volseg.anomaly.infer import anomaly_volume, load_anomaly_model

    from volseg.anomaly.prep import prepare_brain
    from volseg.io import ImageMeta

    rng = np.random.default_rng(2)
    shape = (40, 48, 40)
    mask = np.zeros(shape, bool)
    mask[6:34, 8:40, 6:34] = True
    data = np.where(mask, rng.normal(100, 3, shape), 0).astype(np.float32)
    u = rng.random(shape)
    data[mask & (u < 0.55)] = 93.0  # a low-contrast "grey matter" around the median
    data[mask & (u > 0.95)] = 30.0  # CSF
    meta = ImageMeta(path="t.nii.gz", affine=np.diag([2.0, 2.0, 2.0, 1.0]), shape=shape, zooms=(2.0, 2.0, 2.0))
    cfg = AEConfig()
    plain = prepare_brain(data, mask, meta, cfg, n4=False)
    cfg2 = dataclasses.replace(cfg, maps=dataclasses.replace(cfg.maps, grey_median=0.77))
    matched = prepare_brain(data, mask, meta, cfg2, n4=False)
    g0, g1 = plain.grid_image[0].numpy(), matched.grid_image[0].numpy()
    m = plain.grid_mask
    assert "median" not in plain.scale and matched.scale["median"] == pytest.approx(np.median(g0[m]))
    assert np.median(g0[m]) > 0.85 and np.median(g1[m]) == pytest.approx(0.77, abs=0.01)
    # the working-grid cache of training brains keys on it when on, and keeps older keys when off
    from volseg.anomaly.data import _prep_key

    assert _prep_key(cfg) == (cfg.preprocess, cfg.maps.n4)
    assert _prep_key(cfg2) != _prep_key(cfg) and _prep_key(cfg2)[-1] == (0.77, "both")
    # the map's sidecar says what was done
    model = load_anomaly_model(tiny_model)
    mcfg = dataclasses.replace(model.cfg, maps=dataclasses.replace(model.cfg.maps, grey_median=0.77))
    res_m = anomaly_volume(data, mask, meta, model, cfg=mcfg, n4=False)
    res_p = anomaly_volume(data, mask, meta, model, n4=False)
    scale = res_m.info["IntensityScale"]
    assert scale["grey_median"] == 0.77 and scale["grey_mode"] == "both" and scale["brain_median"] > 0.77
    assert "brain_median" not in res_p.info["IntensityScale"]
    # the benchmark's no-model baselines see the brain before matching, whatever the model's setting
    from volseg.anomaly.benchmark import baseline_maps

    assert plain.grid_unmatched is None
    np.testing.assert_array_equal(matched.grid_unmatched, g0)
    bm, bp = baseline_maps(res_m, mcfg, None), baseline_maps(res_p, model.cfg, None)
    assert set(bm) == {"raw", "wm_distance"}
    for k in bm:
        np.testing.assert_array_equal(bm[k], bp[k])
    from volseg.anomaly.benchmark import Template  # the template baseline's MNI152 brain too

    np.testing.assert_array_equal(Template(mcfg).image, Template(model.cfg).image)


def test_shipped_model_matches_low_contrast_brains_and_fine_tuning_keeps_it(tmp_path):
    """The shipped model's settings (2026-12-08): grey matching on for low-contrast brains only, and
    a site fine-tuning from it prepares the lab's controls the same way."""
    from volseg.anomaly.adapt import finetune_config
    from volseg.anomaly.infer import load_anomaly_model

    shipped = load_anomaly_model(None).cfg.maps
    assert shipped.grey_median == pytest.approx(0.77) and shipped.grey_mode == "raise"
    ft = finetune_config(PACKAGE_MODELS / "ae", [str(tmp_path / "c.nii.gz")], tmp_path / "ft")
    assert ft.maps.grey_median == shipped.grey_median and ft.maps.grey_mode == shipped.grey_mode


def test_residual_map_median_erosion_and_signs():
    x = np.zeros((40, 40, 40), np.float32)
    brain = np.zeros_like(x, bool); brain[5:35, 5:35, 5:35] = True
    x[brain] = 1.0
    recon = x.copy()
    x[18:24, 18:24, 18:24] = 1.6  # a bright blob the reconstruction does not have
    x[10, 10, 10] = 3.0  # a single hot voxel: the median filter removes it
    m = residual_map(x, recon, brain, "abs", erode_vox=2, median_size=5)
    assert m[20, 20, 20] == pytest.approx(0.6, abs=1e-5)
    assert m[10, 10, 10] == 0.0
    assert m[6, 20, 20] == 0.0  # eroded rim
    assert (m[~brain] == 0).all()
    assert residual_map(x, recon, brain, "negative", 2, 5).max() == 0.0
    assert residual_map(x, recon, brain, "positive", 2, 5)[20, 20, 20] > 0.5
    small = np.zeros((20, 20, 20), bool); small[2:4, 2:4, 2:4] = True; small[10:16, 10:16, 10:16] = True
    kept = remove_small(small, 10)
    assert kept[12, 12, 12] and not kept[2, 2, 2]


def test_signed_map_cancels_an_edge_that_changes_sign_and_keeps_a_lesion():
    rng = np.random.default_rng(0)
    x = np.ones((40, 40, 40), np.float32)
    brain = np.zeros_like(x, bool); brain[4:36, 4:36, 4:36] = True
    recon = x.copy()
    # a blurred "cortex": the residual changes sign from voxel to voxel (sd 0.4)
    x[8:16] += 0.4 * rng.standard_normal((8, 40, 40)).astype(np.float32)
    x[24:30, 20:26, 20:26] = 0.6  # a dark lesion: the residual keeps one sign
    x[24:30, 10:16, 10:16] = 1.3  # a bright one
    a = residual_map(x, recon, brain, "abs", 2, 5)
    s = residual_map(x, recon, brain, "signed", 2, 5)
    assert a[10:14, 10:30, 10:30].mean() > 0.2  # the median of |r| stays high in the edge band
    assert s[10:14, 10:30, 10:30].mean() < 0.08  # the signed median cancels most of it
    assert s[27, 23, 23] == pytest.approx(0.4, abs=1e-5) and s[27, 13, 13] == pytest.approx(0.3, abs=1e-5)
    assert (s >= 0).all() and (s <= a + 1e-6).all()
    # it is the larger of the one-sided maps (the median commutes with max(., 0))
    pos, neg = residual_map(x, recon, brain, "positive", 2, 5), residual_map(x, recon, brain, "negative", 2, 5)
    np.testing.assert_allclose(s, np.maximum(pos, neg), atol=1e-6)


def test_excess_residual_is_the_brightness_above_white_matter_whatever_the_reconstruction():
    from volseg.anomaly.infer import scale_residuals
    from volseg.anomaly.maps import filter_scales, signed_residual

    x = np.ones((40, 40, 40), np.float32)
    brain = np.zeros_like(x, bool); brain[4:36, 4:36, 4:36] = True
    x[10:18, 10:18, 10:18] = 1.2  # a subtly bright lesion
    x[24:32, 24:32, 24:32] = 0.4  # a dark one: no excess
    x[28:32, 8:12, 8:12] = 0.7  # grey matter
    copied = x.copy()  # a reconstruction that copies everything: the residual is 0 ...
    np.testing.assert_array_equal(signed_residual(x, copied, "abs"), 0)
    e = signed_residual(x, copied, "excess")  # ... the excess is not, and ignores the reconstruction
    np.testing.assert_array_equal(e, signed_residual(x, np.zeros_like(x), "excess"))
    assert e[14, 14, 14] == pytest.approx(0.2) and e[28, 28, 28] == 0 and e[30, 10, 10] == 0
    m = filter_scales([signed_residual(x, copied, "abs"), e], brain, 2, (5, 5), (1.0, 2.0), ["abs", "excess"])
    assert m[14, 14, 14] == pytest.approx(0.4) and m[28, 28, 28] == 0 and (m[~brain] == 0).all()
    import dataclasses

    from volseg.anomaly.config import MapConfig
    mc = dataclasses.replace(MapConfig(), median_sizes=(5, 9, 5), scale_residuals=("abs", "signed", "excess"))
    assert scale_residuals(mc) == ("abs", "signed", "excess")
    with pytest.raises(ValueError, match="not one of"):
        scale_residuals(dataclasses.replace(mc, scale_residuals=("abs", "signed", "bright")))


def test_threaded_median_and_multiscale_maps_agree_with_direct_computations():
    from scipy import ndimage as ndi

    from volseg.anomaly.maps import filter_map, filter_scales, median_filter

    rng = np.random.default_rng(3)
    r = rng.standard_normal((23, 19, 17)).astype(np.float32)
    for size in (3, 5, 9):  # slabs computed at once give scipy's numbers exactly
        np.testing.assert_array_equal(median_filter(r, size), ndi.median_filter(r, size=size, mode="constant"))
    brain = np.zeros((56, 56, 56), bool); brain[2:54, 2:54, 2:54] = True
    d = np.where(brain, 0.1 * rng.standard_normal(brain.shape), 0).astype(np.float32)
    lesions = np.zeros_like(brain)
    d[10:22, 10:22, 10:22] += 0.12; lesions[10:22, 10:22, 10:22] = True  # a large low-contrast lesion
    d[38:43, 38:43, 38:43] -= 0.8; lesions[38:43, 38:43, 38:43] = True  # a small strong one
    one = filter_scales(d, brain, 2, (5,), None, "signed")
    np.testing.assert_array_equal(one, np.abs(filter_map(d, brain, 2, 5)))
    m5, m9 = np.abs(filter_map(d, brain, 2, 5)), np.abs(filter_map(d, brain, 2, 9))
    both = filter_scales(d, brain, 2, (5, 9), (1.0, 1.5), "signed")
    np.testing.assert_allclose(both, np.maximum(m5, 1.5 * m9), rtol=1e-6)
    with pytest.raises(ValueError, match="gains"):
        filter_scales(d, brain, 2, (5, 9), (1.0,), "signed")
    # one residual kind per width: |r| at the small width, the signed residual at the large one
    mixed = filter_scales([np.abs(d), d], brain, 2, (5, 9), (1.0, 1.5), ["abs", "signed"])
    np.testing.assert_allclose(mixed, np.maximum(filter_map(np.abs(d), brain, 2, 5), 1.5 * m9), rtol=1e-6)
    # the large width quiets healthy noise more than it weakens the large lesion
    healthy = (ndi.distance_transform_edt(~lesions) > 8) & (ndi.distance_transform_edt(brain) > 7)
    core = np.zeros_like(brain); core[13:19, 13:19, 13:19] = True
    assert m9[core].mean() / np.quantile(m9[healthy], 0.999) > 1.5 * m5[core].mean() / np.quantile(m5[healthy], 0.999)
    assert both[40, 40, 40] > 0.6  # and the small strong lesion survives through the small width
    assert m9[40, 40, 40] < 0.2  # which the wide one alone would lose


def test_coarse_wide_median_is_a_cheap_regional_level_that_keeps_large_low_contrast_lesions():
    import dataclasses

    from scipy import ndimage as ndi

    from volseg.anomaly.config import MapConfig
    from volseg.anomaly.infer import scale_keys, scale_steps
    from volseg.anomaly.maps import coarse_filter_map, filter_map, filter_scales

    rng = np.random.default_rng(5)
    brain = np.zeros((60, 58, 62), bool); brain[3:57, 3:55, 3:59] = True  # odd sizes: padded to blocks
    np.testing.assert_array_equal(coarse_filter_map(np.ones(brain.shape, np.float32), brain, 5, 1),
                                  filter_map(np.ones(brain.shape, np.float32), brain, 0, 5))  # step 1: exact
    const = coarse_filter_map(np.full(brain.shape, 0.3, np.float32), brain, 5, 2)
    assert const.shape == brain.shape and not const[~brain].any()
    inner = ndi.distance_transform_edt(brain) > 12
    np.testing.assert_allclose(const[inner], 0.3, rtol=1e-5)  # a level comes back unchanged inside
    d = np.where(brain, 0.1 * rng.standard_normal(brain.shape), 0).astype(np.float32)
    lesion = np.zeros_like(brain); lesion[12:28, 12:28, 12:28] = True  # 16 voxels wide, +0.1 (1 sd)
    d[lesion] += 0.1
    c = np.abs(coarse_filter_map(d, brain, 5, 2))  # about 10 voxels wide
    exact = np.abs(filter_map(d, brain, 0, 9))
    core = np.zeros_like(brain); core[16:24, 16:24, 16:24] = True
    healthy = (ndi.distance_transform_edt(~lesion) > 10) & inner
    assert c[core].mean() == pytest.approx(exact[core].mean(), rel=0.25)  # near the exact wide median
    assert c[core].min() > 3 * np.quantile(c[healthy], 0.999)  # the lesion stands far above healthy noise
    assert c[core].mean() / np.quantile(c[healthy], 0.999) > exact[core].mean() / np.quantile(exact[healthy], 0.999)
    both = filter_scales([np.abs(d), d], brain, 2, (5, 5), (1.0, 2.0), ["abs", "signed"], steps=(1, 2))
    np.testing.assert_allclose(both, np.maximum(filter_map(np.abs(d), brain, 2, 5),
                                                2.0 * np.abs(coarse_filter_map(d, ndi.binary_erosion(brain, iterations=2), 5, 2))),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="steps"):
        filter_scales(d, brain, 2, (5, 5), None, "signed", steps=(1,))
    m = dataclasses.replace(MapConfig(), median_sizes=(5, 5, 9), scale_residuals=("abs", "signed", "signed"),
                            scale_steps=(1, 2, 1))
    assert scale_keys(m) == ["5", "5x2", "9"] and scale_steps(m) == (1, 2, 1)
    two_kinds = dataclasses.replace(m, scale_steps=(1, 1, 1))  # width 5 as |r| and as the signed residual
    assert scale_keys(two_kinds) == ["5-abs", "5-signed", "9"]
    with pytest.raises(ValueError, match="repeats"):
        scale_keys(dataclasses.replace(two_kinds, scale_residuals=("abs", "abs", "signed")))
    with pytest.raises(ValueError, match="scale_steps"):
        scale_steps(dataclasses.replace(m, scale_steps=(1, 2)))


def test_multiscale_calibration_sets_gains_and_a_changed_gain_changes_the_map_fingerprint(tmp_path):
    import dataclasses

    from volseg.anomaly.evaluate import Case, calibrate
    from volseg.anomaly.infer import anomaly_volume, load_anomaly_model, load_brain_input
    from volseg.anomaly.train import export_weights
    from volseg.cohort.stages import Context, anomaly_identity
    from volseg.config import config_to_dict
    from volseg.nets.autoencoder import ConvAutoencoder
    from volseg.strip.config import StripConfig

    cfg = _tiny_cfg(tmp_path)
    cfg = dataclasses.replace(cfg, maps=dataclasses.replace(cfg.maps, residual="signed", median_sizes=(3, 7)))
    torch.manual_seed(0)
    net = ConvAutoencoder(1, cfg.net.channels, cfg.net.bottleneck)
    export_weights(net, cfg, tmp_path / "model", {"config": config_to_dict(cfg)})
    model = load_anomaly_model(tmp_path / "model")
    assert model.cfg.maps.median_sizes == (3, 7)
    cases = []
    for seed in (40, 41):
        p, m = _brain_file(tmp_path, seed=seed, name=f"b{seed}")
        data, mask, meta = load_brain_input(p, m)
        cases.append(Case(f"h{seed}", arrays=(data, mask, None, meta)))
    cal = calibrate(model, cases)
    g, q = cal["scale_gains"], cal["scale_thresholds"]
    assert set(g) == {"3", "7"} and g["3"] == 1.0
    assert g["7"] == pytest.approx(q["3"] / q["7"]) and g["7"] > 1  # the wider median is quieter on healthy tissue
    data, mask, _, meta = cases[0].load()
    model.calibration = dict(cal)
    res = anomaly_volume(data, mask, meta, model, voxel_threshold=np.inf)
    assert res.info["ScaleGains"] == pytest.approx(g)
    # pooled over the calibration brains, the stated share of healthy voxels is above the threshold
    vals = np.concatenate([anomaly_volume(d, m, mt, model, voxel_threshold=np.inf).map[m]
                           for d, m, _, mt in (c.load() for c in cases)])
    assert (vals > cal["voxel_threshold"]).mean() == pytest.approx(cal["voxel_fpr"], abs=5e-4)

    def fps(calibration):
        model.calibration = calibration
        ctx = Context(stages=("n4", "strip", "anomaly"), cfg=StripConfig())
        ctx.models["strip"] = {"sha256": "s"}
        ctx.models["anomaly"] = anomaly_identity(model)
        return ctx.fingerprints()

    base = fps(dict(cal))
    thr = fps(dict(cal, voxel_threshold=cal["voxel_threshold"] * 2))
    gain = fps(dict(cal, scale_gains={"3": 1.0, "7": g["7"] * 1.1}))
    assert thr["anomaly_map"] == base["anomaly_map"] and thr["anomaly_mask"] != base["anomaly_mask"]
    assert gain["anomaly_map"] != base["anomaly_map"] and gain["mask"] == base["mask"]


def test_map_settings_added_later_leave_the_identity_of_older_outputs_alone():
    """scale_steps and tta at their defaults are left out of the anomaly model's identity (what
    `volseg run` fingerprints), so an upgrade alone recomputes nothing; set, they change it."""
    import dataclasses
    from types import SimpleNamespace

    from volseg.anomaly.config import AEConfig
    from volseg.cohort.stages import LATER_MAP_KEYS, anomaly_identity

    cfg = AEConfig()
    model = SimpleNamespace(info={"sha256": "x", "net": "ae"}, cfg=cfg, calibration=None, normative=None)
    base = anomaly_identity(model)
    assert not set(LATER_MAP_KEYS) & set(base["settings"]["maps"])
    assert "median_sizes" in base["settings"]["maps"]  # older keys stay, at any value
    for change in ({"tta": True}, {"median_sizes": (5, 5), "scale_steps": (1, 2)}, {"grey_median": 0.77},
                   {"grey_mode": "raise"}):
        model.cfg = dataclasses.replace(cfg, maps=dataclasses.replace(cfg.maps, **change))
        assert anomaly_identity(model)["settings"] != base["settings"], change


def test_calibration_and_metrics_agree_with_direct_computations():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(3)
    healthy = rng.gamma(2.0, 0.05, size=20000)
    thr = voxel_threshold(healthy, 0.01)
    assert (healthy > thr).mean() == pytest.approx(0.01, abs=0.0006)
    assert thr == pytest.approx(np.sort(healthy)[int(0.99 * (healthy.size - 1))], rel=0.02)
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0]
    assert scan_threshold(scores, 95) == pytest.approx(1.905)  # numpy's linear interpolation

    truth = np.zeros(5000, bool); truth[:100] = True
    s = rng.normal(0, 1, 5000) + 2.0 * truth
    m = voxel_metrics(s, truth, threshold=1.5)
    assert m["auroc"] == pytest.approx(roc_auc_score(truth, s))
    # average precision by hand: mean precision at each positive, ranked by score
    order = np.argsort(-s)
    hits = truth[order]
    ap = float(np.mean((np.cumsum(hits) / np.arange(1, hits.size + 1))[hits]))
    assert m["auprc"] == pytest.approx(ap, rel=1e-6)
    assert m["auprc"] == pytest.approx(average_precision_score(truth, s))
    assert m["dice"] == pytest.approx(2 * (truth & (s > 1.5)).sum() / (truth.sum() + (s > 1.5).sum()))
    brute = max(dice(s >= t, truth) for t in np.unique(s))
    assert m["best_dice"] == pytest.approx(brute, rel=1e-6)  # dice: MONAI's compute_dice, in float32

    labels = [1, 1, 1, 0, 0, 0, 0, 1]
    sc = [0.9, 0.8, 0.2, 0.1, 0.3, 0.7, 0.05, 0.6]
    k = scan_metrics(labels, sc, 0.5)
    # predicted: 1 1 0 0 0 1 0 1 -> tp 3, fn 1, fp 1, tn 3
    assert (k["tp"], k["fn"], k["fp"], k["tn"]) == (3, 1, 1, 3)
    assert k["accuracy"] == 0.75 and k["precision"] == 0.75 and k["sensitivity"] == 0.75
    assert k["specificity"] == 0.75 and k["f1"] == pytest.approx(0.75)
    assert k["roc_auc"] == pytest.approx(roc_auc_score(labels, sc))

    v = rng.random(1000)
    assert scan_score(v, 1.0) == pytest.approx(np.sort(v)[-10:].mean())


def test_inserted_lesions_are_where_the_mask_says(tmp_path):
    from volseg.anomaly.lesions import insert_lesions
    from volseg.anomaly.prep import wm_peak

    from volseg.anomaly.data import synth_brain

    data, mask, meta = synth_brain(12)
    out, truth, params = insert_lesions(data, mask, meta.zooms, np.random.default_rng(0))
    wm = wm_peak(data[mask])
    assert len(params) == 3 and truth.any() and not (truth & ~mask).any()
    changed = np.abs(out - data) > 0.05 * wm
    assert changed[truth].mean() > 0.9 and changed[~mask].sum() == 0
    assert 1.25 * wm < np.median(out[truth & (out > wm)]) < 1.55 * wm


def test_outputs_come_back_on_the_input_grid(run_cli, tmp_path, tiny_model):
    for axcodes, oblique in (("LIA", False), ("RAS", True)):
        p, m = _brain_file(tmp_path, seed=50, axcodes=axcodes, oblique=oblique, voxel=(1.6, 1.6, 2.4),
                           name=f"sub-{axcodes}{int(oblique)}_T1w")
        out = tmp_path / f"out{axcodes}{int(oblique)}"
        r = run_cli("anomaly", p, "--mask", m, "-o", out, "--model", tiny_model)
        assert r.returncode == 0, r.stderr
        src, msk = nib.load(p), nib.load(m)
        sid = f"sub-{axcodes}{int(oblique)}"
        amap = nib.load(out / f"{sid}_desc-anomaly_map.nii.gz")
        amask = nib.load(out / f"{sid}_label-anomaly_mask.nii.gz")
        recon = nib.load(out / f"{sid}_desc-reconstruction_T1w.nii.gz")
        for img in (amap, amask, recon):
            assert img.shape == src.shape
            np.testing.assert_allclose(img.affine, src.affine, atol=1e-4)
        assert amap.get_data_dtype() == np.float32 and amask.get_data_dtype() == np.uint8
        a = amap.get_fdata()
        assert (a[msk.get_fdata() == 0] == 0).all() and a.max() > 0
        assert (recon.get_fdata()[msk.get_fdata() == 0] == 0).all()
        side = json.loads((out / f"{sid}_desc-anomaly_map.json").read_text())
        assert side["Model"]["sha256"] and side["VoxelThreshold"] is not None and "ScanScore" in side


def test_bad_inputs_name_the_file_and_others_finish(run_cli, tmp_path, tiny_model):
    good, gm = _brain_file(tmp_path, seed=51, name="good")
    other, _ = _brain_file(tmp_path, seed=52, voxel=(3.0, 3.0, 3.0), name="other")
    r = run_cli("anomaly", good, other, "--mask", gm, "--mask", gm, "-o", tmp_path / "o", "--model", tiny_model)
    assert r.returncode == 1
    assert "other" in r.stderr and "mask" in r.stderr
    assert (tmp_path / "o" / "good_desc-anomaly_map.nii.gz").exists()
    assert not list((tmp_path / "o").glob("other*"))


def test_missing_calibration_and_corrupt_weights_are_refused(tmp_path, tiny_model):
    import shutil

    from volseg.anomaly.infer import load_anomaly_model

    d = tmp_path / "m"
    shutil.copytree(tiny_model, d)
    (d / "calibration.json").unlink()
    with pytest.raises(WeightsError, match="calibrate"):
        load_anomaly_model(d, require_calibration=True)
    blob = bytearray((d / "model.safetensors").read_bytes())
    blob[-10] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(WeightsError, match="checksum"):
        load_anomaly_model(d)


@pytest.mark.skipif(not (SHIPPED / "model.json").exists(), reason="no shipped anomaly model")
def test_shipped_model_maps_an_inserted_lesion_higher_than_healthy_tissue():
    from volseg.anomaly.data import synth_brain
    from volseg.anomaly.infer import anomaly_volume, load_anomaly_model
    from volseg.anomaly.lesions import insert_lesions

    model = load_anomaly_model(None)
    data, mask, meta = synth_brain(777)  # a synthetic brain the model never saw (seed outside training)
    img, truth, _ = insert_lesions(data, mask, meta.zooms, np.random.default_rng(5), n=2, contrasts=(1.45, 0.4))
    res = anomaly_volume(img, mask, meta, model)
    healthy = mask & ~truth
    # the reconstruction is in the input's units and close to the healthy tissue
    ratio = np.median(res.recon[healthy]) / np.median(img[healthy])
    assert 0.85 < ratio < 1.15
    assert res.map[truth].mean() > 3 * res.map[healthy].mean()
    assert res.flag is True
    assert dice(res.mask, truth) > 0.3


AE_RANK_SCRIPT = """\
import os, sys
import torch
import volseg.anomaly.train as T
from volseg.cli import main

rank, out = os.environ["RANK"], sys.argv[1]
nets, build = [], T.build_autoencoder
T.build_autoencoder = lambda cfg: nets.append(build(cfg)) or nets[-1]
code = main(sys.argv[2:])
torch.save(nets[0].state_dict(), os.path.join(out, f"weights-rank{rank}.pt"))
sys.exit(code)
"""


def test_ae_training_under_torchrun_two_cpu_ranks_identical_weights(tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    from volseg.config import config_to_dict
    from volseg import distributed as dist

    import dataclasses

    train_brain, _ = _brain_file(tmp_path, seed=60, voxel=(3.0, 3.0, 3.0), name="train")
    val_brain, _ = _brain_file(tmp_path, seed=61, voxel=(3.0, 3.0, 3.0), name="val")
    cfg = _tiny_cfg(tmp_path, steps=4, steps_per_epoch=2, batch_size=1, device="cpu", amp=False)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, healthy=(str(train_brain),),
                                                            validation=(str(val_brain),)))
    cfg_path = tmp_path / "ae.yaml"
    cfg_path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    (tmp_path / "rank.py").write_text(AE_RANK_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in dist.TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           str(tmp_path / "rank.py"), str(tmp_path), "train", "ae", "-c", str(cfg_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, f"torchrun failed\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    w0 = torch.load(tmp_path / "weights-rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "weights-rank1.pt", weights_only=True)
    for key in w0:
        assert torch.equal(w0[key], w1[key]), f"{key} differs between the ranks"
    run = tmp_path / "run"
    rows = (run / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["2", "4"]  # rank 0 alone wrote
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(torch.equal(ckpt["model"][k], w0[k]) for k in w0)


def test_component_removal_in_mm3_keeps_the_same_volume_whatever_the_voxel_size():
    import dataclasses
    from types import SimpleNamespace

    from volseg.anomaly.infer import apply_calibration, min_component
    from volseg.cohort.stages import Context, anomaly_identity
    from volseg.strip.config import StripConfig

    base = AEConfig()
    cfg = dataclasses.replace(base, maps=dataclasses.replace(base.maps, min_component_mm3=64.0))
    amap = np.zeros((30, 30, 30), np.float32)
    amap[2:4, 2:4, 2:4] = 1.0  # 8 voxels
    amap[10:15, 10:15, 10:15] = 1.0  # 125 voxels
    brain = np.ones(amap.shape, bool)

    def model(c):
        return SimpleNamespace(voxel_threshold=0.5, scan_threshold=None, calibration={"voxel_threshold": 0.5},
                               cfg=c, info={"sha256": "w"}, normative=None)

    # 1 mm voxels: 64 of them are needed and the 8-voxel blob goes; 2 mm voxels: 8 x 8 mm^3 = 64 mm^3 stays
    assert apply_calibration(amap, brain, 0.0, model(cfg), voxel_mm3=1.0)[0].sum() == 125
    assert apply_calibration(amap, brain, 0.0, model(cfg), voxel_mm3=8.0)[0].sum() == 133
    assert min_component(cfg, 8.0) == 8 and min_component(cfg, 27.0) == 3 and min_component(base, None) == 0
    both = dataclasses.replace(cfg, maps=dataclasses.replace(cfg.maps, min_component_voxels=20))
    assert min_component(both, 8.0) == 20  # the larger of the two rules
    with pytest.raises(ValueError, match="voxel volume"):
        apply_calibration(amap, brain, 0.0, model(cfg))
    assert apply_calibration(amap, brain, 0.0, model(base))[0].sum() == 133  # off by default
    # a rerun recomputes the anomaly mask, not the map; the default leaves old identities as they were

    def fps(c):
        ctx = Context(stages=("n4", "strip", "anomaly"), cfg=StripConfig())
        ctx.models["strip"] = {"sha256": "s"}
        ctx.models["anomaly"] = anomaly_identity(model(c))
        return ctx.fingerprints()

    assert "min_component_mm3" not in anomaly_identity(model(base))
    a, b = fps(base), fps(cfg)
    assert a["anomaly_map"] == b["anomaly_map"] and a["anomaly_mask"] != b["anomaly_mask"]
