#!/usr/bin/env python
"""The anomaly benchmark on the shared data (run it in the background; ~10 min on 2 cores).

Held-out healthy brains (used neither to train nor to calibrate the shipped model):
  - healthy/norm.mgz (FreeSurfer-normalised real brain);
  - wholehead/nomask/chris_t1 (a real 0.88 mm head, skull-stripped here with volseg's shipped
    strip model, TTA on, into <output>/stripped).
Into each: every lesion family of volseg.anomaly.families (dark, grey, subtle, bright), --per-family
cases each, plus the brain as it is. Real lesions: BRATS 2013 T1c (4 gliomas) and open_ms
patient19 T1 (MS). Beside the model: raw intensity, |x - WM| and |x - MNI152| after affine
registration, all on the same voxels. Writes suite_cases.tsv, suite_groups.tsv, suite.json and
suite.md into --output.

    python scripts/anomaly_suite.py [--model DIR] [-o runs/suite] [--per-family 2]
        [--set median_size=3 --set erode_mm=2]   # map settings to try, without retraining
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def strip_heads(heads: list[Path], out_dir: Path) -> list[Path]:
    """Skull-strip healthy heads with the shipped strip model (once; reused if present)."""
    from volseg.strip.config import load_strip_config
    from volseg.strip.infer import strip_file
    from volseg.nets.folder import load_model

    out_dir.mkdir(parents=True, exist_ok=True)
    done, todo = [], []
    for h in heads:
        brain = out_dir / f"{h.name.split('.')[0]}_desc-brain_T1w.nii.gz"
        (done if brain.exists() else todo).append((h, brain))
    if todo:
        net, _ = load_model(None, kind="strip")
        cfg = load_strip_config(None)
        for h, _ in todo:
            strip_file(str(h), out_dir, net, cfg, tta=True)
    return [b for _, b in done + todo]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="anomaly model folder (default: shipped)")
    ap.add_argument("-o", "--output", type=Path, default=REPO / "runs" / "suite")
    ap.add_argument("--per-family", type=int, default=2)
    ap.add_argument("--no-real", action="store_true", help="skip BRATS and MS")
    ap.add_argument("--no-template", action="store_true", help="skip the template baseline (registration)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a maps setting (e.g. median_size=3)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    shared = Path(os.environ.get("VOLSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not shared.is_dir():
        print(f"shared data not found at {shared}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    from volseg.anomaly.benchmark import real_cases, run_suite, synthetic_cases
    from volseg.anomaly.infer import load_anomaly_model

    model = load_anomaly_model(args.model, require_calibration=True)
    if args.set:
        maps = model.cfg.maps
        for kv in args.set:
            k, v = kv.split("=", 1)
            cur = getattr(maps, k)
            maps = dataclasses.replace(maps, **{k: type(cur)(v) if not isinstance(cur, bool) else v == "true"})
        model.cfg = dataclasses.replace(model.cfg, maps=maps)
    brains = {"norm": shared / "healthy" / "norm.mgz"}
    for b in strip_heads([shared / "wholehead" / "nomask" / "chris_t1.nii.gz"], args.output / "stripped"):
        brains[b.name.split("_desc")[0]] = b
    cases = []
    for bid, path in brains.items():
        cases += synthetic_cases(bid, str(path), per_family=args.per_family)
    if not args.no_real:
        cases += real_cases(shared)
    summary = run_suite(model, cases, args.output, template=not args.no_template)
    print((args.output / "suite.md").read_text())
    print(f"written {args.output}/suite.json, suite_groups.tsv, suite_cases.tsv, suite.md")
    return 0 if summary["groups"] else 1


if __name__ == "__main__":
    sys.exit(main())
