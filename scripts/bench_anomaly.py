#!/usr/bin/env python
"""Time the anomaly stage (given the brain mask) and report peak memory.

Prints per stage: N4 inside the mask (reported apart: in `volseg run` it is the N4 stage's
work), grid + white-matter scaling, network reconstruction, residual map (erosion + 3D median),
inversion to the native grid and thresholding; "anomaly stage" = everything but N4.

    python scripts/bench_anomaly.py [--model DIR] [--repeat 3] [IMAGE ...]
Default images: healthy/norm.mgz (256^3, 1 mm) and Colin27's ch2bet (181x217x181, 1 mm).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="*")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    shared = Path(os.environ.get("VOLSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
    images = args.images or [str(shared / "healthy" / "norm.mgz"),
                             str(shared / "wholehead" / "colin27" / "ch2bet.nii.gz")]
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from volseg.anomaly.infer import anomaly_volume, load_anomaly_model, load_brain_input

    model = load_anomaly_model(args.model, require_calibration=True)
    print(f"torch threads {torch.get_num_threads()}, model {model.info.get('sha256', '')[:12]}")
    for path in images:
        data, mask, meta = load_brain_input(path)
        rows = []
        for i in range(args.repeat):
            t0 = time.perf_counter()
            res = anomaly_volume(data, mask, meta, model)
            rows.append(dict(res.timings, wall_s=time.perf_counter() - t0))
        med = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
        print(f"{Path(path).name} {meta.shape} zooms {tuple(round(z, 2) for z in meta.zooms)}: "
              + ", ".join(f"{k} {v:.2f}" for k, v in med.items()))
        print(f"   anomaly stage (given the mask, without N4): {med['anomaly_s']:.2f} s  (median of {args.repeat})")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
