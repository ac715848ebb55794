#!/usr/bin/env python
"""Benchmark ``volseg run`` on a synthetic cohort of 1 mm heads.

Writes N synthetic heads (``volseg.synth``, 1 mm voxels, random orientation and field of view;
not timed), runs the installed ``volseg run`` on them as a subprocess, samples its memory, and
prints the mean time per stage (from ``volseg_summary.tsv``), the throughput in scans per hour
(wall clock, start-up included) and the peak and per-scan resident memory, so that a memory
that grows with the number of scans shows.

    .venv/bin/python scripts/bench_cohort.py -n 10
    .venv/bin/python scripts/bench_cohort.py -n 50 --stages n4,strip --keep /tmp/bench
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process and its children, in MB (Linux)."""
    cur = peak = 0.0
    pids = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(k) for k in kids]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    cur += int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    peak += int(line.split()[1]) / 1024
        except OSError:
            pass
    return cur, peak


def make_cohort(folder: Path, n: int, seed: int) -> None:
    from volseg.synth import synth_head
    from volseg.synth.cohort import write_subject

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = f"sub-bench{i + 1:03d}"
        if (folder / f"{name}_T1w.nii.gz").exists():
            continue
        paths = write_subject(synth_head(seed + i, voxel_size=1.0), folder, name)
        Path(paths["brain_mask"]).unlink()  # a plain folder of scans


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=10, help="number of synthetic 1 mm heads (default 10)")
    ap.add_argument("--seed", type=int, default=9000)
    ap.add_argument("--stages", default=None, help="passed to volseg run (default: its own)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=None, help="passed to volseg run (default: its own)")
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: temporary)")
    args = ap.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="volseg-bench-"))
    scans, out = work / "scans", work / "out"
    print(f"writing {args.n} synthetic 1 mm heads to {scans} (not timed)", flush=True)
    make_cohort(scans, args.n, args.seed)
    if out.exists():
        shutil.rmtree(out)
    exe = Path(sys.executable).with_name("volseg")
    cmd = [str(exe) if exe.exists() else "volseg", "run", str(scans), "-o", str(out),
           "--jobs", str(args.jobs), "--threads", str(args.threads)]
    if args.stages:
        cmd += ["--stages", args.stages]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    records = out / ".volseg" / "scans"
    peak, by_scan = 0.0, {}
    while proc.poll() is None:
        cur, hwm = rss_mb(proc.pid)
        peak = max(peak, hwm, cur)
        done = len(list(records.glob("[!.]*.json"))) if records.is_dir() else 0
        by_scan[done] = max(by_scan.get(done, 0.0), cur)
        time.sleep(0.25)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    if proc.returncode != 0:
        print(err[-3000:], file=sys.stderr)
        print(f"volseg run exited with {proc.returncode}", file=sys.stderr)
        return 1

    with open(out / "volseg_summary.tsv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t") if r["status"] == "ok"]
    print(f"\n{len(rows)} of {args.n} scans done in {wall:.1f} s wall "
          f"({os.cpu_count()} CPUs, jobs {args.jobs}, threads {args.threads or 'default'}, "
          f"batch size {args.batch_size or 'default'})")
    print(f"{'stage':<10}{'mean s':>9}{'min s':>9}{'max s':>9}")
    for stage in ("load", "n4", "strip", "anomaly", "export", "total"):
        vals = [float(r[f"time_{stage}_s"]) for r in rows if r.get(f"time_{stage}_s", "n/a") != "n/a"]
        if vals:
            print(f"{stage:<10}{statistics.mean(vals):>9.2f}{min(vals):>9.2f}{max(vals):>9.2f}")
    per_scan = sum(float(r["time_total_s"]) for r in rows) / max(len(rows), 1)
    print(f"throughput: {len(rows) / wall * 3600:.0f} scans/h wall clock, start-up included "
          f"({3600 * args.jobs / per_scan:.0f} scans/h from the mean per-scan time {per_scan:.1f} s "
          f"with {args.jobs} worker(s))")
    marks = sorted(k for k in by_scan if k > 0)
    if marks:
        first, last = marks[0], marks[-1]
        print(f"peak RSS {peak:.0f} MB; RSS after {first} scan(s) {by_scan[first]:.0f} MB, "
              f"after {last} scans {by_scan[last]:.0f} MB")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
