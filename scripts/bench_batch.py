#!/usr/bin/env python
"""Network time per scan when ``volseg run`` batches scans (``--batch-size``).

Runs the shipped strip U-Net on the 96x128x160 working grid and the shipped autoencoder on a
brain-sized crop, for batch sizes 1, 2, 4 (and 8), and prints seconds per scan and the peak
resident memory. On a GPU batching fills the device; on a few CPU cores the gain is small.

    .venv/bin/python scripts/bench_batch.py [--device cpu|cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    import torch

    from volseg.anomaly.infer import load_anomaly_model
    from volseg.anomaly.recon import reconstruct_batch
    from volseg.device import pick_device
    from volseg.strip.infer import predict_grid_batch
    from volseg.nets.folder import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="1,2,4,8")
    args = ap.parse_args()
    device = pick_device(args.device)
    strip, _ = load_model(None, kind="strip", device=device)
    ae = load_anomaly_model(None, device)
    rng = np.random.default_rng(0)
    shape = (96, 128, 160)
    zz = np.indices(shape)
    brain = sum(((zz[i] - c) / r) ** 2 for i, (c, r) in enumerate(zip((48, 64, 80), (34, 44, 36)))) <= 1
    print(f"device {device}, torch threads {torch.get_num_threads()}")
    print(f"{'batch':>5}{'strip s/scan':>14}{'AE s/scan':>11}")
    for b in (int(x) for x in args.sizes.split(",")):
        grids = [torch.as_tensor(rng.random((1, *shape), dtype=np.float32)) for _ in range(b)]
        imgs = [np.where(brain, rng.random(shape, dtype=np.float32), 0).astype(np.float32) for _ in range(b)]
        t_strip = timed(lambda: predict_grid_batch(strip, grids, device), args.repeats) / b
        t_ae = timed(lambda: reconstruct_batch(ae.net, imgs, [brain] * b, device), args.repeats) / b
        print(f"{b:>5}{t_strip:>14.3f}{t_ae:>11.3f}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
