"""Writing one scan's outputs as BIDS derivatives, atomically, with the completion record last.

Per scan, in ``OUT/sub-X/[ses-Y/]anat/`` (each image with a JSON sidecar of the same name):
``_desc-preproc_T1w``, ``_desc-brain_mask``, ``_desc-brain_T1w``, ``_desc-anomaly_map``,
``_label-anomaly_mask``; QC pictures in ``OUT/sub-X/figures/``. All of a scan's files are
staged under temporary names and renamed into place together; then its record
``OUT/.volseg/scans/<prefix>.json`` is written: a scan is complete only when its record says
so, matches the current settings and input file, and every file it lists exists.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from volseg import __version__
from volseg.io import AtomicWriter

log = logging.getLogger("volseg")

STATE_DIR = ".volseg"
SUFFIXES = {  # output key -> (file suffix, stage that writes it)
    "preproc": ("_desc-preproc_T1w", "n4"),
    "mask": ("_desc-brain_mask", "strip"),
    "brain": ("_desc-brain_T1w", "strip"),
    "anomaly_map": ("_desc-anomaly_map", "anomaly"),
    "anomaly_mask": ("_label-anomaly_mask", "anomaly"),
}
FIGURES = {"mask": "_desc-brain_mask", "anomaly": "_desc-anomaly_map"}


class _Writer(AtomicWriter):
    """:class:`AtomicWriter` that can also stage a QC picture."""

    def stage_path(self, final: Path) -> Path:
        return self._tmp(Path(final))


def record_path(out: Path, scan) -> Path:
    return Path(out) / STATE_DIR / "scans" / f"{scan.prefix}.json"


def output_paths(out: Path, scan, stages) -> dict[str, Path]:
    """Images written for ``stages`` (by key); sidecars are the same names with ``.json``."""
    anat = Path(out) / scan.rel_dir
    return {k: anat / f"{scan.prefix}{suf}.nii.gz" for k, (suf, st) in SUFFIXES.items() if st in stages}


def figure_paths(out: Path, scan, stages, figures: bool = True) -> dict[str, Path]:
    if not figures:
        return {}
    figs = Path(out) / scan.figures_dir
    keys = ["mask"] + (["anomaly"] if "anomaly" in stages else [])
    return {k: figs / f"{scan.prefix}{FIGURES[k]}.png" for k in keys}


def sidecar(path: Path) -> Path:
    return path.with_name(path.name[: -len(".nii.gz")] + ".json")


def input_stamp(path: str) -> dict | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_record(out: Path, scan) -> dict | None:
    try:
        return json.loads(record_path(out, scan).read_text())
    except (OSError, ValueError):
        return None


def is_complete(out: Path, scan, fingerprint: str) -> bool:
    """The scan's record says ok for these settings and this input, and its files all exist."""
    rec = read_record(out, scan)
    if not rec or rec.get("status") != "ok" or rec.get("fingerprint") != fingerprint:
        return False
    if rec.get("input") != input_stamp(scan.path):
        return False
    files = list(rec.get("outputs", {}).values()) + list(rec.get("figures", {}).values())
    return all((Path(out) / f).exists() for f in files)


def _all_known_files(out: Path, scan) -> list[Path]:
    imgs = output_paths(out, scan, {st for _, st in SUFFIXES.values()})
    figs = figure_paths(out, scan, ("anomaly",))
    return [p for img in imgs.values() for p in (img, sidecar(img))] + list(figs.values())


def _staged_glob(path: Path) -> str:
    """Glob of the temporary names :class:`AtomicWriter` stages ``path`` under."""
    name = path.name
    ext = next((e for e in (".nii.gz", ".nii", ".json", ".tsv") if name.endswith(e)), "")
    return f".{name[: len(name) - len(ext)] if ext else name}.tmp*"


def start_scan(out: Path, scan) -> None:
    """Before (re)processing: drop the scan's record and any files a killed run staged for it
    (exact names only: another scan of the same folder may be writing at the same time)."""
    rec = record_path(out, scan)
    rec.unlink(missing_ok=True)
    for final in _all_known_files(out, scan) + [rec]:
        if final.parent.is_dir():
            for stale in final.parent.glob(_staged_glob(final)):
                stale.unlink(missing_ok=True)


def remove_outputs(out: Path, scan) -> None:
    """Delete every output file of a scan (after it failed: no image is left for it)."""
    for p in _all_known_files(out, scan):
        p.unlink(missing_ok=True)


def write_record(out: Path, scan, record: dict) -> None:
    with AtomicWriter() as w:
        w.save_json(record, record_path(out, scan))


