"""Skull-stripping inference: predict on the working grid, invert to the native grid, clean up.

SynthStrip's ending: the probability map goes back to the scan's own grid (MONAI ``Invertd``
through the chain's trace), is thresholded, the largest connected component kept, holes
filled, the border optionally grown or shrunk in mm, and the mask saved with the input's
geometry.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from volseg.io import AtomicWriter, load_image, scan_id
from volseg.preprocess import Prepared, prepare
from volseg.strip.config import StripConfig
from volseg.transforms.functional import fill_holes, largest_component


def for_model(cfg: StripConfig, net) -> StripConfig:
    """``cfg`` with the working grid and intensity normalisation the network was trained with
    (``config.preprocess`` of its ``model.json``): a model trained with other settings is never
    fed the wrong grid. N4 and input handling stay the user's."""
    import dataclasses

    from volseg.config import Config, config_from_dict

    stored = ((getattr(net, "volseg_info", None) or {}).get("config") or {}).get("preprocess")
    if not stored:
        return cfg
    trained = config_from_dict(stored, Config, source="model.json config.preprocess")
    pre = dataclasses.replace(cfg.preprocess, grid=trained.grid, intensity=trained.intensity)
    return dataclasses.replace(cfg, preprocess=pre)


def predict_grid(net, grid_image, device, tta: bool = False):
    """Brain probability on the working grid (a MetaTensor carrying the image's trace)."""
    return predict_grid_batch(net, [grid_image], device, tta=tta)[0]


def predict_grid_batch(net, grid_images, device, tta: bool = False, batch_size: int | None = None):
    """:func:`predict_grid` for several scans, run through the network ``batch_size`` at a time
    (default: all at once). Every working grid has the same shape, and the network normalises
    each sample on its own (instance norm), so a scan's result does not depend on its batch."""
    return [prob for prob, _ in _predict(net, grid_images, device, tta, batch_size, None)]


def predict_grid_batch_qc(net, grid_images, device, tta: bool = False, batch_size: int | None = None,
                          threshold: float = 0.5):
    """:func:`predict_grid_batch`, and for each scan how sure the network was: a list of
    ``(probability, measures)``, the measures of :func:`volseg.strip.uncertainty.prediction_measures`
    (``tta_dice`` between the plain and the mirrored pass, ``boundary_uncertainty`` of the plain
    pass, masks at ``threshold``). The mirrored pass is the one ``tta`` averages with: with
    ``tta`` it costs nothing more, without it one more network pass per scan."""
    return _predict(net, grid_images, device, tta, batch_size, threshold)


def _predict(net, grid_images, device, tta, batch_size, qc_threshold):
    import torch

    from volseg.strip.uncertainty import prediction_measures

    grid_images = list(grid_images)
    step = max(1, batch_size or len(grid_images) or 1)
    out = []
    for start in range(0, len(grid_images), step):
        chunk = grid_images[start:start + step]
        x = torch.stack([g.as_tensor() if hasattr(g, "as_tensor") else torch.as_tensor(g)
                         for g in chunk]).to(device).float()
        flipped = None
        with torch.inference_mode():
            prob = torch.sigmoid(net(x)).float().cpu()
            if tta or qc_threshold is not None:  # left-right flip: the working grid is RAS, so axis 2 of (B, C, X, Y, Z)
                flipped = torch.sigmoid(net(x.flip(2))).flip(2).float().cpu()
        measures = ([prediction_measures(p[0].numpy(), f[0].numpy(), qc_threshold) for p, f in zip(prob, flipped)]
                    if qc_threshold is not None else [None] * len(chunk))
        if tta:
            prob = (prob + flipped) / 2
        for g, p, m in zip(chunk, prob, measures):
            o = g.clone()
            o[0] = p[0]
            out.append((o, m))
    return out


def to_native(prob_grid, prep: Prepared, above: float | None = None) -> np.ndarray:
    """Send a working-grid map back to the native grid (bilinear; the chain's inverse,
    :func:`volseg.transforms.functional.grid_to_native`, tested equal to ``Invertd``). With
    ``above``, only native voxels near grid voxels above it are computed (zero elsewhere): a
    bilinear value above ``above`` needs a neighbour above it, so thresholding there is exact."""
    from volseg.transforms.functional import grid_to_native

    grid = np.asarray(prob_grid[0])
    grid_box = None
    if above is not None:
        idx = np.argwhere(grid > above)
        if idx.size == 0:
            return np.zeros(tuple(prep.meta.shape), np.float32)
        grid_box = (idx.min(0) - 1, idx.max(0) + 2)
    return grid_to_native(grid, prob_grid.affine, prep.meta.affine, prep.meta.shape, grid_box=grid_box)


def mask_from_grid(prob_grid, prep: Prepared, cfg: StripConfig, border_mm: float | None = None) -> np.ndarray:
    """The native-grid brain mask (uint8) from the network's working-grid probability: inverse,
    threshold, largest component, filled holes, border (``border_mm``, else the config's)."""
    border = cfg.infer.border_mm if border_mm is None else border_mm
    return clean_mask(to_native(prob_grid, prep, above=cfg.infer.threshold), prep.meta.zooms,
                      cfg.infer.threshold, border)


