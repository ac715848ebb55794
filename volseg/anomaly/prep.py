"""Brain-only preprocessing for the anomaly stage.

A brain image and its mask on the native grid -> N4 inside the mask (optional) -> the
96x128x160 2 mm working grid centred on the brain (one resampling) -> intensities put on a
white-matter scale inside the brain: ``(x - low) / (wm - low)`` with ``low`` the 1st
percentile and ``wm`` the white-matter peak of the brain's histogram (:func:`wm_peak`), so that white matter
sits at 1 whatever the scanner's units (raw, FreeSurfer-normalised or z-scored). Maps made on
the grid go back to the native grid through the same :class:`~volseg.transforms.HeadGrid`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from volseg.errors import InputError
from volseg.io import ImageMeta

CLIP = (-0.5, 3.0)


def wm_peak(values: np.ndarray) -> float:
    """The white-matter peak of a T1 brain: the histogram mode of the brightest 40% of voxels.

    White matter is the brightest large tissue class of a T1 brain (about 35-45% of it); looking
    above the 60th percentile keeps grey matter's mode out even when the two overlap.
    """
    values = np.asarray(values, dtype=np.float64)
    lo, top = np.percentile(values, [60, 99.5])
    upper = values[(values >= lo) & (values <= top)]
    if upper.size < 10 or top <= lo:
        return float(np.percentile(values, 90))
    hist, edges = np.histogram(upper, bins=100, range=(lo, top))
    hist = ndi.gaussian_filter1d(hist.astype(float), 2.0)
    i = int(np.argmax(hist))
    return float((edges[i] + edges[i + 1]) / 2)


def wm_scale(data: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, dict]:
    """White-matter scaling inside ``mask`` (0 outside); returns (scaled, {"low", "wm"})."""
    inside = data[mask]
    low = float(np.percentile(inside, 1.0))
    wm = wm_peak(inside)
    if wm - low <= 1e-6 * max(1.0, abs(wm)):
        raise ValueError("the brain has no contrast (constant intensities)")
    out = np.where(mask, (data - low) / (wm - low), 0.0)
    return np.clip(out, *CLIP).astype(np.float32), {"low": low, "wm": wm}


def match_grey(scaled: np.ndarray, mask: np.ndarray, target: float, mode: str = "both") -> tuple[np.ndarray, float]:
    """Put the brain's median at ``target`` (white-matter units) by a monotone piecewise-linear
    curve through (0, 0), (median, target) and (1, 1), identity above white matter.

    On a white-matter scale the brain's median is mostly grey matter: 0.75-0.78 on the real 3D T1
    brains the shipped network was trained on, 0.91-0.96 on 2D spin-echo clinical T1, whose grey/
    white contrast is low. The curve gives such a scan the grey/white contrast the network knows;
    white matter (1) and everything brighter, where bright lesions lie, are unchanged. ``mode``:
    ``both`` moves any median to ``target``; ``raise`` (the contrast) only a median above it.
    Returns the mapped image (0 outside ``mask``) and the median before."""
    inside = scaled[mask]
    med = float(np.median(inside)) if inside.size else 0.0
    if target <= 0 or not 0.05 < med < 0.99 or (mode == "raise" and med <= target):
        return scaled, med
    low = scaled * (target / med)
    mid = target + (scaled - med) * ((1.0 - target) / (1.0 - med))
    out = np.where(scaled <= med, low, np.where(scaled <= 1.0, mid, scaled))
    return np.where(mask, out, 0.0).astype(np.float32), med


@dataclass
class BrainPrepared:
    meta: ImageMeta
    native: np.ndarray  # N4-corrected image on the native grid (not rescaled)
    mask: np.ndarray  # native brain mask (bool)
    grid_image: object  # MetaTensor (1, X, Y, Z): scaled brain, 0 outside; carries the trace
    grid_mask: np.ndarray  # brain mask on the working grid (bool)
    grid: object  # the HeadGrid, to invert grid maps
    scale: dict
    timings: dict
    grid_unmatched: np.ndarray | None = None  # the scaled brain before grey matching (when it was on)

    def to_native(self, grid_map: np.ndarray, mode: str = "bilinear") -> np.ndarray:
        """A working-grid array back on the native grid (the input's shape), 0 outside the
        brain's bounding box: only that box is resampled (one trilinear resampling from the
        grid's affine to the native voxels, as the chain's inverse would do, on fewer voxels)."""
        from volseg.transforms.functional import grid_to_native

        idx = np.argwhere(self.mask)
        box = (idx.min(0) - 1, idx.max(0) + 2)
        return grid_to_native(grid_map, self.grid_image.affine, self.meta.affine, self.mask.shape, box, mode)


def check_brain_mask(mask: np.ndarray, data: np.ndarray, path) -> np.ndarray:
    if mask.shape != data.shape:
        raise InputError(path, f"brain mask shape {mask.shape} differs from the image's {data.shape}")
    mask = np.asarray(mask) > 0
    if mask.sum() < 1000:
        raise InputError(path, f"brain mask has {int(mask.sum())} voxels; too small to be a brain")
    return mask


def prepare_brain(data: np.ndarray, mask: np.ndarray, meta: ImageMeta, cfg, n4: bool | None = None) -> BrainPrepared:
    """Take a brain (array + mask on the native grid) to the scaled working grid.

    ``cfg`` is an :class:`volseg.anomaly.config.AEConfig`; ``n4`` overrides ``cfg.maps.n4``.
    """
    import torch
    from monai.data import MetaTensor

    from volseg.transforms import HeadGrid

    mask = check_brain_mask(mask, data, meta.path)
    data = np.asarray(data, dtype=np.float32)
    pc = cfg.preprocess
    t0 = time.perf_counter()
    if (cfg.maps.n4 if n4 is None else n4) and pc.n4.backend != "none":
        from volseg.transforms.n4 import n4_log_field_in_process

        # the backend stored with the model (the shipped model was calibrated with SimpleITK's);
        # ants falls back to SimpleITK here, as before
        backend = "numpy" if pc.n4.backend == "numpy" else "simpleitk"
        log_field, _ = n4_log_field_in_process(backend, data, meta.zooms, mask=mask, shrink=pc.n4.shrink,
                                               shrink_target_mm=pc.n4.shrink_target_mm,
                                               iterations=pc.n4.iterations, convergence=pc.n4.convergence,
                                               bspline_spacing_mm=pc.n4.bspline_spacing_mm,
                                               bspline_order=pc.n4.bspline_order)
        native = np.where(mask, data / np.exp(log_field), 0.0).astype(np.float32)
    else:
        native = np.where(mask, data, 0.0).astype(np.float32)
    t1 = time.perf_counter()
    grid = HeadGrid(pc.grid.spacing_mm, pc.grid.size, pc.grid.top_margin_mm)
    affine = torch.as_tensor(meta.affine)
    img = MetaTensor(torch.as_tensor(native[None]), affine=affine)
    grid_affine = grid.compute_grid(img, mask=mask)
    g_img = grid(img, grid_affine=grid_affine, mode="bilinear")
    g_mask = grid(MetaTensor(torch.as_tensor(mask[None].astype(np.float32)), affine=affine),
                  grid_affine=grid_affine, mode="bilinear")[0].numpy() > 0.5
    if g_mask.sum() < 100:
        raise InputError(meta.path, "the brain mask covers almost nothing on the 2 mm grid")
    try:
        scaled, scale = wm_scale(g_img[0].numpy(), g_mask)
    except ValueError as exc:
        raise InputError(meta.path, str(exc)) from None
    unmatched = None
    if cfg.maps.grey_median > 0:
        matched, scale["median"] = match_grey(scaled, g_mask, cfg.maps.grey_median, cfg.maps.grey_mode)
        if matched is not scaled:
            unmatched, scaled = scaled, matched
    g_img[0] = torch.as_tensor(scaled)
    t2 = time.perf_counter()
    return BrainPrepared(meta=meta, native=native, mask=mask, grid_image=g_img, grid_mask=g_mask, grid=grid,
                         scale=scale, timings={"n4_s": round(t1 - t0, 3), "grid_s": round(t2 - t1, 3)},
                         grid_unmatched=unmatched)


__all__ = ["BrainPrepared", "prepare_brain", "match_grey", "wm_peak", "wm_scale", "check_brain_mask"]
