#!/usr/bin/env python
"""Rank map settings of one trained anomaly model on the benchmark's cases, in one pass.

Each case is prepared once and reconstructed once per reconstruction setting (network passes,
masked passes); every variant (median filter size, erosion, passes, masked passes, normative
residual) is then mapped from its reconstruction and scored by pooled AUPRC and best Dice
(optimistic) per group, with the network's seconds per case. Thresholds are not involved: this
ranks settings before calibration.

--on validation (the default, for *choosing* settings): lesion families in the validation brains
(volseg.anomaly.benchmark.validation_cases: healthy/T1_brain_c1 with other seeds than training's
validation cases, and the brains of open_ms patients 01, 03 and 04 with the dataset's own masks);
normative statistics from --synth synthetic brains only (seeds 9000...), so no validation brain is
in them. Also printed: AUPRC per validation brain, to see whether a gain holds in every brain.
--on test (for *reporting*, never for choosing): the benchmark's held-out brains and real lesions;
normative statistics from T1_brain_c1 + the synthetic brains (the calibration set).

    python scripts/anomaly_variants.py --model runs/ae/best [--on validation] [-o runs/variants]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

VARIANTS = {
    "default": {},
    "median3": {"median_size": 3},
    "median3_erode2": {"median_size": 3, "erode_mm": 2.0},
    "passes2": {"passes": 2},
    "normative": {"normative": True},
    "normative_median3": {"normative": True, "median_size": 3},
    "signed": {"residual": "signed"},
    "signed_median3": {"residual": "signed", "median_size": 3},
    "signed_median7": {"residual": "signed", "median_size": 7},
    "signed_normative": {"residual": "signed", "normative": True},
    # multi-scale maps: the larger of the widths' maps, each scaled by the ratio of healthy
    # thresholds (gains from the --synth synthetic brains, as volseg calibrate sets them)
    "signed_ms5_9": {"residual": "signed", "median_sizes": (5, 9)},
    "signed_ms5_7_9": {"residual": "signed", "median_sizes": (5, 7, 9)},
    "signed_ms3_5_9": {"residual": "signed", "median_sizes": (3, 5, 9)},
    "abs5_signed9": {"median_sizes": (5, 9), "scale_residuals": ("abs", "signed")},
    # wide regional levels: the signed residual's median over blocks of 2^3 voxels (maps.scale_steps),
    # 5/7/9 blocks = 20/28/36 mm, added to (or replacing the 9^3 of) the shipped map
    "abs5_signed9_c5": {"median_sizes": (5, 9, 5), "scale_residuals": ("abs", "signed", "signed"),
                        "scale_steps": (1, 1, 2)},
    "abs5_signed9_c7": {"median_sizes": (5, 9, 7), "scale_residuals": ("abs", "signed", "signed"),
                        "scale_steps": (1, 1, 2)},
    "abs5_signed9_c9": {"median_sizes": (5, 9, 9), "scale_residuals": ("abs", "signed", "signed"),
                        "scale_steps": (1, 1, 2)},
    "abs5_signed9_c5_c9": {"median_sizes": (5, 9, 5, 9), "scale_residuals": ("abs", "signed", "signed", "signed"),
                           "scale_steps": (1, 1, 2, 2)},
    "abs5_c5_c7": {"median_sizes": (5, 5, 7), "scale_residuals": ("abs", "signed", "signed"), "scale_steps": (1, 2, 2)},
    "abs5_c5": {"median_sizes": (5, 5), "scale_residuals": ("abs", "signed"), "scale_steps": (1, 2)},
    # a dark-only small width for small dark lesions (MS, the 4 mm test lesion)
    "abs5_signed9_dark3": {"median_sizes": (5, 9, 3), "scale_residuals": ("abs", "signed", "negative")},
    "abs5_signed9_dark5": {"median_sizes": (5, 9, 5), "scale_residuals": ("abs", "signed", "negative")},
    "abs5_signed9_dark3_5": {"median_sizes": (5, 9, 3, 5),
                             "scale_residuals": ("abs", "signed", "negative", "negative")},
    # the input's brightness above white matter (maps residual "excess", no reconstruction) added
    "abs5_signed9_excess5": {"median_sizes": (5, 9, 5), "scale_residuals": ("abs", "signed", "excess")},
    "abs5_signed9_excess9": {"median_sizes": (5, 9, 9), "scale_residuals": ("abs", "signed", "excess")},
}
# a variant names map settings over the single-width defaults (median 5^3 of |x - x̂|); "default"
# is the model's own map (the shipped model's is multi-scale)
SINGLE = {"median_sizes": (), "scale_residuals": (), "scale_steps": ()}
# masked passes (volseg.anomaly.recon): cube size in 2 mm voxels, 2-phase checkerboard or 8-phase
# 2x2x2 interleave, fill of the hidden cubes, optional IterMask-style second round
for _b in (2, 3, 4, 6, 8):
    for _ph in (2, 8):
        if (_b, _ph) != (3, 8):
            VARIANTS[f"masked{_b}_p{_ph}"] = {"masked_block": _b, "masked_phases": _ph}
for _fill in ("median", "blur"):
    for _ph in (2, 8):
        VARIANTS[f"masked6_p{_ph}_{_fill}"] = {"masked_block": 6, "masked_phases": _ph, "masked_fill": _fill}
VARIANTS["masked6_p2_iter0.4"] = {"masked_block": 6, "masked_phases": 2, "masked_iter": 0.4}
for _ph in (2, 8):
    VARIANTS[f"masked6_p{_ph}_iter0.2"] = {"masked_block": 6, "masked_phases": _ph, "masked_iter": 0.2}
    VARIANTS[f"masked6_p{_ph}_median3"] = {"masked_block": 6, "masked_phases": _ph, "median_size": 3}
for _b in (4, 6):
    for _ph in (2, 8):
        VARIANTS[f"masked{_b}_p{_ph}_bright"] = {"masked_block": _b, "masked_phases": _ph, "masked_mode": "bright"}
VARIANTS["abs5_signed9_tta"] = {"median_sizes": (5, 9), "scale_residuals": ("abs", "signed"), "tta": True}
RECON_KEYS = ("passes", "tta", "masked_block", "masked_phases", "masked_fill", "masked_iter", "masked_mode")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("-o", "--output", type=Path, default=REPO / "runs" / "variants")
    ap.add_argument("--per-family", type=int, default=None, help="cases per family and brain (default: "
                    "3 on validation, 2 on test)")
    ap.add_argument("--synth", type=int, default=8, help="synthetic calibration brains for the normative statistics")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--on", choices=["validation", "test"], default="validation")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    shared = Path(os.environ.get("VOLSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
    import torch

    torch.set_num_threads(2)
    from anomaly_suite import strip_heads

    from volseg.anomaly.benchmark import real_cases, synthetic_cases, validation_cases
    from volseg.anomaly.data import synth_brain
    from volseg.anomaly.evaluate import Case, calibrate
    from volseg.anomaly.infer import anomaly_finish, anomaly_prepare, load_anomaly_model, scale_keys
    from volseg.anomaly.metrics import voxel_metrics
    from volseg.anomaly.recon import recon_options, reconstruct
    from volseg.synth.cohort import cohort_seed

    model = load_anomaly_model(args.model)
    base = model.cfg

    def variant_cfg(name):
        v = VARIANTS[name]
        return base if not v else dataclasses.replace(base, maps=dataclasses.replace(base.maps, **{**SINGLE, **v}))

    norms = {}  # residual kind -> normative statistics (healthy mean and spread of that residual)
    kinds = sorted({VARIANTS[v].get("residual", base.maps.residual) for v in args.variants
                    if VARIANTS[v].get("normative")})
    multiscale = [n for n in args.variants if n != "default" and len(VARIANTS[n].get("median_sizes", ())) > 1]
    synth_cal = []  # the synthetic calibration brains (never a validation or test brain)
    if kinds or multiscale:
        for i in range(args.synth):
            s = cohort_seed(9000, i)
            d, m, meta = synth_brain(s)
            synth_cal.append(Case(f"synth{s}", arrays=(d, m, None, meta)))
    if kinds:
        cal = list(synth_cal)
        if args.on == "test":  # the calibration set: the real validation brain + synthetic brains
            cal.insert(0, Case("T1_brain_c1", image=str(shared / "healthy" / "T1_brain_c1.nii.gz")))
        for kind in kinds:
            model.cfg = dataclasses.replace(base, maps=dataclasses.replace(base.maps, normative=True, residual=kind))
            norms[kind] = calibrate(model, cal)["normative"]
        model.cfg = base
    gains = {}  # multi-scale variant -> gains per width, from the synthetic brains only
    for name in multiscale:
        model.cfg = variant_cfg(name)
        g = calibrate(model, synth_cal)["scale_gains"]
        gains[name] = [g[k] for k in scale_keys(model.cfg.maps)]
        model.cfg = base
    small = small_lesion_check(model, args.variants, variant_cfg, gains) if args.on == "validation" else {}
    if args.on == "validation":
        cases = validation_cases(shared, per_family=args.per_family or 3)
    else:
        brains, real = {"norm": shared / "healthy" / "norm.mgz"}, real_cases(shared)
        for b in strip_heads([shared / "wholehead" / "nomask" / "chris_t1.nii.gz"],
                             REPO / "runs" / "suite" / "stripped"):
            brains[b.name.split("_desc")[0]] = b
        cases = [c for bid, p in brains.items() for c in synthetic_cases(bid, str(p), per_family=args.per_family or 2)
                 if c.group != "healthy"] + real
    pooled: dict = {}
    per_brain: dict = {}
    key_s: dict = {}  # reconstruction settings -> network seconds per case
    variant_key: dict = {}
    for case in cases:
        data, mask, lesion, meta = case.load()
        prep = anomaly_prepare(data, mask, meta, model)
        g = prep.grid_image[0].numpy()
        recons = {}
        for name in args.variants:
            v = VARIANTS[name]
            cfg = variant_cfg(name)
            key = tuple(getattr(cfg.maps, k) for k in RECON_KEYS)
            if key not in recons:
                t0 = time.perf_counter()
                recons[key] = reconstruct(model.net, g, prep.grid_mask, model.device, **recon_options(cfg.maps))
                key_s.setdefault(key, []).append(time.perf_counter() - t0)
            variant_key[name] = key
            res = anomaly_finish(prep, recons[key], model, cfg, voxel_threshold=np.inf,
                                 normative=norms[cfg.maps.residual] if v.get("normative") else None,
                                 scale_gains=gains.get(name))
            p = pooled.setdefault(case.group, {}).setdefault(name, ([], []))
            p[0].append(res.map[mask].astype(np.float32)); p[1].append(lesion[mask])
            p = per_brain.setdefault(f"{case.brain} {case.group}", {}).setdefault(name, ([], []))
            p[0].append(res.map[mask].astype(np.float32)); p[1].append(lesion[mask])
        logging.info("%s done", case.id)
    table = {}
    for group, vs in pooled.items():
        table[group] = {}
        for name, (s, t) in vs.items():
            m = voxel_metrics(np.concatenate(s), np.concatenate(t))
            table[group][name] = {"auprc": round(m["auprc"], 4), "best_dice": round(m["best_dice"], 4)}
    brains_table = {k: {n: round(voxel_metrics(np.concatenate(s), np.concatenate(t))["auprc"], 4)
                        for n, (s, t) in vs.items()} for k, vs in per_brain.items()}
    means = {n: round(float(np.mean([table[g][n]["auprc"] for g in table])), 4) for n in args.variants}
    first = args.variants[0]  # cells (brain x group) where a variant's AUPRC is below the first variant's
    lower = {n: sum(v[n] < v[first] for v in brains_table.values()) for n in args.variants}
    secs = {n: round(float(np.median(key_s[variant_key[n]])), 3) for n in args.variants}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "variants.json").write_text(json.dumps(
        {"on": args.on, "groups": table, "per_brain_auprc": brains_table, "mean_auprc": means,
         "cells_lower_than_first": lower, "small_lesions": small, "scale_gains": gains,
         "network_s_per_case": secs}, indent=2) + "\n")
    groups = list(table)
    lines = ["| variant | " + " | ".join(groups) + f" | mean AUPRC | cells below {first} | 4 mm dark / bright lesion: "
             "mean map / healthy p95 | network s / case |", "|---" * (len(groups) + 5) + "|"]
    for n in args.variants:
        sm = " ; ".join(f"{a:.3f} / {b:.3f}" for a, b in small.get(n, ()))
        lines.append(f"| {n} | " + " | ".join(f"{table[g][n]['auprc']:.4f} / {table[g][n]['best_dice']:.3f}"
                                             for g in groups)
                     + f" | {means[n]:.4f} | {lower[n]}/{len(brains_table)} | {sm} | {secs[n]:.2f} |")
    text = (f"On {args.on} cases. AUPRC / best Dice (optimistic), pooled per group; network seconds per case "
            f"(median; reconstructions shared by variants are counted once per variant); gains of multi-scale "
            f"variants from {args.synth} synthetic calibration brains: {json.dumps(gains)}\n\n" + "\n".join(lines)
            + f"\n\nhighest mean AUPRC: {max(means, key=means.get)}\n\nAUPRC per brain and group:\n\n"
            + "| brain, group | " + " | ".join(args.variants) + " |\n" + "|---" * (len(args.variants) + 1) + "|\n"
            + "".join(f"| {k} | " + " | ".join(f"{v[n]:.3f}" for n in args.variants) + " |\n"
                      for k, v in sorted(brains_table.items())))
    (args.output / "variants.md").write_text(text)
    print(text)
    return 0


def small_lesion_check(model, names, variant_cfg, gains) -> dict:
    """Per variant, for a 4 mm lesion at 0.4x and at 1.5x white matter in the deep white matter of
    a synthetic brain no model trained on (seed 778, as ``tests/test_anomaly_suite.py``): the mean
    map inside the lesion and the healthy voxels' 95th percentile (the expected-failure test asks
    the first above the second for the dark one)."""
    from volseg.anomaly.data import synth_brain
    from volseg.anomaly.families import lesion_box, tissue_sites
    from volseg.anomaly.infer import anomaly_finish, anomaly_prepare
    from volseg.anomaly.prep import wm_peak
    from volseg.anomaly.recon import recon_options, reconstruct

    data, mask, meta = synth_brain(778)
    cand = np.argwhere(tissue_sites(data, mask, meta.zooms)["deep_wm"])
    box, alpha = lesion_box(mask, cand[len(cand) // 2], 4.0, meta.zooms, "ellipsoid", np.random.default_rng(0))
    truth = np.zeros(mask.shape, bool)
    truth[box] = alpha >= 0.5
    truth &= mask
    out = {n: [] for n in names}
    for level in (0.4, 1.5):
        img = data.astype(np.float32).copy()
        img[box] = img[box] * (1 - alpha) + level * wm_peak(data[mask]) * alpha
        prep = anomaly_prepare(img, mask, meta, model)
        recons = {}
        for n in names:
            cfg = variant_cfg(n)
            if cfg.maps.normative or cfg.maps.masked_block:
                continue
            key = tuple(getattr(cfg.maps, k) for k in RECON_KEYS)
            if key not in recons:
                recons[key] = reconstruct(model.net, prep.grid_image[0].numpy(), prep.grid_mask, model.device,
                                          **recon_options(cfg.maps))
            amap = anomaly_finish(prep, recons[key], model, cfg, voxel_threshold=np.inf, scale_gains=gains.get(n)).map
            out[n].append((float(amap[truth].mean()), float(np.percentile(amap[mask & ~truth], 95))))
    return {n: v for n, v in out.items() if v}


if __name__ == "__main__":
    sys.exit(main())
