"""The one training loop (volseg.training.train_loop) with the strip and anomaly hooks: a few
steps on tiny networks, resume from last.pt, the best epoch exported as a loadable model
folder; the shared train config base; Dice/IoU from MONAI equal the hand computation."""

from __future__ import annotations

import csv
import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from volseg.config import Config, ConfigError, TrainBase, config_from_dict, config_to_dict
from volseg.nets.folder import load_model
from volseg.strip.config import AugmentConfig, DataConfig, NetConfig, StripConfig, TrainConfig

TINY_NET = NetConfig(channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
NO_AUG = AugmentConfig(prob=0, flip_lr=0, bias=0, gamma=0, contrast=0, blur=0, noise=0,
                       salt_pepper=0, thick_slices=0, histogram=0, lesion=0)
NO_N4 = dataclasses.replace(Config(), n4=dataclasses.replace(Config().n4, backend="none"))


def _rows(run):
    return list(csv.DictReader(open(run / "log.csv")))


# --- config base ----------------------------------------------------------------------------

def test_train_configs_extend_the_base_with_their_own_fields_and_defaults():
    from volseg.anomaly.config import AEConfig, AETrainConfig

    base = {f.name for f in dataclasses.fields(TrainBase)}
    strip, ae = TrainConfig(), AETrainConfig()
    assert isinstance(strip, TrainBase) and isinstance(ae, TrainBase)
    assert {f.name for f in dataclasses.fields(TrainConfig)} - base == {"lambda_dice", "lambda_focal"}
    assert {f.name for f in dataclasses.fields(AETrainConfig)} - base == {"patch"}
    assert dataclasses.asdict(strip) == dict(
        steps=3000, steps_per_epoch=150, batch_size=1, lr=2e-3, weight_decay=1e-5, ema=0.0, seed=0, threads=2,
        device="auto", amp=True, out_dir="runs/strip", lambda_dice=1.0, lambda_focal=1.0)
    assert dataclasses.asdict(ae) == dict(
        steps=2000, steps_per_epoch=200, batch_size=4, lr=1e-3, weight_decay=1e-5, ema=0.0, seed=0, threads=2,
        device="auto", amp=True, out_dir="runs/ae", patch=(64, 64, 64))
    # inherited fields are typed and checked, own fields too, unknown keys are errors
    cfg = config_from_dict({"train": {"lr": 1, "patch": [8, 8, 8]}}, AEConfig)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.train.patch == (8, 8, 8)
    with pytest.raises(ConfigError, match="train.lambda_dice"):
        config_from_dict({"train": {"lambda_dice": 1.0}}, AEConfig)
    with pytest.raises(ConfigError, match="train.steps' must be an integer"):
        config_from_dict({"train": {"steps": "many"}}, StripConfig)


def test_shipped_configs_and_model_json_configs_still_load():
    from volseg.anomaly.config import AEConfig, load_ae_config
    from volseg.nets.folder import PACKAGE_MODELS
    from volseg.strip.config import load_strip_config

    assert load_strip_config("configs/strip.yaml").train.out_dir == "runs/strip"
    assert load_ae_config("configs/ae.yaml").train.batch_size == 4
    for kind, cls in (("strip", StripConfig), ("ae", AEConfig)):
        info = json.loads((PACKAGE_MODELS / kind / "model.json").read_text())
        assert config_from_dict(info["config"], cls).train.steps > 0


# --- metrics --------------------------------------------------------------------------------

def test_mask_metrics_dice_and_iou_equal_the_hand_computation():
    from volseg.strip.train import mask_metrics

    rng = np.random.default_rng(3)
    pred = rng.random((12, 10, 8)) > 0.4
    ref = rng.random((12, 10, 8)) > 0.5
    inter, union = (pred & ref).sum(), (pred | ref).sum()
    m = mask_metrics(pred, ref, 2.0)
    assert m["dice"] == pytest.approx(2 * inter / (pred.sum() + ref.sum()), rel=1e-6)
    assert m["iou"] == pytest.approx(inter / union, rel=1e-6)
    assert np.isfinite(m["hd95_mm"]) and m["hd95_mm"] >= 0
    same = mask_metrics(ref, ref, 1.0)
    assert (same["dice"], same["iou"], same["hd95_mm"]) == (1.0, 1.0, 0.0)
    empty = np.zeros_like(ref)
    assert mask_metrics(empty, ref, 1.0)["dice"] == 0.0 and mask_metrics(ref, empty, 1.0)["iou"] == 0.0
    assert mask_metrics(empty, empty, 1.0)["dice"] == 1.0  # nothing to find, nothing found


def test_anomaly_dice_is_monai_and_keeps_its_empty_cases():
    from volseg.anomaly.metrics import dice

    a = np.zeros((6, 6, 6)); a[1:4, 1:4, 1:4] = 1  # 27 voxels
    b = np.zeros((6, 6, 6)); b[2:5, 1:4, 1:4] = 1  # 27 voxels, 18 shared
    assert dice(a, b) == pytest.approx(2 * 18 / 54, rel=1e-6)
    assert dice(np.zeros(5), np.zeros(5)) == 1.0  # 0/0: as before
    assert dice(np.ones(5), np.zeros(5)) == 0.0 and dice(np.zeros(5), np.ones(5)) == 0.0


# --- the loop with the strip hooks ----------------------------------------------------------

def _strip_cfg(tmp_path, tiny_head, out="run", steps=4):
    image, _ = tiny_head
    return StripConfig(
        net=TINY_NET,
        data=DataConfig(real=(str(image.parent),), validation=(), synth_count=0, cache_dir=str(tmp_path / "cache")),
        augment=NO_AUG,
        train=TrainConfig(steps=steps, steps_per_epoch=2, lr=1e-2, threads=1, device="cpu", amp=False,
                          out_dir=str(tmp_path / out)),
        preprocess=NO_N4,
    )


def test_strip_training_resumes_and_exports_a_loadable_best_model(tmp_path, tiny_head):
    from volseg.strip.train import train

    cfg = _strip_cfg(tmp_path, tiny_head)
    run = tmp_path / "run"
    s = train(cfg, progress=False, stop_after=2)
    assert s["steps"] == 2 and torch.load(run / "last.pt", weights_only=True)["step"] == 2
    assert not (run / "final").exists()  # the schedule did not end
    s = train(cfg, resume=run / "last.pt", progress=False)
    assert s["steps"] == 4 and set(s) == {"steps", "best_val_dice", "wall_s", "out_dir", "history"}
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["total_steps"] == 4 and "best_dice" in ckpt
    rows = _rows(run)
    assert [r["step"] for r in rows] == ["2", "4"] and [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0]) == ["step", "epoch", "train_loss", "val_dice", "val_iou", "val_hd95_mm", "lr", "seconds"]
    assert (run / "learning_curve.png").stat().st_size > 1000 and (run / "summary.json").exists()
    # no validation scans: every epoch is the best; the export is a checked model folder
    net, info = load_model(run / "best", kind="strip")
    assert set(info) == {"net", "weights", "sha256", "step", "validation", "config"} and info["step"] == 4
    assert info["config"] == config_to_dict(cfg)
    for key, value in net.state_dict().items():  # float16 on disk
        assert torch.allclose(value, ckpt["model"][key].float(), atol=1e-2), key
    assert load_model(run / "final", kind="strip")[1]["step"] == 4