def clean_mask(prob: np.ndarray, zooms, threshold: float = 0.5, border_mm: float = 0.0) -> np.ndarray:
    """Threshold, keep the largest component, fill holes, then grow (>0) or shrink (<0) in mm.

    Works inside the bounding box of the thresholded voxels plus a background margin wider than
    any growth (the same result as on the whole volume: the margin is one connected background
    shell, no distance crosses it, and where the box is cut by the volume's edge the volume ends
    there too), 3-5x faster on a head."""
    above = prob > threshold
    idx = np.argwhere(above)
    if idx.size == 0:
        return np.zeros(prob.shape, np.uint8)
    margin = 2 + int(np.ceil(max(border_mm, 0.0) / max(min(float(z) for z in zooms), 1e-3)))
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, prob.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    out = np.zeros(prob.shape, np.uint8)
    out[crop] = _clean(above[crop], zooms, border_mm)  # where the box meets the volume's edge, so does the volume
    return out


def _clean(above: np.ndarray, zooms, border_mm: float) -> np.ndarray:
    mask = largest_component(above)
    mask = fill_holes(mask)
    if border_mm:
        if border_mm > 0:
            dist = ndi.distance_transform_edt(~mask, sampling=zooms)
            mask = dist <= border_mm
        else:
            dist = ndi.distance_transform_edt(mask, sampling=zooms)
            mask = dist > -border_mm
        mask = fill_holes(largest_component(mask))
    return mask.astype(np.uint8)


def strip_volume(data, meta, net, cfg: StripConfig, device="cpu", tta: bool = False,
                 border_mm: float | None = None, qc: bool = False) -> tuple[np.ndarray, Prepared, dict]:
    """Brain mask (uint8, native grid) for an array read by :func:`volseg.io.load_image`
    (preprocessed on the grid stored with the network, :func:`for_model`). ``qc``: also the
    network's own measures of the scan in ``prep.grid_qc`` (:func:`predict_grid_batch_qc`; one
    more, mirrored, pass without ``tta``)."""
    t0 = time.perf_counter()
    cfg = for_model(cfg, net)
    prep = prepare(data, meta, cfg.preprocess)
    t1 = time.perf_counter()
    if qc:
        prob, prep.grid_qc = predict_grid_batch_qc(net, [prep.grid_image], device, tta=tta,
                                                   threshold=cfg.infer.threshold)[0]
    else:
        prob = predict_grid(net, prep.grid_image, device, tta=tta)
    t2 = time.perf_counter()
    mask = mask_from_grid(prob, prep, cfg, border_mm)
    t3 = time.perf_counter()
    timings = dict(prep.timings, predict_s=round(t2 - t1, 3), invert_clean_s=round(t3 - t2, 3),
                   total_s=round(t3 - t0, 3))
    return mask, prep, timings


def strip_file(path: str, out_dir, net, cfg: StripConfig, device="cpu", tta: bool = False,
               border_mm: float | None = None, qc=None) -> dict[str, Path]:
    """Write ``<id>_desc-brain_mask.nii.gz`` and ``<id>_desc-brain_T1w.nii.gz`` (+ JSON).

    ``qc``: a function ``(N4 image, mask, meta, network measures) -> dict`` whose result goes
    into both sidecars as ``QC`` and is returned under ``"qc"`` (``volseg strip`` passes the
    cohort's self-QC; the strip stage itself does not judge its masks)."""
    data, meta = load_image(path, nonfinite=cfg.preprocess.io.nonfinite)
    mask, prep, timings = strip_volume(data, meta, net, cfg, device, tta, border_mm, qc=qc is not None)
    if not mask.any():
        from volseg.errors import InputError

        raise InputError(path, "no brain found (the predicted mask is empty); is this a head T1?")
    from volseg.io.derivatives import save_output, sidecar

    sid = scan_id(path)
    vox_ml = float(np.prod(meta.zooms)) / 1000.0
    model = getattr(net, "volseg_info", {})
    cfg = for_model(cfg, net)
    common = dict(N4=prep.grid_image.meta.get("volseg_n4", {}), Grid=prep.grid_image.meta.get("volseg_grid", {}),
                  Timings=timings, Model={"sha256": model.get("sha256"), "net": model.get("net")},
                  Inference={"tta": bool(tta), "threshold": cfg.infer.threshold,
                             "border_mm": cfg.infer.border_mm if border_mm is None else border_mm},
                  BrainVolume_mL=round(float(mask.sum()) * vox_ml, 2))
    checks = None
    if qc is not None:
        t0 = time.perf_counter()
        checks = qc(prep.native, mask, meta, prep.grid_qc)
        timings["qc_s"] = round(time.perf_counter() - t0, 3)
        common["QC"] = checks
    with AtomicWriter() as w:
        mask_path = save_output(w, out_dir, "mask", sid, mask, meta, sidecar("mask", meta, cfg.preprocess, **common))
        brain = np.where(mask > 0, data, 0).astype(np.float32)
        brain_path = save_output(w, out_dir, "brain", sid, brain, meta,
                                 sidecar("brain", meta, cfg.preprocess, **common))
    return {"mask": mask_path, "brain": brain_path, "timings": timings, "qc": checks}


__all__ = ["strip_file", "strip_volume", "clean_mask", "to_native", "predict_grid", "predict_grid_batch",
           "predict_grid_batch_qc", "mask_from_grid", "for_model"]
