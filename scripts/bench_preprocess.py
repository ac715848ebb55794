#!/usr/bin/env python3
"""Time and memory of preprocessing each real head scan: load, N4, working grid, inverse.

For every ``*.nii.gz`` under ``$VOLSEG_SHARED_DATA/wholehead`` (default ``../shared/data``
beside the repository; files with "mask" in the name are left out), a fresh Python process
runs, with the default settings of :class:`volseg.config.Config`:

- load:    :func:`volseg.io.load_image`;
- n4:      N4 bias correction on the native grid (``prepare(...).timings["n4_s"]``);
- grid:    resampling to the 96x128x160 2 mm working grid + intensity normalisation
           (``timings["grid_s"]``);
- inverse: a working-grid map back to the native grid (:func:`volseg.strip.infer.to_native`).

Peak RSS is the child process's ``ru_maxrss`` (so it includes the Python, torch and MONAI
imports, reported separately as "import MB"). Rows are flagged when N4 takes more than 8 s or the
grid step more than 1 s, the targets for a 1 mm 181x217x181 head.

    .venv/bin/python scripts/bench_preprocess.py                 # every whole-head scan
    .venv/bin/python scripts/bench_preprocess.py a.nii.gz b.mgz  # given files
    .venv/bin/python scripts/bench_preprocess.py --threads 2     # cap torch/ITK threads

This measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
N4_TARGET_S = 8.0
GRID_TARGET_S = 1.0


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def measure_one(path: str, threads: int) -> dict:
    """Runs in the child process: one scan through load, prepare and the inverse."""
    sys.path.insert(0, str(REPO))  # use this checkout even when volseg is not installed
    import numpy as np
    import torch

    if threads:
        import SimpleITK as sitk

        torch.set_num_threads(threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)

    from volseg.config import Config
    from volseg.io import load_image
    from volseg.preprocess import prepare
    from volseg.strip.infer import to_native

    import monai  # noqa: F401  (imported here so that "import MB" covers it)

    rss_import = _rss_mb()
    cfg = Config()
    t0 = time.perf_counter()
    data, meta = load_image(path, nonfinite=cfg.io.nonfinite)
    load_s = time.perf_counter() - t0
    prep = prepare(data, meta, cfg)
    t1 = time.perf_counter()
    native = to_native(prep.grid_image.clone(), prep)
    inverse_s = time.perf_counter() - t1
    assert native.shape == tuple(meta.shape), (native.shape, meta.shape)
    return {
        "scan": path,
        "shape": list(meta.shape),
        "zooms": [float(z) for z in meta.zooms],
        "load_s": load_s,
        "n4_s": float(prep.timings["n4_s"]),
        "grid_s": float(prep.timings["grid_s"]),
        "inverse_s": inverse_s,
        "import_mb": rss_import,
        "peak_mb": _rss_mb(),
        "finite": bool(np.isfinite(native).all()),
    }


def find_scans(root: Path) -> list[Path]:
    folder = root / "wholehead"
    return sorted(p for p in folder.rglob("*.nii.gz") if "mask" not in p.name.lower())


def run_child(path: Path, threads: int, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(path), "--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"scan": str(path), "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"scan": str(path), "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def fmt_row(r: dict, root: Path) -> list[str]:
    try:
        name = str(Path(r["scan"]).resolve().relative_to(root.resolve()))
    except ValueError:
        name = r["scan"]
    if "error" in r:
        return [name, "-", "-", "-", "-", "-", "-", "-", "-", "ERROR " + r["error"]]
    flags = []
    if r["n4_s"] > N4_TARGET_S:
        flags.append(f"N4>{N4_TARGET_S:g}s")
    if r["grid_s"] > GRID_TARGET_S:
        flags.append(f"grid>{GRID_TARGET_S:g}s")
    return [
        name,
        "x".join(str(n) for n in r["shape"]),
        "x".join(f"{z:.2f}" for z in r["zooms"]),
        f"{r['load_s']:.2f}",
        f"{r['n4_s']:.2f}",
        f"{r['grid_s']:.2f}",
        f"{r['inverse_s']:.2f}",
        f"{r['import_mb']:.0f}",
        f"{r['peak_mb']:.0f}",
        " ".join(flags) or "ok",
    ]


def print_table(rows: list[list[str]]) -> None:
    head = ["scan", "shape", "voxel mm", "load_s", "n4_s", "grid_s", "inverse_s", "import MB",
            "peak RSS MB", "flag"]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scans", nargs="*", type=Path, help="scans to measure (default: every "
                    "non-mask *.nii.gz under $VOLSEG_SHARED_DATA/wholehead)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch and ITK threads in the child (default 0: their own defaults)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per scan (default 600)")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(measure_one(args.child, args.threads)))
        return 0

    root = Path(os.environ.get("VOLSEG_SHARED_DATA") or REPO.parent / "shared" / "data")
    scans = args.scans or find_scans(root)
    if not scans:
        print(f"bench_preprocess: no scans given and none found under {root / 'wholehead'} "
              "(set VOLSEG_SHARED_DATA)", file=sys.stderr)
        return 1
    print(f"bench_preprocess: {len(scans)} scans, threads={args.threads or 'default'}, "
          f"{os.cpu_count()} CPUs; one fresh process per scan", file=sys.stderr)
    results, rows = [], []
    for path in scans:
        print(f"  {path} ...", file=sys.stderr, flush=True)
        r = run_child(path, args.threads, args.timeout)
        results.append(r)
        rows.append(fmt_row(r, root))
    print_table(rows)
    print(f"\nflag: N4 > {N4_TARGET_S:g} s or grid > {GRID_TARGET_S:g} s (targets for a 1 mm "
          "181x217x181 head); peak RSS includes the imports (import MB).")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
