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
from volseg.io import derivatives as D
from volseg.io.derivatives import OUTPUTS, sidecar_path

log = logging.getLogger("volseg")

STATE_DIR = ".volseg"


class _Writer(AtomicWriter):
    """:class:`AtomicWriter` that can also stage a QC picture."""

    def stage_path(self, final: Path) -> Path:
        return self._tmp(Path(final))


def record_path(out: Path, scan) -> Path:
    return Path(out) / STATE_DIR / "scans" / f"{scan.prefix}.json"


def output_paths(out: Path, scan, stages) -> dict[str, Path]:
    """Images written for ``stages`` (by key); sidecars are the same names with ``.json``."""
    keys = [k for k, o in OUTPUTS.items() if o.stage is not None and o.stage in stages]
    return D.output_paths(out, scan.prefix, keys, tree=True)


def figure_paths(out: Path, scan, stages, figures: bool = True) -> dict[str, Path]:
    if not figures:
        return {}
    keys = ["mask"] + (["anomaly"] if "anomaly" in stages else [])
    return {k: D.figure_path(out, k, scan.prefix) for k in keys}


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
    imgs = output_paths(out, scan, {o.stage for o in OUTPUTS.values()})
    figs = figure_paths(out, scan, ("anomaly",))
    return [p for img in imgs.values() for p in (img, sidecar_path(img))] + list(figs.values())


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


def export_scan(out: Path, scan, res, ctx, only=None) -> dict:
    """Write the scan's images, sidecars and pictures, then its record; return the record.
    ``only``: the anomaly outputs alone (a rerun with a new anomaly model), merged into the
    scan's existing record; the other files are left as they are."""
    from volseg.cohort.qc import qc_measures

    t0 = time.perf_counter()
    out = Path(out)
    meta, prep = res.meta, res.prep
    paths = all_paths = output_paths(out, scan, ctx.stages)
    figs = figure_paths(out, scan, ctx.stages, ctx.figures)
    if only:
        paths = {k: p for k, p in paths.items() if OUTPUTS[k].stage == "anomaly"}
        figs = {k: p for k, p in figs.items() if k == "anomaly"}
    measures: dict = {}  # filled by the QC thread below before any sidecar is made
    rel = {k: str(p.relative_to(out)) for k, p in paths.items()}
    timings = {k: round(v, 3) for k, v in res.timings.items()}
    settings = ctx.settings()
    vox_ml = float(np.prod(meta.zooms)) / 1000.0

    def info(key: str, sources: tuple[str, ...] = (), **extra) -> dict:
        uris = [D.bids_uri(out, all_paths[s]) for s in sources if s in all_paths]
        return D.sidecar(key, meta, ctx.preprocess_cfg, uris, **extra, Models=ctx.models, Settings=settings,
                         Timings=timings)

    n4 = prep.grid_image.meta.get("volseg_n4", {}) if not only else {}
    arrays = {"preproc": lambda: prep.native, "mask": lambda: res.mask,
              "brain": lambda: np.where(res.mask > 0, res.data, 0).astype(np.float32),
              "anomaly_map": lambda: np.asarray(res.anomaly.map, dtype=np.float32),
              "anomaly_mask": lambda: np.asarray(res.anomaly.mask)}
    ainfo = dict(getattr(res.anomaly, "info", {}) or {}) if res.anomaly is not None else {}
    sidecars = {
        "preproc": lambda: info("preproc", N4=n4),
        "mask": lambda: info("mask", ("preproc",), N4=n4, BrainVolume_mL=measures.get("brain_volume_ml"),
                             QC=qc_sidecar(measures)),
        "brain": lambda: info("brain", ("mask",)),
        "anomaly_map": lambda: info("anomaly_map", ("preproc", "mask"), Anomaly=ainfo,
                                    AnomalyScore=measures["anomaly_score"], AnomalyFlag=measures["anomaly_flag"]),
        "anomaly_mask": lambda: info("anomaly_mask", ("anomaly_map",), Anomaly=ainfo,
                                     AnomalousVolume_mL=measures["anomalous_volume_ml"]),
    }
    with _Writer() as w:
        # the QC measures (NumPy/SciPy) and the pictures (Python and matplotlib, mostly holding
        # the GIL) run in threads while the images are compressed (ISA-L, NumPy: no GIL); the
        # sidecars, which carry the measures, are made once the images are staged. Everything
        # finishes inside the writer, so a failure of any part removes every staged file
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="volseg-export")
        pictures = None
        try:
            qc = pool.submit(qc_measures, res)
            if figs:
                pictures = pool.submit(_draw_figures, w, scan, res, figs, vox_ml, tuple(figs))
            for key, path in paths.items():
                w.save_image(arrays[key](), meta, path, kind=OUTPUTS[key].kind)
            measures.update(qc.result())
            for key, path in paths.items():
                w.save_json(sidecars[key](), sidecar_path(path))
        finally:
            pool.shutdown(wait=True)
        if pictures is not None:
            pictures.result()
    timings["export_s"] = round(time.perf_counter() - t0, 3)
    timings["total_s"] = round(sum(v for k, v in timings.items() if k != "total_s"), 3)
    record = base_record(scan, "ok")
    record.update(fingerprint=ctx.fingerprint(), fingerprints=ctx.fingerprints(), input=input_stamp(scan.path),
                  outputs=rel,
                  figures={k: str(p.relative_to(out)) for k, p in figs.items()},
                  measures=measures, timings=timings, stages=list(ctx.stages))
    if only:  # the record of the first run, with the new anomaly outputs, numbers and times
        record = dict(only, **{k: record[k] for k in ("fingerprint", "fingerprints", "finished", "volseg_version")},
                      outputs=dict(only["outputs"], **rel), figures=dict(only.get("figures") or {}, **record["figures"]),
                      measures=dict(only["measures"], **measures),
                      timings=dict(only["timings"], anomaly_s=timings.get("anomaly_s"),
                                   rerun_anomaly_s=timings["total_s"]),
                      refreshed="anomaly")
    write_record(out, scan, record)  # last: the scan is complete from here on
    return record


