#!/usr/bin/env python3
"""Speed and memory of skull stripping with the shipped model, per scan, on this machine.

For every whole-head scan under ``$VOLSEG_SHARED_DATA/wholehead`` (default ``../shared/data``;
"mask" files left out) or the files given, a fresh Python process loads the shipped model and
runs :func:`volseg.strip.infer.strip_volume` twice (the first run warms up), printing:

- net_s:  the network forward pass on the 96x128x160 grid (target <= 1 s);
- n4_s:   N4 on the native grid (target <= 2 s for a 1 mm head);
- total_s: load + N4 + grid + network + inverse + clean-up (target <= 15 s for a 1 mm head);
- at the end, the median total and the throughput it gives (scans/h, one process, model loaded once);
- peak RSS of the process (target <= 3 GB), and Dice against a ``*_brainmask`` beside the scan.

    .venv/bin/python scripts/bench_strip.py [--threads N] [--tta] [FILES...]

This measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure_one(path: str, threads: int, tta: bool) -> dict:
    import resource
    import time

    sys.path.insert(0, str(REPO))
    import torch

    if threads:
        torch.set_num_threads(threads)
    from volseg.io import load_image
    from volseg.strip.config import StripConfig
    from volseg.strip.data import find_pairs
    from volseg.strip.infer import strip_volume
    from volseg.nets.folder import load_model

    net, _ = load_model(kind="strip")
    cfg = StripConfig()
    x = torch.zeros(1, 1, *cfg.preprocess.grid.size)
    with torch.inference_mode():
        net(x)
        t = time.perf_counter()
        net(x)
        net_s = time.perf_counter() - t
    t0 = time.perf_counter()
    data, meta = load_image(path)
    mask, _, timings = strip_volume(data, meta, net, cfg, tta=tta)
    total = time.perf_counter() - t0
    pairs = find_pairs(path)
    dice = None
    if pairs:
        ref, _ = load_image(pairs[0][1])
        a, b = mask > 0, ref > 0
        dice = round(float(2 * (a & b).sum() / (a.sum() + b.sum())), 4)
    return {"scan": path, "shape": "x".join(map(str, meta.shape)),
            "voxel": "x".join(f"{z:.2f}" for z in meta.zooms), "net_s": round(net_s, 2),
            "n4_s": timings["n4_s"], "total_s": round(total, 2),
            "rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), "dice": dice}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure_one(args.child, args.threads, args.tta)))
        return 0
    root = Path(os.environ.get("VOLSEG_SHARED_DATA", REPO.parent / "shared" / "data")) / "wholehead"
    files = args.files or sorted(str(p) for p in root.rglob("*.nii.gz") if "mask" not in p.name)
    print(f"{'scan':55s} {'shape':13s} {'voxel mm':16s} {'net_s':>6s} {'n4_s':>6s} {'total_s':>8s} "
          f"{'RSS MB':>7s} {'Dice':>7s}")
    totals = []
    for f in files:
        cmd = [sys.executable, __file__, "--child", f, "--threads", str(args.threads)] + (["--tta"] if args.tta else [])
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{f}: failed: {res.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        name = str(Path(r["scan"]).relative_to(root)) if r["scan"].startswith(str(root)) else r["scan"]
        flags = [k for k, bad in (("net>1s", r["net_s"] > 1), ("total>15s", r["total_s"] > 15),
                                  ("RSS>3GB", r["rss_mb"] > 3072)) if bad]
        print(f"{name[-55:]:55s} {r['shape']:13s} {r['voxel']:16s} {r['net_s']:6.2f} {r['n4_s']:6.2f} "
              f"{r['total_s']:8.2f} {r['rss_mb']:7d} {str(r['dice']):>7s} {' '.join(flags)}")
        totals.append(r["total_s"])
    if totals:
        import statistics

        med = statistics.median(totals)
        print(f"median total {med:.2f} s per scan (model loaded once): {3600 / med:.0f} scans/h in one "
              f"process; whole-process times beside deepbet/HD-BET: scripts/bench_side_by_side.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
