#!/usr/bin/env python
"""Measure the anomaly stage on the shared data, beside the no-model baseline.

Cases (none used for training or calibration by configs/ae.yaml):
  - healthy/norm.mgz (a FreeSurfer-normalised real brain) with evaluation lesions inserted
    (3 ellipsoids of 6-12 mm semi-axes, two at ~1.4x and one at ~0.45x white matter, soft
    edges and texture), several seeds, plus the healthy brain itself;
  - real lesions: lesion/brats2013 (glioma, post-contrast T1, z-scored: labels > 0) and
    lesion/open_ms_mni/patient19 (MS, T1, consensus lesion mask).

Baselines (no model), with the same erosion, median filter and inversion as the model's map:
the raw intensity on the white-matter scale (as in ../shared/ref/anomaly-baselines.md), and
|x - 1| (distance from the white-matter level).

    python scripts/eval_anomaly.py [--model DIR] [-o runs/eval_anomaly] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("-o", "--output", type=Path, default=REPO / "runs" / "eval_anomaly")
    ap.add_argument("--seeds", type=int, default=3, help="lesion cases made in norm.mgz")
    ap.add_argument("--no-real", action="store_true", help="skip the real-lesion cases")
    ap.add_argument("--no-panels", action="store_true")
    args = ap.parse_args()
    shared = Path(os.environ.get("VOLSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not shared.is_dir():
        print(f"shared data not found at {shared}", file=sys.stderr)
        return 2

    import torch

    torch.set_num_threads(2)
    from volseg.anomaly.evaluate import Case, evaluate, lesion_cases
    from volseg.anomaly.infer import anomaly_volume, load_anomaly_model
    from volseg.anomaly.maps import residual_map
    from volseg.anomaly.metrics import voxel_metrics

    model = load_anomaly_model(args.model, require_calibration=True)
    groups = {"synthetic lesions in held-out healthy/norm.mgz":
              lesion_cases(str(shared / "healthy" / "norm.mgz"), None, args.seeds, seed=100)}
    if not args.no_real:
        brats = []
        for pat in sorted((shared / "lesion" / "brats2013").glob("pat*")):
            brats.append(Case(id=f"brats-{pat.name}-T1c", image=str(pat / "T1c_subtrMeanDivStd.nii.gz"),
                              mask=str(pat / "brainmask.nii.gz"), lesion=str(pat / "OTMultiClass.nii.gz")))
        groups["glioma T1c (BRATS 2013)"] = brats
        ms = shared / "lesion" / "open_ms_mni" / "patient19"
        groups["MS T1 (open_ms patient19)"] = [Case(
            id="openms-patient19-T1", image=str(ms / "T1_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz"),
            lesion=str(ms / "GOLD_STANDARD_N4_noneck_reduced_winsor_regtoFLAIR_regtoMNI.nii.gz"))]

    report = {}
    for name, cases in groups.items():
        out = args.output / name.split()[0].replace("/", "_")
        summary = evaluate(model, cases, out, panels=not args.no_panels)
        # the no-model baseline on the same cases
        pooled_s, pooled_r, pooled_t = [], [], []
        cfg = model.cfg
        erode = int(round(cfg.maps.erode_mm / cfg.preprocess.grid.spacing_mm))
        for case in cases:
            data, mask, lesion, meta = case.load()
            if lesion is None:
                continue
            res = anomaly_volume(data, mask, meta, model)
            g = res.prep.grid_image[0].numpy()
            base = residual_map(g, np.where(res.prep.grid_mask, 1.0, 0.0), res.prep.grid_mask, "abs", erode,
                                cfg.maps.median_size)
            native = np.where(mask, res.prep.to_native(base), 0)
            raw = residual_map(g, np.zeros_like(g), res.prep.grid_mask, "abs", erode, cfg.maps.median_size)
            raw_native = np.where(mask, res.prep.to_native(raw), 0)
            pooled_s.append(native[mask].astype(np.float32)); pooled_t.append(lesion[mask])
            pooled_r.append(raw_native[mask].astype(np.float32))
        base = voxel_metrics(np.concatenate(pooled_s), np.concatenate(pooled_t)) if pooled_s else {}
        rawm = voxel_metrics(np.concatenate(pooled_r), np.concatenate(pooled_t)) if pooled_r else {}
        v = summary.get("voxel", {})
        report[name] = {"model": {k: v.get(k) for k in ("auroc", "auprc", "dice", "best_dice", "fpr", "sensitivity")},
                        "baseline_distance_from_wm": {k: base.get(k) for k in ("auroc", "auprc", "best_dice")},
                        "baseline_raw_intensity": {k: rawm.get(k) for k in ("auroc", "auprc", "best_dice")},
                        "scan": summary.get("scan"),
                        "per_case": [{k: r.get(k) for k in ("id", "auprc", "dice", "best_dice", "score", "flag",
                                                            "anomaly_s")} for r in
                                     json.loads((out / "anomaly_metrics.json").read_text())["per_case"]]}
        print(f"\n== {name}")
        print(f"   model:    AUROC {v.get('auroc', float('nan')):.4f}  AUPRC {v.get('auprc', float('nan')):.4f}  "
              f"Dice@calibrated {v.get('dice', float('nan')):.4f}  best Dice (optimistic) "
              f"{v.get('best_dice', float('nan')):.4f}")
        if base:
            print(f"   baseline |x-1|: AUROC {base['auroc']:.4f}  AUPRC {base['auprc']:.4f}  best Dice {base['best_dice']:.4f}")
            print(f"   baseline raw intensity: AUROC {rawm['auroc']:.4f}  AUPRC {rawm['auprc']:.4f}  "
                  f"best Dice {rawm['best_dice']:.4f}")
        for r in report[name]["per_case"]:
            print(f"   {r}")
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "eval_anomaly.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwritten {args.output / 'eval_anomaly.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