def qc_sidecar(measures: dict) -> dict:
    """The mask sidecar's ``QC``: ``qc`` (ok/check), ``notes``, ``reasons`` (the self-QC reason
    codes, :data:`volseg.cohort.selfqc.REASONS`) and the numbers behind them."""
    numbers = {k: v for k, v in measures.items()
               if (k.startswith("qc_") and k not in ("qc_notes", "qc_reasons")) or k in ("brain_volume_ml", "snr")}
    return {"qc": measures.get("qc"), "notes": list(measures.get("qc_notes", [])),
            "reasons": list(measures.get("qc_reasons", [])), "measures": numbers}


# What a rerun can redo without the rest: a recalibration changes only the anomaly mask and flag;
# a new anomaly model or map setting changes the map too, but not N4 or the brain mask.
FLAGS_ONLY = frozenset({"anomaly_mask", "figures"})
ANOMALY_ONLY = frozenset({"anomaly_map", "anomaly_mask", "figures"})


def stale_outputs(out: Path, scan, ctx) -> frozenset | None:
    """The outputs of a complete scan whose fingerprints no longer match ``ctx`` (empty: none),
    or None when the scan has to be computed whole: no ok record, a changed input, other
    outputs than the stages write now, or a file missing."""
    rec = read_record(out, scan)
    if not rec or rec.get("status") != "ok" or rec.get("input") != input_stamp(scan.path):
        return None
    old, new = rec.get("fingerprints") or {}, ctx.fingerprints()
    files = list(rec.get("outputs", {}).values()) + list(rec.get("figures", {}).values())
    if set(rec.get("outputs", {})) != set(new) - {"figures"} or not all((Path(out) / f).exists() for f in files):
        return None
    return frozenset(k for k in new if old.get(k) != new[k])