def test_strip_best_model_is_chosen_by_validation_dice(tmp_path, tiny_head, monkeypatch):
    import volseg.strip.train as T

    dice = iter([0.8, 0.6, 0.9])
    real_validate = T.validate

    def scripted(net, val, device, spacing):
        v = real_validate(net, val, device, spacing)
        return dict(v, dice=next(dice))

    monkeypatch.setattr(T, "validate", scripted)
    import shutil

    val = tmp_path / "val"  # a copy under another path: validation scans are kept out of training
    val.mkdir()
    for path in tiny_head:
        shutil.copy(path, val / path.name)
    cfg = _strip_cfg(tmp_path, tiny_head, steps=6)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, validation=(str(val / tiny_head[0].name),)))
    s = T.train(cfg, progress=False)
    run = tmp_path / "run"
    assert s["best_val_dice"] == 0.9 and [float(r["val_dice"]) for r in _rows(run)] == [0.8, 0.6, 0.9]
    assert json.loads((run / "best" / "model.json").read_text())["step"] == 6
    assert torch.load(run / "last.pt", weights_only=True)["best_dice"] == 0.9


def test_ignore_mask_rides_with_the_label_and_leaves_its_voxels_out_of_the_loss(tmp_path, tiny_head):
    """Pseudo-labels (scripts/pseudo_labels.py): a CSV row's ``ignore`` mask is cached as ``valid``
    on the grid, moves with the label through the augmentation, and the loss does not see what the
    label says inside it."""
    from volseg.strip.data import cached_real, find_pairs, load_cached
    from volseg.strip.train import MixedGridDataset, StripHooks

    image, mask = tiny_head
    ref = nib.load(mask)
    ignore = np.zeros(ref.shape, np.uint8)
    ignore[: ref.shape[0] // 2] = 1  # the left half is not trusted
    nib.save(nib.Nifti1Image(ignore, ref.affine), tmp_path / "ignore.nii.gz")
    (tmp_path / "pairs.csv").write_text(f"image,mask,ignore\n{image},{mask},{tmp_path / 'ignore.nii.gz'}\n"
                                        f"{image},{mask},\n")
    pairs = find_pairs(tmp_path / "pairs.csv")
    assert pairs == [(image.resolve(), mask.resolve(), (tmp_path / "ignore.nii.gz").resolve()),
                     (image.resolve(), mask.resolve())]
    cfg = _strip_cfg(tmp_path, tiny_head)
    cached = cached_real(pairs, cfg.preprocess, tmp_path / "cache")
    assert len(set(cached)) == 2  # the ignore mask is part of the cache key
    img, m, valid = load_cached(cached[0], with_valid=True)
    assert load_cached(cached[1], with_valid=True)[2] is None
    assert valid.shape == m.shape and set(np.unique(valid)) == {0.0, 1.0}
    # the ignored half of the image is one side of the grid, and the brain is on both sides
    x_left_out = np.argwhere(valid == 0)[:, 0]
    assert x_left_out.max() - x_left_out.min() < valid.shape[0] // 2 + 4
    assert m[valid == 0].sum() > 0.3 * m[valid == 1].sum() > 0
    no_aug = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=3))
    ds = MixedGridDataset([cached[0]], [], no_aug, length=1)
    x, y, w = ds[0]
    assert x.shape == y.shape == w.shape == (1, *m.shape)
    assert torch.equal(w[0], torch.from_numpy(valid)) and torch.equal(y[0], torch.from_numpy(m))
    plain = MixedGridDataset([cached[1]], [], no_aug, length=1)[0]
    assert len(plain) == 3 and bool((plain[2] == 1).all())
    # with augmentation the weight moves with the mask (flipped left-right together)
    flip = dataclasses.replace(cfg, augment=dataclasses.replace(NO_AUG, flip_lr=1.0))
    xf, yf, wf = MixedGridDataset([cached[0]], [], flip, length=1)[0]
    assert torch.equal(wf, torch.flip(w, dims=[1])) and torch.equal(yf, torch.flip(y, dims=[1]))
    # the loss ignores what the label says in the left-out voxels, and only there
    hooks = StripHooks(cfg)
    net = torch.nn.Conv3d(1, 1, 3, padding=1)
    batch = [x[None], y[None], w[None]]
    from contextlib import nullcontext

    base = float(hooks.loss(net, batch, nullcontext))
    flipped_inside = torch.where(w > 0, y, 1 - y)
    assert float(hooks.loss(net, [x[None], flipped_inside[None], w[None]], nullcontext)) == pytest.approx(base, rel=1e-6)
    flipped_outside = torch.where(w > 0, 1 - y, y)
    assert abs(float(hooks.loss(net, [x[None], flipped_outside[None], w[None]], nullcontext)) - base) > 0.05
    net.zero_grad()
    hooks.loss(net, batch, nullcontext).backward()
    assert net.weight.grad.abs().sum() > 0


