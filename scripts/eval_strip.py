#!/usr/bin/env python3
"""Native-space accuracy of a skull-stripping model on held-out real scans.

Runs :func:`volseg.strip.infer.strip_volume` (the same code as ``volseg strip``) on each scan
and compares the mask with the reference on the scan's own grid: Dice, IoU, 95% Hausdorff (mm)
and the volume difference. Besides the real scans it makes one stress case in memory:
Colin27 re-sliced to 5 mm axial slices (5 neighbouring 1 mm slices averaged; the reference
mask by majority), standing in for thick-slice clinical scans, and the same with two
tumour-like lesions painted into the brain (15-25 mm semi-axes, one bright like enhancing
tumour, one dark like necrosis; :func:`volseg.anomaly.lesions.insert_lesions`), standing in for
the glioma scans we do not have with skull.

``dice_rigid`` is a diagnostic of the reference, not a score: the Dice after the reference mask
is moved rigidly onto the prediction. A large gain means the reference sits off the brain (as
open_ms patient03's does, about 10 mm superior).

With ``--contrasts t2,flair,pd`` it also strips synthetic heads of those contrasts drawn from
label maps (:func:`volseg.synth.synth_head` with ``contrast=``; seeds from ``--synth-seed``,
9100 by default, far from the training pools' 1000-1319), ``--per-contrast`` heads each, every
one with its own random voxel size, orientation and field of view, and compares with the exact
synthetic brain mask.

    .venv/bin/python scripts/eval_strip.py [--model DIR] [--json OUT] [--tta] [SCAN ...]
    .venv/bin/python scripts/eval_strip.py --contrasts t2,flair,pd --per-contrast 4 --no-real

Default scans: Colin27, open_ms patient04 and patient03 (held out from the shipped model's
training).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def metrics(pred, ref, zooms) -> dict:
    """Dice, IoU and 95% Hausdorff (MONAI's, as in training's validation) and both volumes."""
    from volseg.strip.train import mask_metrics

    p, r = pred > 0, ref > 0
    m = mask_metrics(p, r, list(zooms))
    vox = float(np.prod(zooms)) / 1000
    return {"dice": round(m["dice"], 4), "iou": round(m["iou"], 4),
            "hd95_mm": round(m["hd95_mm"], 2), "vol_pred_ml": round(p.sum() * vox, 1),
            "vol_ref_ml": round(r.sum() * vox, 1)}


def rigid_dice(pred, ref, meta) -> float:
    """Dice after a rigid registration of the reference mask onto the predicted one."""
    import SimpleITK as sitk

    from volseg.anomaly.metrics import dice  # MONAI's compute_dice

    def img(a):
        im = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(a > 0, (2, 1, 0))).astype(np.float32))
        im.SetSpacing([float(z) for z in meta.zooms])
        return im

    fixed, moving = img(pred), img(ref)
    fs, ms = (sitk.SmoothingRecursiveGaussian(x, 2.0) for x in (fixed, moving))
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMeanSquares()
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 300)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetInitialTransform(sitk.CenteredTransformInitializer(
        fs, ms, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS), inPlace=False)
    tx = reg.Execute(fs, ms)
    moved = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, sitk.sitkNearestNeighbor, 0)) > 0.5
    p = sitk.GetArrayFromImage(fixed) > 0.5
    return round(dice(p, moved), 4)


def with_tumour(data, mask, meta, seed=7):
    from volseg.anomaly.lesions import insert_lesions

    img, _, _ = insert_lesions(data, mask > 0, meta.zooms, np.random.default_rng(seed), n=2,
                               radius_mm=(15.0, 25.0), contrasts=(1.6, 0.5), min_depth_mm=2.0)
    return img


def thick_slices(data, mask, meta, factor=5):
    from volseg.io import ImageMeta

    n = data.shape[2] // factor * factor
    d = data[:, :, :n].reshape(data.shape[0], data.shape[1], -1, factor).mean(-1)
    m = (mask[:, :, :n].reshape(mask.shape[0], mask.shape[1], -1, factor).mean(-1) > 0.5).astype(np.uint8)
    aff = meta.affine.copy()
    aff[:3, 2] *= factor
    aff[:3, 3] += meta.affine[:3, 2] * (factor - 1) / 2.0
    zooms = (meta.zooms[0], meta.zooms[1], meta.zooms[2] * factor)
    return d, m, ImageMeta(path=meta.path + f" (resliced {factor} mm)", affine=aff, shape=d.shape, zooms=zooms)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scans", nargs="*")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--contrasts", default="", help="comma-separated synthetic contrasts (t1,t2,pd,flair,any)")
    ap.add_argument("--per-contrast", type=int, default=4, help="synthetic heads per contrast")
    ap.add_argument("--synth-seed", type=int, default=9100)
    ap.add_argument("--no-real", action="store_true", help="synthetic heads only")
    args = ap.parse_args()

    from volseg.io import load_image
    from volseg.strip.config import StripConfig
    from volseg.strip.data import find_pairs
    from volseg.strip.infer import strip_volume
    from volseg.nets.folder import load_model

    shared = Path(os.environ.get("VOLSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
    scans = args.scans or [str(shared / "wholehead/colin27/ch2.nii.gz"),
                           str(shared / "wholehead/open_ms/patient04_study1_T1W.nii.gz"),
                           str(shared / "wholehead/open_ms/patient03_study2_T1W.nii.gz")]
    net, info = load_model(args.model, kind="strip")
    cfg = StripConfig()
    results = {}
    for scan in [] if args.no_real else scans:
        pairs = find_pairs(scan)
        if not pairs:
            print(f"{scan}: no reference mask beside it; skipped")
            continue
        data, meta = load_image(scan)
        ref, _ = load_image(pairs[0][1])
        cases = [(Path(scan).name, data, ref, meta)]
        if "ch2" in Path(scan).name:
            cases.append((Path(scan).name + " 5mm-slices", *thick_slices(data, ref, meta)))
            cases.append((Path(scan).name + " tumours 5mm-slices",
                          *thick_slices(with_tumour(data, ref, meta), ref, meta)))
        for name, d, r, m in cases:
            mask, _, timings = strip_volume(d, m, net, cfg, tta=args.tta)
            res = metrics(mask, r, m.zooms)
            res["dice_rigid"] = rigid_dice(mask, r, m)
            res["total_s"] = timings["total_s"]
            results[name] = res
            print(f"{name:45s} " + " ".join(f"{k}={v}" for k, v in res.items()), flush=True)
    contrasts = [c.strip() for c in args.contrasts.split(",") if c.strip()]
    per_contrast = {}
    for ci, contrast in enumerate(contrasts):
        from volseg.synth import synth_head

        for k in range(args.per_contrast):
            seed = args.synth_seed + 100 * ci + k
            subj = synth_head(seed, contrast=contrast)
            m = subj.meta(f"<synth {contrast} {seed}>")
            zooms = m.zooms
            mask, _, timings = strip_volume(subj.image, m, net, cfg, tta=args.tta)
            res = metrics(mask, subj.brain_mask, zooms)
            res["total_s"] = timings["total_s"]
            res["voxel_mm"] = [round(z, 2) for z in zooms]
            name = f"synth-{contrast}-{seed}"
            results[name] = res
            per_contrast.setdefault(contrast, []).append(res["dice"])
            print(f"{name:45s} " + " ".join(f"{k2}={v}" for k2, v in res.items()), flush=True)
    for contrast, dices in per_contrast.items():
        print(f"synthetic {contrast}: mean Dice {np.mean(dices):.4f}, min {np.min(dices):.4f} "
              f"over {len(dices)} heads", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"model_sha256": info["sha256"], "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