def refresh_flags(out: Path, scan, ctx) -> dict:
    """Re-threshold a complete scan's anomaly map with the model's current calibration: rewrite
    the anomaly mask, the two anomaly sidecars, the anomaly picture and the record; nothing else
    (:data:`FLAGS_ONLY` are stale)."""
    import json
    from types import SimpleNamespace

    from volseg.anomaly.infer import apply_calibration
    from volseg.io import load_image

    t0 = time.perf_counter()
    out = Path(out)
    rec = read_record(out, scan)
    paths = {k: out / v for k, v in rec["outputs"].items()}
    # the stored map carries the input's grid, affine and codes: its header serves for the new mask
    amap, meta = load_image(paths["anomaly_map"])
    brain, _ = load_image(paths["mask"])
    score = float(rec["measures"]["anomaly_score"])
    amask, flag, calib = apply_calibration(amap, brain, score, ctx.anomaly_model,
                                           voxel_mm3=float(np.prod(meta.zooms[:3])))
    vol = round(float(amask.sum()) * float(np.prod(meta.zooms)) / 1000.0, 2)
    measures = dict(rec["measures"], anomaly_flag=flag, anomalous_volume_ml=vol)
    figs = {k: out / v for k, v in (rec.get("figures") or {}).items() if k == "anomaly"}
    with _Writer() as w:
        w.save_image(amask, meta, paths["anomaly_mask"], kind=OUTPUTS["anomaly_mask"].kind)
        for key, extra in (("anomaly_map", {"AnomalyFlag": flag}), ("anomaly_mask", {"AnomalousVolume_mL": vol})):
            info = json.loads(sidecar_path(paths[key]).read_text())
            info.update(extra, Models=ctx.models, Settings=ctx.settings())
            info["Anomaly"] = dict(info.get("Anomaly") or {}, **calib)
            w.save_json(info, sidecar_path(paths[key]))
        if figs:
            anat, _ = load_image(paths["preproc"]) if "preproc" in paths else load_image(scan.path)
            res = SimpleNamespace(meta=meta, prep=SimpleNamespace(native=anat), mask=brain,
                                  anomaly=SimpleNamespace(map=amap, mask=amask, score=score, flag=flag))
            _draw_figures(w, scan, res, figs, 0.0, keys=("anomaly",))
    record = dict(rec, fingerprint=ctx.fingerprint(), fingerprints=ctx.fingerprints(), measures=measures,
                  finished=base_record(scan, "ok")["finished"], volseg_version=__version__,
                  timings=dict(rec.get("timings", {}), refresh_flags_s=round(time.perf_counter() - t0, 3)),
                  refreshed="anomaly_mask")
    write_record(out, scan, record)
    return record


def _draw_figures(w: _Writer, scan, res, figs: dict[str, Path], vox_ml: float,
                  keys=("mask", "anomaly")) -> None:
    import nibabel as nib

    from volseg.report.figures import anomaly_figure, mask_figure, plot_grid

    aff = np.asarray(res.meta.affine, dtype=float)
    anat = nib.Nifti1Image(np.asarray(res.prep.native, dtype=np.float32), aff)
    mask = nib.Nifti1Image(res.mask.astype(np.uint8), aff) if res.mask is not None else None
    amap = amask = None
    if "anomaly" in figs and "anomaly" in keys:
        amap = nib.Nifti1Image(np.asarray(res.anomaly.map, dtype=np.float32), aff)
        amask = nib.Nifti1Image(np.asarray(res.anomaly.mask).astype(np.uint8), aff)
    # every picture of the scan drawn from one resampling of each volume
    g = plot_grid(anat, mask=mask, amap=amap, amask=amask)
    anat, mask, amap, amask = g["anat"], g["mask"], g["amap"], g["amask"]
    title = scan.prefix
    if mask is not None:
        title += f"  brain {float(res.mask.sum()) * vox_ml:.0f} mL"
    if "mask" in figs and "mask" in keys:
        mask_figure(anat, mask, w.stage_path(figs["mask"]), title=title)
    if "anomaly" in figs and "anomaly" in keys:
        a = res.anomaly
        anomaly_figure(anat, amap, mask, amask, w.stage_path(figs["anomaly"]),
                       title=f"{scan.prefix}  score {float(a.score):.3g}"
                             + ("  FLAGGED" if a.flag else "  (not calibrated)" if a.flag is None else ""))