def test_weight_average_is_validated_exported_checkpointed_and_resumed(tmp_path, tiny_head):
    from volseg.strip.train import train

    def cfg_with(out, ema):
        cfg = _strip_cfg(tmp_path, tiny_head, out=out)
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ema=ema))

    full = tmp_path / "full"
    train(cfg_with("full", 0.5), progress=False)
    ckpt = torch.load(full / "last.pt", weights_only=True)
    assert int(ckpt["ema"]["n_averaged"]) == 4  # one update per optimiser step
    averaged = {k[len("module."):]: v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    assert set(averaged) == set(ckpt["model"])
    net, info = load_model(full / "final", kind="strip")
    assert info["config"]["train"]["ema"] == 0.5
    to_avg = to_last = 0.0
    for key, value in net.state_dict().items():  # the export is the average, not the last step
        assert torch.allclose(value, averaged[key].float(), atol=1e-2), key
        to_avg = max(to_avg, float((value - averaged[key].float()).abs().max()))
        to_last = max(to_last, float((value - ckpt["model"][key].float()).abs().max()))
    assert to_last > 5 * to_avg, (to_last, to_avg)
    # interrupted and resumed: the average goes on from the checkpoint's, same result
    part = tmp_path / "part"
    train(cfg_with("part", 0.5), progress=False, stop_after=2)
    assert int(torch.load(part / "last.pt", weights_only=True)["ema"]["n_averaged"]) == 2
    train(cfg_with("part", 0.5), resume=part / "last.pt", progress=False)
    resumed = torch.load(part / "last.pt", weights_only=True)["ema"]
    for key, value in ckpt["ema"].items():
        assert torch.allclose(value.float(), resumed[key].float(), atol=1e-5), key
    # a checkpoint without an average cannot be resumed with one; the decay is checked
    plain = tmp_path / "plain"
    train(cfg_with("plain", 0.0), progress=False, stop_after=2)
    assert "ema" not in torch.load(plain / "last.pt", weights_only=True)
    with pytest.raises(ValueError, match="no weight average"):
        train(cfg_with("plain", 0.5), resume=plain / "last.pt", progress=False)
    with pytest.raises(ValueError, match="train.ema must be"):
        train(cfg_with("bad", 1.5), progress=False)


# --- the loop with the anomaly hooks --------------------------------------------------------

def _brain(tmp_path, seed, name):
    from volseg.synth import synth_head

    subj = synth_head(seed, voxel_size=(3.0, 3.0, 3.0))
    mask = subj.brain_mask > 0
    path = tmp_path / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(np.where(mask, subj.image, 0).astype(np.float32), subj.affine), path)
    return path