def base_record(scan, status: str) -> dict:
    return {"scan": scan.prefix, "subject": scan.subject, "session": scan.session,
            "source": scan.path, "status": status, "volseg_version": __version__,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def export_scan(out: Path, scan, res, ctx) -> dict:
    """Write the scan's images, sidecars and pictures, then its record; return the record."""
    from volseg.cohort.stages import qc_measures
    from volseg.preprocess import provenance

    t0 = time.perf_counter()
    out = Path(out)
    meta, prep = res.meta, res.prep
    paths = output_paths(out, scan, ctx.stages)
    figs = figure_paths(out, scan, ctx.stages, ctx.figures)
    measures = qc_measures(res)
    rel = {k: str(p.relative_to(out)) for k, p in paths.items()}
    timings = {k: round(v, 3) for k, v in res.timings.items()}
    settings = ctx.settings()
    vox_ml = float(np.prod(meta.zooms)) / 1000.0

    def info(key: str, sources: tuple[str, ...] = (), **extra) -> dict:
        d = provenance(meta, ctx.preprocess_cfg, **extra)
        d["Sources"] = d["Sources"] + [f"bids::{rel[s]}" for s in sources if s in rel]
        d.update(Models=ctx.models, Settings=settings, Timings=timings)
        return d

    n4 = prep.grid_image.meta.get("volseg_n4", {})
    with _Writer() as w:
        if "preproc" in paths:
            w.save_image(prep.native, meta, paths["preproc"], kind="image")
            w.save_json(info("preproc", SkullStripped=False, N4=n4,
                             Description="N4-corrected, input grid, intensities not rescaled"),
                        sidecar(paths["preproc"]))
        if "mask" in paths:
            w.save_image(res.mask, meta, paths["mask"], kind="mask")
            w.save_json(info("mask", ("preproc",), Type="Brain", SkullStripped=False, N4=n4,
                             BrainVolume_mL=measures.get("brain_volume_ml")), sidecar(paths["mask"]))
            brain = np.where(res.mask > 0, res.data, 0).astype(np.float32)
            w.save_image(brain, meta, paths["brain"], kind="source")
            w.save_json(info("brain", ("mask",), SkullStripped=True,
                             Description="input intensities (not N4-corrected) inside the brain mask"),
                        sidecar(paths["brain"]))
        if "anomaly_map" in paths:
            a = res.anomaly
            ainfo = dict(getattr(a, "info", {}) or {})
            w.save_image(np.asarray(a.map, dtype=np.float32), meta, paths["anomaly_map"], kind="map")
            w.save_json(info("anomaly_map", ("preproc", "mask"), SkullStripped=True, Anomaly=ainfo,
                             AnomalyScore=measures["anomaly_score"], AnomalyFlag=measures["anomaly_flag"],
                             Description="voxel-wise anomaly map, 0 outside the brain"),
                        sidecar(paths["anomaly_map"]))
            w.save_image(np.asarray(a.mask), meta, paths["anomaly_mask"], kind="mask")
            w.save_json(info("anomaly_mask", ("anomaly_map",), Type="Anomaly", SkullStripped=True,
                             Anomaly=ainfo, AnomalousVolume_mL=measures["anomalous_volume_ml"]),
                        sidecar(paths["anomaly_mask"]))
        if figs:
            _draw_figures(w, scan, res, figs, vox_ml)
    timings["export_s"] = round(time.perf_counter() - t0, 3)
    timings["total_s"] = round(sum(v for k, v in timings.items() if k != "total_s"), 3)
    record = base_record(scan, "ok")
    record.update(fingerprint=ctx.fingerprint(), input=input_stamp(scan.path), outputs=rel,
                  figures={k: str(p.relative_to(out)) for k, p in figs.items()},
                  measures=measures, timings=timings, stages=list(ctx.stages))
    write_record(out, scan, record)  # last: the scan is complete from here on
    return record


def _draw_figures(w: _Writer, scan, res, figs: dict[str, Path], vox_ml: float) -> None:
    import nibabel as nib

    from volseg.report.figures import anomaly_figure, mask_figure

    aff = np.asarray(res.meta.affine, dtype=float)
    anat = nib.Nifti1Image(np.asarray(res.prep.native, dtype=np.float32), aff)
    mask = nib.Nifti1Image(res.mask.astype(np.uint8), aff) if res.mask is not None else None
    title = scan.prefix
    if mask is not None:
        title += f"  brain {float(res.mask.sum()) * vox_ml:.0f} mL"
    mask_figure(anat, mask, w.stage_path(figs["mask"]), title=title)
    if "anomaly" in figs:
        a = res.anomaly
        amap = nib.Nifti1Image(np.asarray(a.map, dtype=np.float32), aff)
        amask = nib.Nifti1Image(np.asarray(a.mask).astype(np.uint8), aff)
        anomaly_figure(anat, amap, mask, amask, w.stage_path(figs["anomaly"]),
                       title=f"{scan.prefix}  score {float(a.score):.3g}"
                             + ("  FLAGGED" if a.flag else "  (not calibrated)" if a.flag is None else ""))
