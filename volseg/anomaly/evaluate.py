"""Calibration on healthy brains and evaluation on labelled cases (``volseg calibrate``,
``volseg evaluate anomaly``)."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from volseg.anomaly.infer import (AnomalyModel, anomaly_volume, load_brain_input, median_sizes, scale_keys,
                                  scale_residuals, scale_steps)
from volseg.anomaly.metrics import scan_metrics, scan_threshold, voxel_metrics, voxel_threshold
from volseg.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class Case:
    """One evaluation brain: image, brain mask (None: non-zero voxels), lesion mask (None:
    healthy); or arrays already in memory (``arrays = (image, mask, lesion, meta)``)."""

    id: str
    image: str | None = None
    mask: str | None = None
    lesion: str | None = None
    arrays: tuple | None = None

    def load(self):
        if self.arrays is not None:
            return self.arrays
        from volseg.io import load_image

        data, mask, meta = load_brain_input(self.image, self.mask)
        lesion = None
        if self.lesion:
            lesion, _ = load_image(self.lesion)
            if lesion.shape != data.shape:
                raise InputError(self.lesion, f"lesion mask shape {lesion.shape} differs from the image's {data.shape}")
            lesion = lesion > 0
        return data, mask, lesion, meta


def read_cases(csv_path) -> list[Case]:
    """A CSV with columns ``id,image,mask,lesion`` (mask and lesion may be empty; relative
    paths are taken from the CSV's folder)."""
    from volseg.config import expand_path

    csv_path = Path(csv_path)
    if not csv_path.exists():
        raise InputError(csv_path, "case list not found")
    base = csv_path.parent
    out = []
    with open(csv_path, newline="") as fh:
        for row in csv.DictReader(fh):
            if not row.get("image"):
                raise InputError(csv_path, f"row without an image: {row}")

            def path(key):
                v = (row.get(key) or "").strip()
                if not v:
                    return None
                p = Path(expand_path(v))
                return str(p if p.is_absolute() else base / p)

            out.append(Case(id=row.get("id") or Path(row["image"]).name.split(".")[0], image=path("image"),
                            mask=path("mask"), lesion=path("lesion")))
    return out


def lesion_cases(image: str, mask: str | None, n: int, seed: int = 0, **kwargs) -> list[Case]:
    """``n`` cases with evaluation lesions (:func:`volseg.anomaly.lesions.insert_lesions`)
    inserted into one healthy brain, plus the healthy brain itself."""
    from volseg.anomaly.lesions import insert_lesions
    from volseg.io import scan_id

    data, bmask, meta = load_brain_input(image, mask)
    sid = scan_id(image)
    cases = [Case(id=f"{sid}_healthy", arrays=(data, bmask, None, meta))]
    for k in range(n):
        img, truth, _ = insert_lesions(data, bmask, meta.zooms, np.random.default_rng(seed + k), **kwargs)
        cases.append(Case(id=f"{sid}_lesions{seed + k}", arrays=(img, bmask, truth, meta)))
    return cases


def calibrate(model: AnomalyModel, cases: list[Case], fpr: float | None = None,
              percentile: float | None = None) -> dict:
    """Voxel threshold at a healthy false-positive rate and scan threshold at a percentile of
    healthy scan scores, from healthy ``cases``.

    With ``maps.normative`` on, the healthy residual statistics are estimated from the same
    cases first (returned under ``"normative"`` as a :class:`~volseg.anomaly.normative.Normative`,
    for :func:`volseg.nets.folder.write_calibration`), and each case's map for the thresholds is made with the
    statistics of the *other* cases (leave one out), so that the thresholds see the spread of a
    brain the statistics never saw."""
    cc = model.cfg.calibration
    fpr = cc.voxel_fpr if fpr is None else fpr
    percentile = cc.scan_percentile if percentile is None else percentile
    values, scores, per = [], [], {}
    extra = {}
    multiscale = len(median_sizes(model.cfg.maps)) > 1
    if model.cfg.maps.normative:
        if multiscale:
            raise ValueError("calibration of maps.normative with several maps.median_sizes is not supported")
        results, norm = _normative_loo(model, cases)
        extra = {"normative": norm, "normative_brains": len(cases),
                 "normative_sigma_mm": model.cfg.maps.normative_sigma_mm}
    elif multiscale:
        results, gains, quantiles = _multiscale(model, cases, fpr)
        extra = {"scale_gains": gains, "scale_thresholds": quantiles}
    else:
        results = _plain(model, cases)
    for case, mask, res in results:
        values.append(res.map[mask].astype(np.float32))
        scores.append(res.score)
        per[case.id] = {"score": res.score, "voxels": int(mask.sum())}
        log.info("calibration %s: score %.4f", case.id, res.score)
    pooled = np.concatenate(values)
    return dict({
        "voxel_threshold": voxel_threshold(pooled, fpr), "voxel_fpr": fpr,
        "scan_threshold": scan_threshold(scores, percentile), "scan_percentile": percentile,
        "score_definition": f"mean of the top {cc.score_top_percent}% of anomaly-map values in the brain "
                            "(2 mm working grid)",
        "healthy_scans": per, "model_sha256": model.info.get("sha256"),
    }, **extra)


def _plain(model: AnomalyModel, cases: list[Case]):
    for case in cases:
        data, mask, meta = _arrays(case)
        yield case, mask, anomaly_volume(data, mask, meta, model, voxel_threshold=np.inf)


def _arrays(case: Case):
    data, mask, _, meta = case.load()
    return data, mask, meta


def _reconstructed(model: AnomalyModel, cases: list[Case]):
    """``(case, mask, prep, recon)`` per case: each brain prepared and reconstructed once, for the
    calibrations that map the same reconstructions several ways."""
    from volseg.anomaly.infer import anomaly_prepare
    from volseg.anomaly.recon import recon_options, reconstruct

    for case in cases:
        data, mask, meta = _arrays(case)
        prep = anomaly_prepare(data, mask, meta, model)
        recon = reconstruct(model.net, prep.grid_image[0].numpy(), prep.grid_mask, model.device,
                            **recon_options(model.cfg.maps))
        yield case, mask, prep, recon


def _multiscale(model: AnomalyModel, cases: list[Case], fpr: float):
    """(case, mask, result) per case for a multi-scale map, with the gains that put its scales on
    one footing: each width's healthy voxel threshold q_s (pooled over ``cases``, this ``fpr``),
    gain_s = q_first / q_s. Returns the results, the gains and the q_s (keyed by width)."""
    import dataclasses

    from volseg.anomaly.infer import anomaly_finish

    cfg = model.cfg
    sizes, kinds = median_sizes(cfg.maps), scale_residuals(cfg.maps)
    steps, keys = scale_steps(cfg.maps), scale_keys(cfg.maps)
    items, values = [], {k: [] for k in keys}
    for case, mask, prep, recon in _reconstructed(model, cases):
        for s, kind, step, key in zip(sizes, kinds, steps, keys):
            maps = dataclasses.replace(cfg.maps, median_sizes=(s,), scale_residuals=(kind,), scale_steps=(step,))
            one = dataclasses.replace(cfg, maps=maps)
            res = anomaly_finish(prep, recon, model, one, voxel_threshold=np.inf, scale_gains=[1.0])
            values[key].append(res.map[mask].astype(np.float32))
        items.append((case, mask, prep, recon))
    q = {k: voxel_threshold(np.concatenate(values.pop(k)), fpr) for k in keys}
    if min(q.values()) <= 0:
        raise ValueError(f"a median width leaves no healthy residual above 0 (thresholds {q}): "
                         "cannot scale the widths against each other")
    gains = [q[keys[0]] / q[k] for k in keys]
    out = [(case, mask, anomaly_finish(prep, recon, model, voxel_threshold=np.inf, scale_gains=gains))
           for case, mask, prep, recon in items]
    return out, dict(zip(keys, gains)), {k: float(v) for k, v in q.items()}


def _normative_loo(model: AnomalyModel, cases: list[Case]):
    """(case, mask, result) per case with leave-one-out normative statistics, and the statistics
    of all cases."""
    from volseg.anomaly.infer import anomaly_finish
    from volseg.anomaly.maps import signed_residual
    from volseg.anomaly.normative import estimate, mni_template, to_template
    from volseg.transforms.register import register_affine

    if len(cases) < 3:
        raise ValueError(f"normative statistics need at least 3 healthy brains, got {len(cases)}")
    cfg = model.cfg
    sp = cfg.preprocess.grid.spacing_mm
    tmpl, tmask = mni_template(cfg)
    items = []
    for case, mask, prep, recon in _reconstructed(model, cases):
        g = prep.grid_image[0].numpy()
        tr = register_affine(g, tmpl, sp, fixed_mask=prep.grid_mask)
        r = np.where(prep.grid_mask, signed_residual(g, recon, cfg.maps.residual), 0.0)
        items.append((case, mask, prep, recon, tr, to_template(r, tr, tmpl.shape, sp),
                      to_template(prep.grid_mask.astype(np.float32), tr, tmpl.shape, sp) > 0.5))
    sig = cfg.maps.normative_sigma_mm
    out = []
    for i, (case, mask, prep, recon, tr, _, _) in enumerate(items):
        others = [it for j, it in enumerate(items) if j != i]
        loo = estimate(tmpl, tmask, [it[5] for it in others], [it[6] for it in others], sp, sig)
        out.append((case, mask, anomaly_finish(prep, recon, model, voxel_threshold=np.inf, normative=loo,
                                               transform=tr)))
    return out, estimate(tmpl, tmask, [it[5] for it in items], [it[6] for it in items], sp, sig)


def _panel(res, truth_native, png: Path, title: str) -> None:
    """Original / reconstruction / residual / map through the lesion (or the map's peak)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from monai.data import MetaTensor

    prep = res.prep
    g = prep.grid_image[0].numpy()
    recon = res.grid_recon
    resid = np.abs(g - recon) * prep.grid_mask
    truth = None
    if truth_native is not None:
        t = MetaTensor(torch.as_tensor(truth_native[None].astype(np.float32)),
                       affine=torch.as_tensor(prep.meta.affine))
        truth = prep.grid(t, grid_affine=np.asarray(prep.grid_image.affine), mode="bilinear")[0].numpy() > 0.5
    centre = (np.argwhere(truth).mean(0) if truth is not None and truth.any()
              else np.unravel_index(int(np.argmax(res.grid_map)), g.shape))
    cx, cy, cz = (int(round(c)) for c in centre)
    vmax_map = max(float(res.grid_map.max()), 1e-6)
    cols = [("original", g, "gray", (0, 1.6)), ("reconstruction", recon, "gray", (0, 1.6)),
            ("residual |x - x̂|", resid, "magma", (0, 0.8)), ("anomaly map", res.grid_map, "magma", (0, vmax_map))]
    views = [("axial", lambda a: a[:, :, cz].T), ("coronal", lambda a: a[:, cy, :].T), ("sagittal", lambda a: a[cx, :, :].T)]
    fig, axes = plt.subplots(3, 4, figsize=(10, 8))
    for r, (vname, cut) in enumerate(views):
        for c, (cname, arr, cmap, lim) in enumerate(cols):
            ax = axes[r, c]
            ax.imshow(cut(arr), cmap=cmap, vmin=lim[0], vmax=lim[1], origin="lower")
            if truth is not None and truth.any():
                ax.contour(cut(truth.astype(float)), levels=[0.5], colors="cyan", linewidths=0.6)
            ax.set_xticks([]); ax.set_yticks([])
            if r == 0:
                ax.set_title(cname, fontsize=9)
            if c == 0:
                ax.set_ylabel(vname, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=70)
    plt.close(fig)


def evaluate(model: AnomalyModel, cases: list[Case], out_dir, panels: bool = True) -> dict:
    """Maps for every case; pooled voxel metrics over the lesion cases, scan metrics over all."""
    out = Path(out_dir)
    (out / "panels").mkdir(parents=True, exist_ok=True)
    thr = model.voxel_threshold
    scan_thr = model.scan_threshold
    rows, pooled_s, pooled_t, labels, scores = [], [], [], [], []
    for case in cases:
        data, mask, lesion, meta = case.load()
        res = anomaly_volume(data, mask, meta, model)
        s = res.map[mask]
        row = {"id": case.id, "lesion_voxels": int(lesion[mask].sum()) if lesion is not None else 0,
               "score": round(res.score, 5), "flag": res.flag, "anomaly_voxels": int(res.mask[mask].sum()),
               "anomaly_s": res.timings["anomaly_s"]}
        if lesion is not None:
            m = voxel_metrics(s, lesion[mask], thr)
            row.update({k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()
                        if k in ("auroc", "auprc", "dice", "best_dice")})
            pooled_s.append(s.astype(np.float32)); pooled_t.append(lesion[mask])
        rows.append(row)
        labels.append(lesion is not None and bool(lesion[mask].any()))
        scores.append(res.score)
        if panels:
            _panel(res, lesion, out / "panels" / f"{case.id}.png", f"{case.id}: score {res.score:.3f}")
        log.info("%s: %s", case.id, row)
    summary = {"cases": len(cases), "lesion_cases": int(sum(labels)), "voxel_threshold": thr,
               "scan_threshold": scan_thr, "model_sha256": model.info.get("sha256")}
    if pooled_s:
        summary["voxel"] = voxel_metrics(np.concatenate(pooled_s), np.concatenate(pooled_t), thr)
        summary["voxel"]["note"] = ("pooled over the brain voxels of the lesion cases; best_dice uses the "
                                    "best threshold on these very data (optimistic)")
    if scan_thr is not None and 0 < sum(labels) < len(labels):
        summary["scan"] = scan_metrics(labels, scores, scan_thr)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "anomaly_cases.tsv", "w", newline="") as fh:
        w = csv.DictWriter(fh, keys, delimiter="\t", restval="n/a")
        w.writeheader(); w.writerows(rows)
    (out / "anomaly_metrics.json").write_text(json.dumps(dict(summary, per_case=rows), indent=2, default=str) + "\n")
    if model.model_dir and (Path(model.model_dir) / "learning_curve.png").exists():
        shutil.copy(Path(model.model_dir) / "learning_curve.png", out / "learning_curve.png")
    return summary


__all__ = ["Case", "read_cases", "lesion_cases", "calibrate", "evaluate"]
