"""Skull stripping: training runs and its loss falls, weights are checked, masks land on the
input grid, and the shipped model reaches Dice >= 0.95 on Colin27 through the installed CLI."""

from __future__ import annotations

import csv
import dataclasses
import shutil

import nibabel as nib
import numpy as np
import pytest

from volseg.strip.config import AugmentConfig, DataConfig, NetConfig, StripConfig, TrainConfig
from volseg.nets.folder import PACKAGE_MODELS, WeightsError, load_model, write_model

TINY_NET = NetConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
NO_AUG = AugmentConfig(prob=0, flip_lr=0, bias=0, gamma=0, contrast=0, blur=0, noise=0,
                       salt_pepper=0, thick_slices=0, histogram=0, lesion=0)


def _dice(a, b):
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def _tiny_cfg(tmp_path, tiny_head, steps=20, **train_kw):
    image, _ = tiny_head
    return StripConfig(
        net=TINY_NET,
        data=DataConfig(real=(str(image.parent),), validation=(str(image),), synth_count=1,
                        synth_seed=5, synth_ratio=0.5, cache_dir=str(tmp_path / "cache")),
        augment=NO_AUG,
        train=TrainConfig(steps=steps, steps_per_epoch=5, lr=1e-2, threads=1, device="cpu",
                          out_dir=str(tmp_path / "run"), **train_kw),
    )


def test_tiny_network_trains_and_its_loss_falls(tmp_path, tiny_head):
    from volseg.strip.train import train

    cfg = _tiny_cfg(tmp_path, tiny_head)
    summary = train(cfg, progress=False)
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20]
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0] * 0.9, losses
    for key in ("val_dice", "val_iou", "val_hd95_mm"):
        assert all(np.isfinite(float(r[key])) for r in rows)
    assert (tmp_path / "run" / "learning_curve.png").stat().st_size > 1000
    assert (tmp_path / "run" / "best" / "model.safetensors").exists()
    assert summary["steps"] == 20

    # an interrupted run resumed from its checkpoint ends where the uninterrupted one did
    cfg_b = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(tmp_path / "b")))
    train(cfg_b, progress=False, stop_after=10)
    assert [r["step"] for r in csv.DictReader(open(tmp_path / "b" / "log.csv"))] == ["5", "10"]
    summary_b = train(cfg_b, resume=tmp_path / "b" / "last.pt", progress=False)
    assert summary_b["steps"] == 20
    rows_b = list(csv.DictReader(open(tmp_path / "b" / "log.csv")))
    assert [int(r["step"]) for r in rows_b] == [5, 10, 15, 20]
    assert abs(float(rows_b[-1]["train_loss"]) - losses[-1]) < 0.05 * losses[-1]
    # a checkpoint of another schedule is refused with a clear message
    cfg_c = dataclasses.replace(cfg_b, train=dataclasses.replace(cfg_b.train, steps=25))
    with pytest.raises(ValueError, match="20-step schedule"):
        train(cfg_c, resume=tmp_path / "b" / "last.pt", progress=False)


