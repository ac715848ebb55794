#!/usr/bin/env python
"""Why a lesion family scores low in a brain: per validation case, each painted lesion's contrast
to the tissue around it, the median map value inside the lesions, and the healthy tissue whose map
is above it (volume, depth, intensity). Validation cases only (``volseg.anomaly.benchmark.
validation_cases``): a diagnostic for choosing what to try, never a reported result.

    python scripts/anomaly_diagnose.py --model volseg/models/ae --groups grey subtle --brains patient04_study1
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="anomaly model folder (default: the shipped one)")
    ap.add_argument("--groups", nargs="*", default=["grey", "subtle"])
    ap.add_argument("--brains", nargs="*", default=None, help="validation brains (default: all)")
    ap.add_argument("--per-family", type=int, default=3)
    args = ap.parse_args()

    from volseg.anomaly.benchmark import validation_cases
    from volseg.anomaly.infer import anomaly_volume, load_anomaly_model
    from volseg.anomaly.prep import wm_peak

    shared = Path(os.environ.get("VOLSEG_SHARED_DATA", "../shared/data"))
    model = load_anomaly_model(args.model)
    for c in validation_cases(shared, per_family=args.per_family):
        if c.group not in args.groups or (args.brains and c.brain not in args.brains):
            continue
        data, mask, lesion, meta = c.load()
        brain = mask > 0
        les = (lesion > 0) & brain
        ml = float(np.prod(meta.zooms[:3])) / 1000.0
        lab, k = ndi.label(les)
        contrasts = []
        for i in range(1, k + 1):  # mean of the lesion part over the bright (75th pct) tissue around it
            part = lab == i
            shell = ndi.binary_dilation(part, iterations=4) & ~ndi.binary_dilation(part, iterations=1) & brain
            if shell.any():
                contrasts.append(data[part].mean() / np.percentile(data[shell], 75))
        amap = anomaly_volume(data, mask, meta, model, voxel_threshold=np.inf).map
        healthy = brain & ~ndi.binary_dilation(les, iterations=3)
        level = float(np.median(amap[les]))
        above = healthy & (amap > level)
        depth = ndi.distance_transform_edt(brain, sampling=np.asarray(meta.zooms[:3], float))
        rel = data / wm_peak(data[brain])
        q = (lambda v: np.percentile(v, [25, 50, 75]).round(2).tolist() if v.size else "-")
        print(f"{c.id}: lesion contrast to surroundings {[round(float(v), 2) for v in contrasts]}; median map in lesions "
              f"{level:.3f} ({les.sum() * ml:.1f} mL); healthy above it {above.sum() * ml:.1f} mL, depth mm q25/50/75 "
              f"{q(depth[above])}, intensity x WM {q(rel[above])}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