def test_ae_training_resumes_and_exports_a_loadable_best_model(tmp_path):
    from volseg.anomaly.config import AEConfig
    from volseg.anomaly.train import train

    cfg = config_from_dict({
        "net": {"channels": [4, 8], "bottleneck": 4},
        "data": {"healthy": [str(_brain(tmp_path, 60, "train"))], "validation": [str(_brain(tmp_path, 61, "val"))],
                 "synth_count": 0, "cache_dir": str(tmp_path / "cache")},
        "train": {"steps": 2, "steps_per_epoch": 1, "batch_size": 1, "patch": [32, 32, 32], "threads": 1,
                  "device": "cpu", "amp": False, "out_dir": str(tmp_path / "run")},
        "maps": {"n4": False},
    }, AEConfig)
    run = tmp_path / "run"
    assert train(cfg, progress=False, stop_after=1)["steps"] == 1
    s = train(cfg, resume=run / "last.pt", progress=False)
    assert s["steps"] == 2 and "best_val_auprc" in s
    assert [r["step"] for r in _rows(run)] == ["1", "2"]
    assert list(_rows(run)[0]) == ["step", "epoch", "train_loss", "val_auprc", "val_l1", "lr", "seconds"]
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 2
    _, info = load_model(run / "best", kind="ae")
    assert set(info) == {"net", "weights", "sha256", "step", "validation", "init", "config", "kind"}
    assert info["kind"] == "ae" and info["init"] is None and np.isfinite(info["validation"]["l1"])
    assert load_model(run / "final", kind="ae")[1]["step"] == 2