def test_weights_are_checked_and_corruption_refused(tmp_path):
    from volseg.nets import build_unet

    net = build_unet(TINY_NET)
    write_model(net, TINY_NET, tmp_path / "m")
    loaded, info = load_model(tmp_path / "m")
    assert len(info["sha256"]) == 64
    data = bytearray((tmp_path / "m" / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "m" / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="checksum mismatch"):
        load_model(tmp_path / "m")
    with pytest.raises(WeightsError, match="no model.json"):
        load_model(tmp_path / "nowhere")


def test_corrupt_shipped_weights_refused_by_cli(run_cli, tmp_path, tiny_head):
    if not (PACKAGE_MODELS / "strip" / "model.json").exists():
        pytest.fail("the shipped strip model is missing from volseg/models/strip")
    bad = tmp_path / "model"
    shutil.copytree(PACKAGE_MODELS / "strip", bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    res = run_cli("strip", tiny_head[0], "-o", tmp_path / "out", "--model", bad)
    assert res.returncode == 1
    assert "checksum mismatch" in res.stderr and "model.safetensors" in res.stderr
    assert not (tmp_path / "out" / "sub-tiny_desc-brain_mask.nii.gz").exists()


def test_clean_mask_keeps_largest_component_fills_holes_and_moves_border():
    from volseg.strip.infer import clean_mask

    prob = np.zeros((40, 40, 40), np.float32)
    prob[10:30, 10:30, 10:30] = 0.9
    prob[18:22, 18:22, 18:22] = 0.1  # a hole
    prob[2:4, 2:4, 2:4] = 0.9  # a stray blob
    m = clean_mask(prob, (1.0, 1.0, 1.0))
    assert m.dtype == np.uint8 and m[20, 20, 20] == 1 and m[3, 3, 3] == 0
    assert m.sum() == 20**3
    grown = clean_mask(prob, (1.0, 1.0, 1.0), border_mm=2.0)
    shrunk = clean_mask(prob, (1.0, 1.0, 1.0), border_mm=-2.0)
    assert grown.sum() > m.sum() > shrunk.sum()
    assert grown[10:30, 10:30, 10:30].all() and shrunk.sum() >= 15**3


@pytest.fixture(scope="module")
def shipped():
    if not (PACKAGE_MODELS / "strip" / "model.json").exists():
        pytest.fail("the shipped strip model is missing from volseg/models/strip")
    return load_model(kind="strip")[0]


@pytest.mark.parametrize("axcodes,oblique", [("RAS", False), ("LPS", False), ("LIA", False), ("RAS", True)])
def test_masks_come_back_on_the_input_grid(shipped, tmp_path, axcodes, oblique):
    from volseg.io import load_image
    from volseg.strip.config import StripConfig
    from volseg.strip.infer import strip_file
    from volseg.synth import synth_head, write_subject

    subj = synth_head(21, voxel_size=(1.5, 1.5, 1.5), axcodes=axcodes, oblique=oblique)
    paths = write_subject(subj, tmp_path / "in", "sub-geo")
    outs = strip_file(str(paths["image"]), tmp_path / "out", shipped, StripConfig())
    mask_img = nib.load(str(outs["mask"]))
    src = nib.load(str(paths["image"]))
    assert mask_img.shape == src.shape
    assert np.allclose(mask_img.affine, src.affine)
    assert mask_img.get_data_dtype() == np.uint8
    assert "".join(nib.aff2axcodes(mask_img.affine)) == "".join(nib.aff2axcodes(src.affine))
    dice = _dice(np.asarray(mask_img.dataobj), subj.brain_mask)
    assert dice >= 0.9, f"{axcodes} oblique={oblique}: Dice {dice:.3f} with the synthetic truth"
    _, meta = load_image(outs["brain"])
    assert meta.shape == src.shape


@pytest.mark.slow
def test_golden_colin27_through_the_cli(run_cli, shared_data, tmp_path):
    """The shipped model on Colin27 (held out from training) against its BET mask."""
    image = shared_data / "wholehead" / "colin27" / "ch2.nii.gz"
    ref = nib.load(str(shared_data / "wholehead" / "colin27" / "ch2_brainmask.nii.gz"))
    res = run_cli("strip", image, "-o", tmp_path / "out", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    out = nib.load(str(tmp_path / "out" / "ch2_desc-brain_mask.nii.gz"))
    assert out.shape == ref.shape and np.allclose(out.affine, nib.load(str(image)).affine)
    dice = _dice(np.asarray(out.dataobj), np.asarray(ref.dataobj))
    assert dice >= 0.95, f"Colin27 Dice {dice:.4f}"


@pytest.mark.slow
def test_golden_held_out_clinical_scan_through_the_cli(run_cli, shared_data, tmp_path):
    """The shipped model on open_ms patient04 (a clinical 2D T1 with 3 mm slices, held out from
    training; model card 0.949) against the dataset's brain mask."""
    image = shared_data / "wholehead" / "open_ms" / "patient04_study1_T1W.nii.gz"
    ref = nib.load(str(shared_data / "wholehead" / "open_ms" / "patient04_study1_T1W_brainmask.nii.gz"))
    res = run_cli("strip", image, "-o", tmp_path / "out", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    out = nib.load(str(tmp_path / "out" / "patient04_study1_desc-brain_mask.nii.gz"))  # "_T1W" is dropped
    assert out.shape == ref.shape and np.allclose(out.affine, nib.load(str(image)).affine)
    dice = _dice(np.asarray(out.dataobj), np.asarray(ref.dataobj))
    assert dice >= 0.94, f"patient04 Dice {dice:.4f}"


def test_find_pairs_from_folder_csv_and_file(tmp_path, tiny_head):
    from volseg.strip.data import find_pairs

    image, mask = tiny_head
    folder_pairs = find_pairs(image.parent)
    assert folder_pairs == [(image.resolve(), mask.resolve())]
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text(f"image,mask\n{image},{mask}\n")
    assert find_pairs(csv_path) == [(image.resolve(), mask.resolve())]
    assert find_pairs(image) == [(image.resolve(), mask.resolve())]
    bad = tmp_path / "bad.csv"
    bad.write_text("img,msk\na,b\n")
    with pytest.raises(ValueError, match="columns 'image' and 'mask'"):
        find_pairs(bad)


def test_lesion_augmentation_paints_inside_the_brain_only():
    import torch

    from volseg.strip.augment import RandBrainLesiond, train_augmentation

    shape = (48, 64, 56)
    zz = np.indices(shape)
    brain = sum(((zz[i] - c) / r) ** 2 for i, (c, r) in enumerate(zip((24, 32, 28), (16, 22, 18)))) <= 1
    head = sum(((zz[i] - c) / r) ** 2 for i, (c, r) in enumerate(zip((24, 32, 28), (21, 28, 24)))) <= 1
    img = np.where(brain, 0.6, np.where(head, 0.9, 0.0)).astype(np.float32)
    sample = {"image": torch.from_numpy(img[None].copy()), "label": torch.from_numpy(brain[None].astype(np.float32))}
    t = RandBrainLesiond("image", prob=1.0)
    changed = np.zeros(shape, bool)
    for seed in range(4):
        t.set_random_state(seed)
        out = t(dict(sample))
        assert torch.equal(out["label"], sample["label"]), "the label must not change"
        diff = np.abs(out["image"][0].numpy() - img) > 1e-3
        assert not diff[~brain].any(), "a lesion leaked outside the brain"
        changed |= diff
    assert changed[brain].mean() > 0.01  # lesions of 4-30 mm were painted
    # the whole chain with every augmentation on keeps a binary label of the same size
    cfg = dataclasses.replace(AugmentConfig(), prob=1, flip_lr=1, bias=1, gamma=1, contrast=1, blur=1,
                              noise=1, salt_pepper=1, thick_slices=1, histogram=1, lesion=1)
    out = train_augmentation(cfg)(dict(sample))
    assert out["image"].shape == sample["image"].shape and out["label"].shape == sample["label"].shape
    assert not torch.allclose(torch.as_tensor(out["image"]), sample["image"])


@pytest.mark.parametrize("border_mm", [0.0, 2.5, -2.0])
def test_clean_mask_in_its_box_equals_the_whole_volume(border_mm):
    """clean_mask works inside the thresholded voxels' box plus a margin: same mask as the
    whole-volume operations, also when the mask touches the volume's edge, has a hole and a
    second smaller blob."""
    from scipy import ndimage as ndi

    from volseg.strip.infer import _clean, clean_mask

    rng = np.random.default_rng(1)
    prob = ndi.gaussian_filter(rng.random((60, 50, 40)), 3)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    prob[20:30, 20:30, 0:12] = 0.9          # reaches the z = 0 edge
    prob[24:26, 24:26, 5:7] = 0.0           # a hole
    prob[50:55, 5:9, 30:35] = 0.95          # a second blob
    zooms = (1.0, 1.2, 2.0)
    for thr in (0.5, 0.6, 0.7):
        ref = _clean(prob > thr, zooms, border_mm)
        assert np.array_equal(clean_mask(prob, zooms, thr, border_mm), ref)
    assert not clean_mask(np.zeros((5, 5, 5)), zooms, 0.5, border_mm).any()


def test_to_native_above_a_threshold_gives_the_same_mask(tiny_head):
    """Inverting only near grid voxels above the threshold changes no thresholded voxel (an
    oblique LIA head, a smooth probability with a second blob)."""
    import torch
    from monai.data import MetaTensor
    from scipy import ndimage as ndi

    from volseg.config import Config
    from volseg.io import load_image
    from volseg.preprocess import prepare
    from volseg.strip.infer import to_native
    from volseg.synth import synth_head

    subj = synth_head(5, voxel_size=1.5, axcodes="LIA", oblique=True)
    path = tiny_head[0].parent / "lia_oblique.nii.gz"  # read back through a file: the real path
    nib.save(nib.Nifti1Image(subj.image.astype(np.float32), subj.affine), str(path))
    data, meta = load_image(path)
    prep = prepare(data, meta, Config())
    g = prep.grid_image
    rng = np.random.default_rng(0)
    p = ndi.gaussian_filter(rng.random(g.shape[1:]), 4)
    p = (p - p.min()) / (p.max() - p.min())
    prob = MetaTensor(torch.as_tensor(p[None].astype(np.float32)), affine=g.affine)
    full = to_native(prob, prep)
    for thr in (0.5, 0.7):
        part = to_native(prob, prep, above=thr)
        assert np.array_equal(part > thr, full > thr)
        assert (full > thr).sum() > 100


def test_synthetic_pool_contrasts_are_fixed_by_seed_and_weighted(tmp_path):
    from collections import Counter

    from volseg.strip.data import synth_contrast

    cons, w = ("t1", "t2", "flair"), (0.5, 0.3, 0.2)
    draws = [synth_contrast(s, cons, w) for s in range(2000)]
    assert draws == [synth_contrast(s, cons, w) for s in range(2000)]
    share = Counter(draws)
    assert abs(share["t1"] / 2000 - 0.5) < 0.04 and abs(share["flair"] / 2000 - 0.2) < 0.04
    assert {synth_contrast(s) for s in range(50)} == {"t1"}
    assert {synth_contrast(s, cons, (0, 1, 0)) for s in range(50)} == {"t2"}
    with pytest.raises(ValueError, match="'t3' is not one of"):
        synth_contrast(1, ("t1", "t3"))
    with pytest.raises(ValueError, match="one per contrast"):
        synth_contrast(1, cons, (1.0, 1.0))


def test_fine_tuning_from_init_changes_weights_and_keeps_the_architecture(tmp_path, tiny_head):
    import torch

    from volseg.nets import build_unet
    from volseg.strip.train import train

    torch.manual_seed(3)
    write_model(build_unet(TINY_NET), TINY_NET, tmp_path / "start")
    start, _ = load_model(tmp_path / "start")
    cfg = _tiny_cfg(tmp_path, tiny_head, steps=5)
    train(cfg, progress=False, init=tmp_path / "start")
    tuned, info = load_model(tmp_path / "run" / "final")
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in info["net"].items()} == dataclasses.asdict(TINY_NET)
    assert info["init"]["model_dir"] == str(tmp_path / "start")
    before, after = start.state_dict(), tuned.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    # it started from the init's weights: closer to them than a fresh network is
    fresh = build_unet(TINY_NET).state_dict()
    def dist(a):
        return sum(float((a[k] - after[k]).float().norm()) for k in after)

    assert dist(before) < dist(fresh)
    # another architecture is refused, naming the folder
    other = NetConfig(channels=(4, 8), strides=(2,), num_res_units=1)
    write_model(build_unet(other), other, tmp_path / "other")
    with pytest.raises(WeightsError, match="differs from the config"):
        train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(tmp_path / "x"))),
              progress=False, init=tmp_path / "other")
