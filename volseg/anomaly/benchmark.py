"""The anomaly benchmark (``volseg evaluate anomaly --suite``): held-out brains, lesion families,
real lesions, and three no-model baselines scored on the very same voxels.

Cases:

- each held-out healthy brain as it is (scan score, flag, anomalous volume in mL);
- each held-out healthy brain with synthetic lesions of every family of
  :mod:`volseg.anomaly.families` (dark, grey, subtle, bright; 3-25 mm; ellipsoids and multi-lobed
  shapes; deep white matter, periventricular, juxtacortical), ``per_family`` cases each;
- real lesions: glioma post-contrast T1 (BRATS 2013, tumour = labels > 0) and MS T1 (open_ms
  patient19, consensus mask), when the shared data are there.

Scores (pooled over the brain voxels of every case of a group, on each case's native grid):
the model's AUROC, AUPRC, Dice at the calibrated voxel threshold and the best Dice over all
thresholds (optimistic: chosen on the data it is scored on). The baselines go through the same
working grid, erosion, median filter and inversion as the model's map, so only the score
differs: **raw** intensity (white-matter units), **|x - WM|** (distance from the white-matter
level), and **template** |x - MNI152| after an affine registration of nilearn's MNI152 2009
brain onto the case (SimpleITK, mutual information).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from volseg.anomaly.families import FAMILIES, brain_bias_field, insert_family, tissue_sites
from volseg.anomaly.infer import AnomalyModel, anomaly_volume, load_brain_input
from volseg.anomaly.maps import residual_map
from volseg.anomaly.metrics import voxel_metrics

log = logging.getLogger(__name__)
BASELINES = ("raw", "wm_distance", "template")


@dataclass
class SuiteCase:
    """One benchmark case: ``group`` is a lesion family, ``glioma_T1c``, ``ms_T1`` or ``healthy``;
    ``load()`` returns (image, brain mask, lesion mask or None, meta)."""

    id: str
    group: str
    brain: str
    load: Callable


def _brain_loader(image: str, mask: str | None = None):
    cache: dict = {}

    def get():
        if "v" not in cache:
            data, bmask, meta = load_brain_input(image, mask)
            cache["v"] = (data, bmask, meta)
        return cache["v"]

    return get


def synthetic_cases(brain_id: str, image: str, mask: str | None = None, per_family: int = 2,
                    seed: int = 1000, bias_aware: bool = True) -> list[SuiteCase]:
    """The healthy brain and ``per_family`` lesion cases of each family in it (fixed seeds).
    ``bias_aware``: paint into the bias-corrected brain and put the field back
    (:func:`~volseg.anomaly.families.brain_bias_field`), so that a family's contrast is its
    lesions' contrast to the tissue around them; off: relative to the raw brain (as before
    2026-12-07)."""
    get = _brain_loader(image, mask)
    sites: dict = {}

    def healthy():
        data, bmask, meta = get()
        return data, bmask, None, meta

    def make(family, k):
        def load():
            data, bmask, meta = get()
            if "s" not in sites:
                sites["f"] = brain_bias_field(data, bmask, meta.zooms) if bias_aware else None
                flat = data / sites["f"] if bias_aware else data
                sites["s"] = tissue_sites(flat, bmask, meta.zooms)
            rng = np.random.default_rng([seed, sum(map(ord, brain_id)), list(FAMILIES).index(family), k])
            img, truth, _ = insert_family(data, bmask, meta.zooms, family, rng, sites=sites["s"], field=sites["f"])
            return img, bmask, truth, meta
        return load

    cases = [SuiteCase(f"{brain_id}_healthy", "healthy", brain_id, healthy)]
    for family in FAMILIES:
        for k in range(per_family):
            cases.append(SuiteCase(f"{brain_id}_{family}{k}", family, brain_id, make(family, k)))
    return cases


VALIDATION_OPEN_MS = ("patient01_study1", "patient03_study2", "patient04_study1")


def validation_cases(shared: Path, per_family: int = 3, seed: int = 1000, healthy: bool = False) -> list[SuiteCase]:
    """Cases for *choosing* map settings, checkpoints and recipes, never for reporting: lesion
    families in ``healthy/T1_brain_c1`` and in the brains of three open_ms clinical scans (2D T1,
    3 mm slices, the dataset's own brain masks, so no volseg model is involved). The open_ms
    patients have MS: their own lesions are unlabelled, so a little of their "healthy" tissue is
    not; they are never used to calibrate thresholds, which need healthy brains. Brains present
    under ``shared`` only; ``healthy``: keep each brain's lesion-free case too."""
    brains = []
    c1 = shared / "healthy" / "T1_brain_c1.nii.gz"
    if c1.exists():
        brains.append(("T1_brain_c1", c1, None))
    for name in VALIDATION_OPEN_MS:
        img = shared / "wholehead" / "open_ms" / f"{name}_T1W.nii.gz"
        msk = img.with_name(f"{name}_T1W_brainmask.nii.gz")
        if img.exists() and msk.exists():
            brains.append((name, img, msk))
    out = []
    for bid, img, msk in brains:
        out += [c for c in synthetic_cases(bid, str(img), str(msk) if msk else None, per_family, seed)
                if healthy or c.group != "healthy"]
    return out


def real_cases(shared: Path) -> list[SuiteCase]:
    """BRATS 2013 T1c (4 patients) and open_ms patient19 T1, where present under ``shared``."""
    from volseg.anomaly.evaluate import Case

    out = []
    for pat in sorted((shared / "lesion" / "brats2013").glob("pat*")):
        c = Case(id=f"brats-{pat.name}", image=str(pat / "T1c_subtrMeanDivStd.nii.gz"),
                 mask=str(pat / "brainmask.nii.gz"), lesion=str(pat / "OTMultiClass.nii.gz"))
        out.append(SuiteCase(c.id, "glioma_T1c", pat.name, c.load))
    ms = shared / "lesion" / "open_ms_mni" / "patient19"
    if ms.is_dir():
        c = Case(id="openms-patient19", image=str(ms / "T1_N4_noneck_reduced_winsor_regtoFLAIR_brain_N4_regtoMNI.nii.gz"),
                 lesion=str(ms / "GOLD_STANDARD_N4_noneck_reduced_winsor_regtoFLAIR_regtoMNI.nii.gz"))
        out.append(SuiteCase(c.id, "ms_T1", "patient19", c.load))
    return out


class Template:
    """nilearn's MNI152 2009 brain on its own working grid, white-matter scaled (never grey
    matched: like the brains of :func:`baseline_maps`, whatever the model's input settings)."""

    def __init__(self, cfg):
        import dataclasses

        from volseg.anomaly.normative import mni_template

        self.image, self.mask = mni_template(dataclasses.replace(cfg, maps=dataclasses.replace(cfg.maps, grey_median=0.0)))
        self.spacing = cfg.preprocess.grid.spacing_mm

    def on(self, fixed: np.ndarray, fixed_mask: np.ndarray) -> np.ndarray:
        from volseg.transforms.register import register_affine, warp

        # one thread: SimpleITK's sampled mutual information is repeatable only single-threaded
        tr = register_affine(fixed, self.image, self.spacing, fixed_mask=fixed_mask, threads=1)
        return warp(self.image, tr, fixed.shape, self.spacing)


def baseline_maps(res, cfg, template: Template | None) -> dict[str, np.ndarray]:
    """The no-model scores of one case on its native grid (same post-processing as the model),
    from the brain on the white-matter scale before any grey matching: no-model scores never
    depend on the model's input settings."""
    prep = res.prep
    g = prep.grid_unmatched if prep.grid_unmatched is not None else prep.grid_image[0].numpy()
    gm = prep.grid_mask
    erode = int(round(cfg.maps.erode_mm / cfg.preprocess.grid.spacing_mm))
    grids = {"raw": (g, np.zeros_like(g)), "wm_distance": (g, np.where(gm, 1.0, 0.0).astype(np.float32))}
    if template is not None:
        grids["template"] = (g, template.on(g, gm))
    out = {}
    for name, (x, ref) in grids.items():
        gmap = residual_map(x, ref, gm, "abs", erode, cfg.maps.median_size)
        out[name] = np.where(prep.mask, prep.to_native(gmap), 0.0).astype(np.float32)
    return out


def _metrics(scores, truth, thr=None) -> dict:
    m = voxel_metrics(np.concatenate(scores), np.concatenate(truth), thr)
    keep = ("auroc", "auprc", "dice", "best_dice", "fpr", "sensitivity")
    return {k: round(float(m[k]), 4) for k in keep if k in m}


def run_suite(model: AnomalyModel, cases: list[SuiteCase], out_dir, template: bool = True) -> dict:
    """Score every case; write ``suite_cases.tsv``, ``suite_groups.tsv``, ``suite.json`` and
    ``suite.md`` into ``out_dir``; return the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    tmpl = Template(cfg) if template else None
    thr = model.voxel_threshold
    pooled: dict[str, dict[str, list]] = {}
    rows = []
    for case in cases:
        data, bmask, lesion, meta = case.load()
        res = anomaly_volume(data, bmask, meta, model)
        vox_ml = float(np.prod(meta.zooms)) / 1000.0
        row = {"id": case.id, "group": case.group, "brain": case.brain, "score": round(res.score, 4),
               "flag": res.flag, "anomalous_ml": round(float(res.mask.sum()) * vox_ml, 2),
               "lesion_ml": round(float(lesion.sum()) * vox_ml, 2) if lesion is not None else 0.0,
               "anomaly_s": res.timings.get("anomaly_s")}
        if lesion is not None and lesion[bmask].any():
            truth = lesion[bmask]
            scores = {"model": res.map[bmask]}
            scores.update({k: v[bmask] for k, v in baseline_maps(res, cfg, tmpl).items()})
            p = pooled.setdefault(case.group, {"truth": []})
            p["truth"].append(truth)
            for k, v in scores.items():
                p.setdefault(k, []).append(v.astype(np.float32))
                m = voxel_metrics(v, truth, thr if k == "model" else None)
                row[f"{k}_auprc"] = round(float(m["auprc"]), 4)
                if k == "model":
                    row["model_dice"] = round(float(m.get("dice", float("nan"))), 4)
        rows.append(row)
        log.info("%s", row)
    groups = {}
    for g, p in pooled.items():
        res_g = {"cases": len(p["truth"]), "model": _metrics(p["model"], p["truth"], thr)}
        for b in BASELINES:
            if b in p:
                res_g[b] = _metrics(p[b], p["truth"])
        best = max((res_g[b]["auprc"] for b in BASELINES if b in res_g), default=float("nan"))
        res_g["best_baseline_auprc"] = best
        res_g["ratio_to_best_baseline"] = round(res_g["model"]["auprc"] / best, 2) if best > 0 else float("nan")
        groups[g] = res_g
    healthy = [r for r in rows if r["group"] == "healthy"]
    summary = {"model_sha256": model.info.get("sha256"), "voxel_threshold": thr,
               "scan_threshold": model.scan_threshold, "maps": {k: getattr(cfg.maps, k) for k in
                                                                cfg.maps.__dataclass_fields__},
               "groups": groups, "healthy": healthy, "cases": rows,
               "note": "pooled over the brain voxels of each group's cases (native grids); best_dice "
                       "uses the best threshold on these very data (optimistic)"}
    _write(out, summary, rows)
    return summary


def _write(out: Path, summary: dict, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "suite_cases.tsv", "w", newline="") as fh:
        w = csv.DictWriter(fh, keys, delimiter="\t", restval="n/a")
        w.writeheader()
        w.writerows(rows)
    with open(out / "suite_groups.tsv", "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(["group", "cases", "model_auprc", "model_dice_calibrated", "model_best_dice_optimistic",
                    "raw_auprc", "wm_distance_auprc", "template_auprc", "raw_best_dice", "wm_distance_best_dice",
                    "template_best_dice", "ratio_to_best_baseline"])
        for g, r in summary["groups"].items():
            w.writerow([g, r["cases"], r["model"]["auprc"], r["model"].get("dice"), r["model"]["best_dice"]]
                       + [r.get(b, {}).get("auprc", "n/a") for b in BASELINES]
                       + [r.get(b, {}).get("best_dice", "n/a") for b in BASELINES] + [r["ratio_to_best_baseline"]])
    (out / "suite.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "suite.md").write_text(markdown(summary))


def markdown(summary: dict) -> str:
    """The benchmark as markdown tables (groups, then held-out healthy brains)."""
    lines = [f"Voxel threshold {summary['voxel_threshold']}, scan threshold {summary['scan_threshold']}; "
             f"maps {summary['maps']}.", "",
             "| group | cases | model AUPRC | model Dice (calibrated) | model best Dice (optimistic) "
             "| raw AUPRC | \\|x-WM\\| AUPRC | template AUPRC | model / best baseline |",
             "|---|---|---|---|---|---|---|---|---|"]

    def f(v):
        return "-" if v is None or v == "n/a" else (f"{v:.3f}" if isinstance(v, float) else str(v))

    for g, r in summary["groups"].items():
        lines.append(f"| {g} | {r['cases']} | {f(r['model']['auprc'])} | {f(r['model'].get('dice'))} | "
                     f"{f(r['model']['best_dice'])} | " + " | ".join(f(r.get(b, {}).get("auprc")) for b in BASELINES)
                     + f" | {f(r['ratio_to_best_baseline'])} |")
    lines += ["", "| held-out healthy brain | scan score | flagged | anomalous volume (mL) |", "|---|---|---|---|"]
    for h in summary["healthy"]:
        lines.append(f"| {h['brain']} | {h['score']:.4f} | {h['flag']} | {h['anomalous_ml']} |")
    return "\n".join(lines) + "\n"


__all__ = ["SuiteCase", "synthetic_cases", "validation_cases", "VALIDATION_OPEN_MS", "real_cases", "Template",
           "baseline_maps", "run_suite", "markdown", "BASELINES"]
