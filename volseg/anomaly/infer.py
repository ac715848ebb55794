"""Anomaly inference: reconstruct a brain with the autoencoder, map the residual, threshold it.

Given a brain image and its mask on the native grid, :func:`anomaly_volume` returns, on that
same grid, the anomaly map (the 3D-median-filtered residual |x - x̂| inside the eroded brain,
in white-matter units, 0 outside the brain), the binary anomaly mask at the calibrated voxel
threshold, the reconstruction (in the input's intensity units) and a scan score with its
normal/anomalous flag.

Scan score: the mean of the top 1% (``calibration.score_top_percent``) of anomaly-map values
inside the brain on the 2 mm working grid (so it does not depend on the input's voxel size).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from volseg.anomaly.config import AEConfig
from volseg.anomaly.maps import filter_scales, remove_small, scan_score, signed_residual
from volseg.anomaly.prep import prepare_brain
from volseg.errors import InputError
from volseg.io import AtomicWriter, ImageMeta, load_image, scan_id


@dataclass
class AnomalyModel:
    net: object
    info: dict
    cfg: AEConfig
    device: object
    calibration: dict | None = None
    model_dir: Path | None = None
    normative: object = None  # volseg.anomaly.normative.Normative when maps.normative is on

    @property
    def voxel_threshold(self) -> float | None:
        return None if not self.calibration else float(self.calibration["voxel_threshold"])

    @property
    def scan_threshold(self) -> float | None:
        return None if not self.calibration else float(self.calibration["scan_threshold"])


@dataclass
class AnomalyResult:
    map: np.ndarray  # float32, native grid, 0 outside the brain
    mask: np.ndarray  # uint8, native grid
    score: float
    flag: bool | None
    timings: dict
    info: dict = field(default_factory=dict)
    grid_map: np.ndarray | None = None  # the map on the working grid
    grid_recon: np.ndarray | None = None  # the reconstruction on the working grid (white-matter units)
    prep: object = None

    @property
    def recon(self) -> np.ndarray:
        """The reconstruction on the native grid in the input's intensity units, 0 outside the
        brain (made on first use: ``volseg run`` does not write it)."""
        if getattr(self, "_recon", None) is None:
            p = self.prep
            low, wm = p.scale["low"], p.scale["wm"]
            back = p.to_native(np.where(p.grid_mask, self.grid_recon, 0.0))
            self._recon = np.where(p.mask, back * (wm - low) + low, 0.0).astype(np.float32)
        return self._recon


def load_anomaly_model(model_dir: Path | str | None = None, device="cpu", cfg: AEConfig | None = None,
                       require_calibration: bool = False) -> AnomalyModel:
    """The autoencoder (checked safetensors), its settings and its calibration, if any."""
    from volseg.nets.folder import WeightsError, load_model, model_config, read_calibration
    from volseg.nets.folder import model_dir as resolve

    model_dir = resolve(model_dir, "ae")
    net, info = load_model(model_dir, kind="ae", device=device)
    if cfg is None:
        cfg = model_config(info, AEConfig, model_dir)
    calib = read_calibration(model_dir, info, required=require_calibration)
    normative = None
    if cfg.maps.normative:
        from volseg.anomaly.normative import NORMATIVE_FILE, Normative

        normative = Normative.load(model_dir)
        if normative is None and calib is not None:
            raise WeightsError(f"{model_dir}: maps.normative is on but {NORMATIVE_FILE} is missing; "
                               "run 'volseg calibrate' again")
    return AnomalyModel(net=net, info=info, cfg=cfg, device=device, calibration=calib, model_dir=model_dir,
                        normative=normative)


def anomaly_volume(data: np.ndarray, brain_mask: np.ndarray, meta: ImageMeta, model: AnomalyModel,
                   cfg: AEConfig | None = None, n4: bool | None = None,
                   voxel_threshold: float | None = None) -> AnomalyResult:
    """Anomaly map, mask, reconstruction and scan score of one brain, on its native grid."""
    from volseg.anomaly.recon import recon_options, reconstruct

    prep = anomaly_prepare(data, brain_mask, meta, model, cfg, n4)
    t1 = time.perf_counter()
    recon = reconstruct(model.net, prep.grid_image[0].numpy(), prep.grid_mask, model.device,
                        **recon_options((cfg or model.cfg).maps))
    return anomaly_finish(prep, recon, model, cfg, voxel_threshold, recon_s=time.perf_counter() - t1)


def anomaly_prepare(data: np.ndarray, brain_mask: np.ndarray, meta: ImageMeta, model: AnomalyModel,
                    cfg: AEConfig | None = None, n4: bool | None = None):
    """The brain on the working grid in white-matter units (optional N4 inside the mask): the
    first, per-scan half of :func:`anomaly_volume` (``volseg run`` batches the network between
    this and :func:`anomaly_finish`)."""
    t0 = time.perf_counter()
    prep = prepare_brain(data, brain_mask, meta, cfg or model.cfg, n4=n4)
    prep.timings["prepare_s"] = round(time.perf_counter() - t0, 3)
    return prep


def anomaly_finish(prep, recon: np.ndarray, model: AnomalyModel, cfg: AEConfig | None = None,
                   voxel_threshold: float | None = None, recon_s: float = 0.0, batch: int = 1,
                   normative=None, transform=None, scale_gains=None) -> AnomalyResult:
    """Map, mask and score of one prepared brain from its reconstruction on the working grid
    (``recon_s``: its share of the network's time; ``batch``: how many brains shared the pass).
    With ``maps.normative`` the residual is put in units of the healthy spread at each template
    location (``normative``: default the model's; ``transform``: a registration already made).
    With several ``maps.median_sizes`` the map is multi-scale (:func:`~volseg.anomaly.maps.filter_scales`)
    with the calibration's gains (``scale_gains``: other gains, one per size)."""
    cfg = cfg or model.cfg
    mc = cfg.maps
    t2 = time.perf_counter()
    g = prep.grid_image[0].numpy()
    erode = int(round(mc.erode_mm / cfg.preprocess.grid.spacing_mm))
    normative = normative if normative is not None else model.normative
    sizes, kinds, steps = median_sizes(mc), scale_residuals(mc), scale_steps(mc)
    rs = {k: signed_residual(g, recon, k) for k in set(kinds)}
    if mc.normative and normative is not None:
        from volseg.anomaly.normative import normalise

        if set(kinds) != {mc.residual}:
            raise ValueError("maps.normative needs one residual kind (maps.residual) for every width")
        mean, std = normative.on(g, prep.grid_mask, transform)
        rs = {mc.residual: normalise(rs[mc.residual], mean, std, signed=mc.residual == "signed")}
    keys = scale_keys(mc)
    gains = scale_gains if scale_gains is not None else model_scale_gains(model, keys)
    gmap = filter_scales([rs[k] for k in kinds], prep.grid_mask, erode, sizes, gains, list(kinds), steps)
    score = scan_score(gmap[prep.grid_mask], cfg.calibration.score_top_percent)
    t3 = time.perf_counter()
    mask = prep.mask
    amap = np.where(mask, np.maximum(prep.to_native(gmap), 0.0), 0.0).astype(np.float32)
    low, wm = prep.scale["low"], prep.scale["wm"]
    amask, flag, calib = apply_calibration(amap, mask, score, model, cfg, voxel_threshold,
                                           voxel_mm3=float(np.prod(prep.meta.zooms[:3])))
    t4 = time.perf_counter()
    timings = {k: v for k, v in prep.timings.items() if k != "prepare_s"}
    prep_s = prep.timings.get("prepare_s", 0.0)
    timings.update(reconstruct_s=round(recon_s, 3), reconstruct_batch=batch, map_s=round(t3 - t2, 3),
                   invert_s=round(t4 - t3, 3),
                   anomaly_s=round(prep_s - prep.timings.get("n4_s", 0.0) + recon_s + t4 - t2, 3),
                   total_s=round(prep_s + recon_s + t4 - t2, 3))
    info = {"Model": {"sha256": model.info.get("sha256"), "net": model.info.get("net"), "kind": "ae"},
            **calib, "Maps": {k: getattr(mc, k) for k in mc.__dataclass_fields__},
            **({"ScaleGains": dict(zip(keys, gains))} if len(sizes) > 1 else {}),
            "IntensityScale": {"low": low, "white_matter": wm,
                               **({"brain_median": prep.scale["median"], "grey_median": mc.grey_median,
                                   "grey_mode": mc.grey_mode} if "median" in prep.scale else {})},
            "ScanScore": score, "ScanScoreDefinition": f"mean of the top {cfg.calibration.score_top_percent}% "
                                                       "of anomaly-map values in the brain on the 2 mm grid"}
    return AnomalyResult(map=amap, mask=amask, score=score, flag=flag,
                         timings=timings, info=info, grid_map=gmap, grid_recon=recon, prep=prep)


def median_sizes(maps) -> tuple[int, ...]:
    """The median filter widths of a map setting (``median_sizes``, else ``median_size`` alone)."""
    return tuple(int(s) for s in maps.median_sizes) or (int(maps.median_size),)


def scale_steps(maps) -> tuple[int, ...]:
    """The block size of each median width (``scale_steps``, else 1 for all: exact medians)."""
    n = len(median_sizes(maps))
    steps = tuple(int(k) for k in maps.scale_steps) or (1,) * n
    if len(steps) != n:
        raise ValueError(f"maps.scale_steps has {len(steps)} steps for {n} median widths")
    if min(steps) < 1:
        raise ValueError(f"maps.scale_steps must be 1 or more, got {list(steps)}")
    return steps


def scale_keys(maps) -> list[str]:
    """The name of each width in ``calibration.json``'s ``scale_gains``: the width ("9"), or the
    width and its block size ("5x2": 5 blocks of 2^3 voxels) for a coarse one; a width used with
    two residual kinds gets the kind too ("5-abs", "5-negative"). A width repeated with the same
    block size and kind is an error."""
    triples = list(zip(median_sizes(maps), scale_steps(maps), scale_residuals(maps)))
    if len(set(triples)) != len(triples):
        raise ValueError(f"maps.median_sizes repeats a width with the same step and residual: {list(maps.median_sizes)}")
    base = [str(s) if k == 1 else f"{s}x{k}" for s, k, _ in triples]
    return [b if base.count(b) == 1 else f"{b}-{kind}" for b, (_, _, kind) in zip(base, triples)]


def scale_residuals(maps) -> tuple[str, ...]:
    """The residual kind of each median width (``scale_residuals``, else ``residual`` for all)."""
    n = len(median_sizes(maps))
    kinds = tuple(maps.scale_residuals) or (maps.residual,) * n
    if len(kinds) != n:
        raise ValueError(f"maps.scale_residuals has {len(kinds)} kinds for {n} median widths")
    from volseg.config import CHOICES

    bad = [k for k in kinds if k not in CHOICES["maps.residual"]]
    if bad:
        raise ValueError(f"maps.scale_residuals: {bad[0]!r} is not one of {CHOICES['maps.residual']}")
    return kinds


def model_scale_gains(model: AnomalyModel, keys) -> list[float]:
    """The calibration's gain per median width (``scale_gains``, keyed by :func:`scale_keys`), 1
    for a width it has none for (one width, or an uncalibrated model)."""
    stored = (model.calibration or {}).get("scale_gains") or {}
    return [float(stored.get(str(k), 1.0)) for k in keys]


def min_component(cfg: AEConfig, voxel_mm3: float | None) -> int:
    """The smallest anomaly-mask component kept, in native voxels: the larger of
    ``maps.min_component_voxels`` and ``maps.min_component_mm3`` over the voxel volume."""
    mc = cfg.maps
    n = int(mc.min_component_voxels)
    if mc.min_component_mm3 > 0:
        if not voxel_mm3 or voxel_mm3 <= 0:
            raise ValueError("maps.min_component_mm3 needs the voxel volume of the map")
        n = max(n, int(np.ceil(float(mc.min_component_mm3) / float(voxel_mm3) - 1e-9)))
    return n


def apply_calibration(amap: np.ndarray, brain: np.ndarray, score: float, model: AnomalyModel,
                      cfg: AEConfig | None = None, voxel_threshold: float | None = None,
                      voxel_mm3: float | None = None):
    """The calibrated verdict on a native-grid anomaly map and its scan score: ``(anomaly mask
    (uint8), flag, sidecar fields)``. The mask is the map above the voxel threshold inside the
    brain, without components under ``maps.min_component_voxels`` voxels or
    ``maps.min_component_mm3`` (``voxel_mm3``: the volume of one native voxel); the flag is the
    score above the scan threshold; both are empty/None for an uncalibrated model. ``volseg run``
    applies a new calibration to a stored map with this same function."""
    thr = voxel_threshold if voxel_threshold is not None else model.voxel_threshold
    brain = np.asarray(brain) > 0
    if thr is not None:
        amask = remove_small((amap > thr) & brain, min_component(cfg or model.cfg, voxel_mm3)).astype(np.uint8)
    else:
        amask = np.zeros(brain.shape, np.uint8)
    flag = None if model.scan_threshold is None else bool(score > model.scan_threshold)
    info = {"Calibration": model.calibration, "VoxelThreshold": thr, "ScanThreshold": model.scan_threshold,
            "Anomalous": flag}
    return amask, flag, info


def load_brain_input(path, mask_path=None) -> tuple[np.ndarray, np.ndarray, ImageMeta]:
    """A brain-only image and its mask (given, or the non-zero voxels)."""
    from volseg.anomaly.data import nonzero_mask
    from volseg.anomaly.prep import check_brain_mask

    data, meta = load_image(path)
    if mask_path is not None:
        mask, mmeta = load_image(mask_path)
        if mask.shape != data.shape or not np.allclose(mmeta.affine, meta.affine, atol=1e-3):
            raise InputError(mask_path, f"mask grid {mask.shape} does not match the image {path} {data.shape}")
        mask = mask > 0
    else:
        mask = nonzero_mask(data)
    return data, check_brain_mask(mask, data, path), meta


def write_anomaly(res: AnomalyResult, meta: ImageMeta, out_dir, sid: str, cfg: AEConfig, sources=(),
                  extra=None) -> dict:
    """Write the map, mask and reconstruction (+ JSON sidecars) atomically."""
    from volseg.io.derivatives import save_output, sidecar

    vox_ml = float(np.prod(meta.zooms)) / 1000.0
    sources = [str(Path(s).resolve()) for s in sources][1:]  # the first is the input scan itself
    common = dict(res.info, Timings=res.timings, **(extra or {}),
                  AnomalousVolume_mL=round(float(res.mask.sum()) * vox_ml, 3))
    with AtomicWriter() as w:
        paths = {key: save_output(w, out_dir, name, sid, arr, meta, sidecar(name, meta, cfg.preprocess, sources,
                                                                            **common))
                 for key, name, arr in (("map", "anomaly_map", res.map), ("mask", "anomaly_mask", res.mask),
                                        ("recon", "reconstruction", res.recon))}
    return paths


def anomaly_file(path, out_dir, model: AnomalyModel, mask_path=None, strip=None) -> dict:
    """``volseg anomaly`` for one input: brain-only with ``mask_path``, else skull-stripped first
    with ``strip = (net, strip_cfg, device)``."""
    sid = scan_id(path)
    if mask_path is None and strip is not None:
        from volseg.strip.infer import strip_volume

        net, scfg, device = strip
        data, meta = load_image(path, nonfinite=scfg.preprocess.io.nonfinite)
        bmask, prep, _ = strip_volume(data, meta, net, scfg, device)
        if not bmask.any():
            raise InputError(path, "no brain found (the predicted mask is empty); is this a head T1?")
        # N4 already ran on the whole head: use the corrected image
        res = anomaly_volume(prep.native, bmask > 0, meta, model, n4=False)
        sources = [path]
    else:
        data, bmask, meta = load_brain_input(path, mask_path)
        res = anomaly_volume(data, bmask, meta, model)
        sources = [path] + ([mask_path] if mask_path else [])
    paths = write_anomaly(res, meta, out_dir, sid, model.cfg, sources)
    return dict(paths, score=res.score, flag=res.flag, timings=res.timings)


__all__ = ["AnomalyModel", "AnomalyResult", "load_anomaly_model", "anomaly_volume", "anomaly_prepare", "min_component",
           "anomaly_finish", "apply_calibration", "median_sizes", "scale_residuals", "scale_steps", "scale_keys",
           "model_scale_gains", "anomaly_file",
           "write_anomaly", "load_brain_input"]
