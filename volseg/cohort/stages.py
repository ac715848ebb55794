"""The per-scan computation of ``volseg run``: load -> N4 (+ working grid) -> strip -> anomaly.

N4 runs once: the :class:`~volseg.preprocess.Prepared` of the N4 stage feeds the strip network
(on its working grid) and the anomaly model (its N4-corrected native image).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from volseg.errors import InputError, VolsegError

log = logging.getLogger("volseg")

ALL_STAGES = ("n4", "strip", "anomaly")
# "export" (writing outputs, pictures and the summary row) always runs; it may be listed.
ALWAYS = ("export",)


class StageError(VolsegError):
    """A ``--stages`` choice that cannot run (unknown name, missing prerequisite or module)."""


def anomaly_available(device="cpu", model_dir=None):
    """``(load_anomaly_model, anomaly_volume, model)`` or ``(None, None, reason)``; ``model_dir``:
    a model folder (default: the shipped model)."""
    try:
        from volseg.anomaly.infer import anomaly_volume, load_anomaly_model
    except Exception as exc:  # not written yet, or broken
        return None, None, f"volseg.anomaly.infer cannot be imported ({type(exc).__name__}: {exc})"
    try:
        model = load_anomaly_model(model_dir, device)
    except Exception as exc:
        which = f"the anomaly model {model_dir}" if model_dir else "the shipped anomaly model"
        return None, None, f"{which} cannot be loaded ({type(exc).__name__}: {exc})"
    return load_anomaly_model, anomaly_volume, model


def parse_stages(text: str | None) -> tuple[str, ...] | None:
    """Stage names in pipeline order from ``"n4,strip"``; None means the default (all available)."""
    if text is None:
        return None
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in ALL_STAGES + ALWAYS]
    if unknown:
        raise StageError(f"--stages: unknown stage(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(ALL_STAGES + ALWAYS)}")
    stages = tuple(s for s in ALL_STAGES if s in names)
    if not stages:
        raise StageError("--stages: give at least one of " + ", ".join(ALL_STAGES))
    if "anomaly" in stages and not {"n4", "strip"} <= set(stages):
        raise StageError("--stages: the anomaly stage needs the n4 and strip stages "
                         "(it reads the N4-corrected image inside the brain mask)")
    return stages


@dataclass
class Context:
    """Everything a worker needs to process scans; built once per process."""

    stages: tuple[str, ...]
    cfg: object  # StripConfig
    device: object = "cpu"
    tta: bool = False
    border_mm: float | None = None
    figures: bool = True
    strip_net: object = None
    anomaly_model: object = None
    # a per-scan function standing in for the anomaly model, fn(native, mask, meta, model, cfg=None,
    # n4=False) (tests); None: the model's own batched path
    anomaly_fn: object = None
    batch_size: int = 1  # scans per network pass (strip net and autoencoder)
    models: dict = field(default_factory=dict)  # name -> {"sha256": ..., ...} for sidecars

    @property
    def preprocess_cfg(self):
        """The preprocessing settings, with N4 switched off when the n4 stage is not run."""
        pcfg = self.cfg.preprocess
        if "n4" not in self.stages:
            pcfg = dataclasses.replace(pcfg, n4=dataclasses.replace(pcfg.n4, backend="none"))
        return pcfg

    def settings(self) -> dict:
        from volseg import __version__
        from volseg.config import config_to_dict

        return {
            "volseg_version": __version__,
            "stages": list(self.stages),
            "preprocess": config_to_dict(self.preprocess_cfg),
            "strip": {"threshold": self.cfg.infer.threshold, "tta": bool(self.tta),
                      "border_mm": self.border_mm if self.border_mm is not None else self.cfg.infer.border_mm},
            "models": self.models,
            "figures": bool(self.figures),
        }

    def fingerprints(self) -> dict[str, str]:
        """One fingerprint per output (and ``figures``), chained down the stages: each covers
        everything its output depends on (volseg version, settings, weights, calibration), so a
        rerun can tell exactly which outputs a changed setting or model affects."""
        s = self.settings()
        fps = {"preproc": _hash([s["volseg_version"], s["preprocess"]])}
        if "strip" in self.stages:
            fps["mask"] = fps["brain"] = _hash([fps["preproc"], s["strip"], self.models.get("strip")])
        if "anomaly" in self.stages:
            a = dict(self.models.get("anomaly") or {})
            flags = {"calibration": a.pop("calibration", None), "min_component_voxels": a.pop("min_component_voxels", None)}
            if "min_component_mm3" in a:  # only when set: outputs written before it existed stay current
                flags["min_component_mm3"] = a.pop("min_component_mm3")
            fps["anomaly_map"] = _hash([fps.get("mask"), a])
            fps["anomaly_mask"] = _hash([fps["anomaly_map"], flags])
        fps["figures"] = _hash([fps, s["figures"]])
        return fps

    def fingerprint(self) -> str:
        """Changes whenever a setting or model that shapes any output changes."""
        return _hash([self.settings(), self.fingerprints()])


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_context(stages, cfg, device="cpu", tta=False, border_mm=None, figures=True,
                  strip_model=None, batch_size: int | None = None, anomaly_model=None) -> Context:
    """Load the models the stages need. ``stages=None``: all stages that are available.

    ``batch_size``: scans per network pass; None takes 4 on a GPU and 1 on the CPU, where
    batching was measured to bring nothing (``scripts/bench_batch.py``: strip U-Net 0.34 s per
    scan alone, 0.44 s in fours, on 2 cores) but memory."""
    if batch_size is None:
        batch_size = 4 if getattr(device, "type", str(device)).startswith("cuda") else 1
    want = tuple(stages) if stages is not None else ALL_STAGES
    ctx = Context(stages=want, cfg=cfg, device=device, tta=tta, border_mm=border_mm, figures=figures,
                  batch_size=max(1, int(batch_size)))
    if "anomaly" in want:
        _, fn, model = anomaly_available(device, anomaly_model)
        if fn is None:
            if stages is not None or anomaly_model is not None:
                raise StageError(f"--stages anomaly: not available: {model}")
            log.warning("anomaly stage left out: %s", model)
            ctx.stages = tuple(s for s in want if s != "anomaly")
        else:
            ctx.anomaly_model = model
            ctx.models["anomaly"] = anomaly_identity(model)
    if "strip" in ctx.stages:
        from volseg.nets.folder import load_model
        from volseg.strip.infer import for_model

        ctx.strip_net, info = load_model(strip_model, kind="strip", device=device)
        ctx.cfg = for_model(cfg, ctx.strip_net)  # the grid the network was trained on
        ctx.models["strip"] = {"sha256": info.get("sha256"), "net": info.get("net")}
    return ctx


# map settings added after outputs were first written, with the value that means "as before":
# left out of the identity at that value, so that upgrading volseg alone recomputes nothing
LATER_MAP_KEYS = {"scale_steps": [], "tta": False, "grey_median": 0.0, "grey_mode": "both"}


def anomaly_identity(model) -> dict:
    """Everything of an anomaly model folder that changes a map, a mask or a flag: a retrained or
    recalibrated model makes a rerun recompute what it affects. ``calibration`` and
    ``min_component_voxels`` / ``min_component_mm3`` change only the anomaly mask and the flag, except the parts of a
    calibration that shape the map itself (``map_calibration``: a multi-scale map's gains, the
    normative statistics in use), which change the map."""
    from volseg.config import config_to_dict

    info = getattr(model, "info", None) or {}
    cfg = getattr(model, "cfg", None)
    keep = ("preprocess", "maps", "calibration")
    settings = ({k: v for k, v in config_to_dict(cfg).items() if k in keep}
                if dataclasses.is_dataclass(cfg) else {})
    maps = settings.get("maps", {})
    raw = getattr(model, "calibration", None)
    calib = dict(raw or {})
    map_calib = {"scale_gains": calib.pop("scale_gains", None), "scale_thresholds": calib.pop("scale_thresholds", None)}
    norm = getattr(model, "normative", None)
    if norm is not None:  # the statistics themselves (a recalibration rewrites them)
        map_calib["normative"] = hashlib.sha256(np.ascontiguousarray(norm.mean).tobytes()
                                                + np.ascontiguousarray(norm.std).tobytes()).hexdigest()[:16]
    mask_only = ("min_component_voxels", "min_component_mm3")
    map_settings = {k: v for k, v in maps.items()
                    if k not in mask_only and not (k in LATER_MAP_KEYS and v == LATER_MAP_KEYS[k])}
    out = {"sha256": info.get("sha256"), "net": info.get("net"),
           "settings": {**settings, "maps": map_settings},
           "map_calibration": map_calib,
           "calibration": calib if raw is not None else None,
           "min_component_voxels": maps.get("min_component_voxels")}
    if maps.get("min_component_mm3"):  # added later; 0 (off) leaves the identity as before
        out["min_component_mm3"] = maps["min_component_mm3"]
    return out


@dataclass
class ScanResult:
    """What the stages computed for one scan (arrays on the input's native grid)."""

    data: np.ndarray  # the input's intensities
    meta: object  # ImageMeta
    prep: object  # Prepared
    mask: np.ndarray | None = None
    anomaly: object = None  # the anomaly stage's result object
    timings: dict = field(default_factory=dict)
    # the strip network's own self-QC measures (tta_dice, boundary_uncertainty) or None
    grid_qc: dict | None = None


class ScanFailure(VolsegError):
    """A scan failed in ``stage``; ``error`` is the message naming the file."""

    def __init__(self, stage: str, error: str):
        self.stage, self.error = stage, error
        super().__init__(error)


def compute_scan(path: str, ctx: Context) -> ScanResult:
    """Run the stages on one input file; raise :class:`ScanFailure` naming the stage and file."""
    res = compute_batch([path], ctx)[0]
    if isinstance(res, ScanFailure):
        raise res
    return res


def compute_batch(paths, ctx: Context, stored: list | None = None) -> list:
    """Run the stages on several input files, the networks on all of them at once.

    Loading, N4, the inverse to the native grid and the mask clean-up run scan by scan; the
    strip network and the autoencoder each take the scans that are still going as one batch
    (``ctx.batch_size`` at a time). Returns, in order, a :class:`ScanResult` or the
    :class:`ScanFailure` of each path: a failing scan drops out and the others go on. A
    batched network's time is shared equally among its scans in their timings.

    ``stored``: for each path, the record of its earlier run: the N4-corrected image and brain
    mask are read back from that run's outputs and only the anomaly stage runs.
    """
    if stored is None:
        out: list = [_guarded(p, "load", _load_prepare, p, ctx) for p in paths]
    else:
        out = [_guarded(p, "load", _load_stored, p, rec, ctx) for p, rec in zip(paths, stored)]

    def live():
        return [i for i, r in enumerate(out) if isinstance(r, ScanResult)]

    if "strip" in ctx.stages and stored is None and live():
        from volseg.strip.infer import predict_grid_batch_qc

        idx = live()
        t0 = time.perf_counter()
        try:  # with the mirrored pass for self-QC (volseg.cohort.selfqc): one more pass without --tta
            probs = predict_grid_batch_qc(ctx.strip_net, [out[i].prep.grid_image for i in idx], ctx.device,
                                          tta=ctx.tta, batch_size=ctx.batch_size, threshold=ctx.cfg.infer.threshold)
        except Exception as exc:  # the whole pass failed (e.g. out of memory): each scan says so
            probs = [exc] * len(idx)
        share = (time.perf_counter() - t0) / len(idx)
        for i, prob in zip(idx, probs):
            out[i] = _guarded(paths[i], "strip", _finish_strip, out[i], prob, share, ctx)
    if "anomaly" in ctx.stages and live():
        idx = live()
        if ctx.anomaly_fn is not None:
            for i in idx:
                out[i] = _guarded(paths[i], "anomaly", _anomaly_one, out[i], ctx)
        else:
            from volseg.anomaly.infer import anomaly_prepare

            preps = {}
            for i in idx:
                t0 = time.perf_counter()
                preps[i] = _guarded(paths[i], "anomaly", anomaly_prepare, out[i].prep.native, out[i].mask,
                                    out[i].meta, ctx.anomaly_model, None, False)
                if isinstance(preps[i], ScanFailure):
                    out[i] = preps.pop(i)
                else:
                    out[i].timings["anomaly_s"] = time.perf_counter() - t0
            if preps:
                _anomaly_batch(paths, out, preps, ctx)
    return out


def _guarded(path, stage: str, fn, *args):
    """``fn(*args)``, or the :class:`ScanFailure` naming ``path`` and ``stage`` if it raises."""
    try:
        return fn(*args)
    except ScanFailure as fail:
        return fail
    except VolsegError as exc:
        return ScanFailure(stage, str(exc))
    except MemoryError:
        return ScanFailure(stage, f"{path}: out of memory in the {stage} stage")
    except Exception as exc:  # a bug or an unforeseen input: keep the cohort going
        log.error("%s: unexpected error in the %s stage", path, stage, exc_info=exc)
        return ScanFailure(stage, f"{path}: unexpected {type(exc).__name__} in the {stage} stage: {exc}")


def _load_prepare(path, ctx: Context) -> ScanResult:
    from volseg.io import load_image
    from volseg.preprocess import prepare

    t0 = time.perf_counter()
    data, meta = load_image(path, nonfinite=ctx.cfg.preprocess.io.nonfinite)
    timings = {"load_s": time.perf_counter() - t0}
    prep = _guarded(path, "n4", prepare, data, meta, ctx.preprocess_cfg)  # loading worked: name N4
    if isinstance(prep, ScanFailure):
        raise prep
    timings["n4_s"] = prep.timings["n4_s"] + prep.timings["grid_s"]
    return ScanResult(data=data, meta=meta, prep=prep, timings=timings)


@dataclass
class StoredPrep:
    """The N4-corrected image of an earlier run, read back (stands in for a Prepared)."""

    native: np.ndarray


def _load_stored(path, rec: dict, ctx: Context) -> ScanResult:
    """The input's header and intensities, and the N4-corrected image and brain mask that an
    earlier run of the same settings wrote (``rec``: its record, paths relative to ``ctx.out``),
    with the strip network's self-QC measures that run recorded."""
    from pathlib import Path

    from volseg.io import load_image

    t0 = time.perf_counter()
    data, meta = load_image(path, nonfinite=ctx.cfg.preprocess.io.nonfinite)
    root = Path(rec["root"])
    native, _ = load_image(root / rec["outputs"]["preproc"])
    mask, _ = load_image(root / rec["outputs"]["mask"])
    measures = rec.get("measures") or {}
    grid_qc = {"tta_dice": measures.get("qc_tta_dice"), "boundary_uncertainty": measures.get("qc_boundary_uncertainty")}
    return ScanResult(data=data, meta=meta, prep=StoredPrep(native), mask=(mask > 0).astype(np.uint8),
                      timings={"load_s": time.perf_counter() - t0}, grid_qc=grid_qc)


def _finish_strip(res: ScanResult, prob, net_s: float, ctx: Context) -> ScanResult:
    """``prob``: ``(probability, network self-QC measures)`` of the scan, or the exception of
    its failed pass."""
    from volseg.strip.infer import mask_from_grid

    if isinstance(prob, BaseException):
        raise prob
    prob, res.grid_qc = prob
    t0 = time.perf_counter()
    res.mask = mask_from_grid(prob, res.prep, ctx.cfg, ctx.border_mm)
    res.timings["strip_s"] = net_s + time.perf_counter() - t0
    if not res.mask.any():
        raise InputError(res.meta.path, "no brain found (the predicted mask is empty); is this a head T1?")
    return res


def _anomaly_one(res: ScanResult, ctx: Context) -> ScanResult:
    t0 = time.perf_counter()
    res.anomaly = ctx.anomaly_fn(res.prep.native, res.mask, res.meta, ctx.anomaly_model, cfg=None, n4=False)
    res.timings["anomaly_s"] = time.perf_counter() - t0
    return res


def _anomaly_batch(paths, out: list, preps: dict, ctx: Context) -> None:
    from volseg.anomaly.infer import anomaly_finish
    from volseg.anomaly.recon import recon_options, reconstruct_batch

    idx = list(preps)
    model = ctx.anomaly_model
    t0 = time.perf_counter()
    try:
        recons = reconstruct_batch(model.net, [preps[i].grid_image[0].numpy() for i in idx],
                                   [preps[i].grid_mask for i in idx], model.device, batch_size=ctx.batch_size,
                                   **recon_options(model.cfg.maps))
    except Exception as exc:  # the whole pass failed: each scan says so
        recons = [exc] * len(idx)
    share = (time.perf_counter() - t0) / len(idx)

    def finish(i, recon):
        if isinstance(recon, BaseException):
            raise recon
        t1 = time.perf_counter()
        out[i].anomaly = anomaly_finish(preps[i], recon, model, recon_s=share, batch=len(idx))
        out[i].timings["anomaly_s"] += share + time.perf_counter() - t1
        return out[i]

    for i, recon in zip(idx, recons):
        out[i] = _guarded(paths[i], "anomaly", finish, i, recon)


def strip_prepared(prep, net, cfg, device="cpu", tta: bool = False,
                   border_mm: float | None = None) -> np.ndarray:
    """Brain mask (uint8, native grid) from an already prepared scan (no second N4).

    ``cfg`` is a :class:`~volseg.strip.config.StripConfig` (threshold and border).
    """
    from volseg.strip.infer import mask_from_grid, predict_grid

    return mask_from_grid(predict_grid(net, prep.grid_image, device, tta=tta), prep, cfg, border_mm)
