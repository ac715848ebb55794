"""Residual anomaly maps: |x - x̂| inside the eroded brain, 3D median filtered (or the signed
residual filtered first and its magnitude taken after, ``residual="signed"``)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage as ndi


def brain_bbox(mask: np.ndarray, margin: int = 0, multiple: int = 1, shape=None) -> tuple[slice, ...]:
    """Bounding box of ``mask`` grown by ``margin`` and to a size divisible by ``multiple``
    (kept inside ``shape``, which must itself be divisible)."""
    shape = tuple(shape or mask.shape)
    idx = np.argwhere(mask)
    if len(idx) == 0:
        return tuple(slice(0, s) for s in shape)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, shape)
    out = []
    for a, b, s in zip(lo, hi, shape):
        size = min(s, int(np.ceil((b - a) / multiple) * multiple))
        a = int(min(max(0, a - (size - (b - a)) // 2), s - size))
        out.append(slice(a, a + size))
    return tuple(out)


def signed_residual(x: np.ndarray, recon: np.ndarray, kind: str = "abs") -> np.ndarray:
    """``"abs"`` |x - x̂|, ``"positive"`` max(x - x̂, 0) (brighter than expected), ``"negative"``
    max(x̂ - x, 0) (darker than expected), ``"signed"`` x - x̂ itself (:func:`residual_map` takes
    its magnitude after the median filter), ``"excess"`` max(x - 1, 0): the input's brightness
    above white matter (1 on the working grid), which ignores ``recon``. On a T1 brain no healthy
    tissue is much brighter than white matter, while a network with a residual output copies part
    of every bright lesion through, so its residual is smaller than the lesion's excess."""
    if kind == "excess":
        return np.maximum(np.asarray(x, np.float32) - np.float32(1.0), np.float32(0.0))
    d = np.asarray(x, np.float32) - np.asarray(recon, np.float32)
    if kind == "signed":
        return d
    if kind == "abs":
        return np.abs(d)
    if kind == "positive":
        return np.maximum(d, 0)
    if kind == "negative":
        return np.maximum(-d, 0)
    raise ValueError(f"residual must be abs, positive, negative, signed or excess, got {kind!r}")


def filter_map(r: np.ndarray, brain_mask: np.ndarray, erode_vox: int = 2, median_size: int = 5) -> np.ndarray:
    """A voxel score on the working grid masked to the eroded brain and 3D median filtered
    (float32, 0 outside the eroded brain)."""
    mask = np.asarray(brain_mask) > 0
    if erode_vox > 0:
        mask = ndi.binary_erosion(mask, iterations=int(erode_vox))
    r = np.where(mask, r, 0.0).astype(np.float32)
    if median_size and median_size > 1 and mask.any():
        box = brain_bbox(mask, margin=median_size)
        r[box] = median_filter(r[box], int(median_size))
        r = np.where(mask, r, 0.0).astype(np.float32)
    return r


def median_filter(r: np.ndarray, size: int, threads: int = 2) -> np.ndarray:
    """``scipy.ndimage.median_filter(r, size, mode="constant")``, the same numbers, computed in
    ``threads`` slabs along the first axis at once (SciPy releases the GIL in its filters)."""
    n = max(1, min(int(threads), r.shape[0] // max(size, 1)))
    if n == 1:
        return ndi.median_filter(r, size=size, mode="constant")
    half, length = size // 2, r.shape[0]
    cuts = np.linspace(0, length, n + 1).astype(int)
    out = np.empty_like(r)

    def slab(a: int, b: int) -> None:
        lo, hi = max(a - half, 0), min(b + half, length)  # neighbours' voxels, not padding, inside
        out[a:b] = ndi.median_filter(r[lo:hi], size=size, mode="constant")[a - lo:b - lo]

    with ThreadPoolExecutor(n) as ex:
        list(ex.map(lambda ab: slab(*ab), zip(cuts[:-1], cuts[1:])))
    return out


def coarse_filter_map(r: np.ndarray, mask: np.ndarray, size: int, step: int) -> np.ndarray:
    """A wide median cheaply: ``r`` (0 outside ``mask``) averaged over blocks of ``step``^3
    voxels, median filtered over ``size``^3 blocks (``size * step`` voxels wide) and interpolated
    back (trilinear), 0 outside ``mask``. Not the exact median at that width: a regional level
    made at 1/``step``^3 of the cost, for widths (20-40 mm) whose exact median takes seconds."""
    mask = np.asarray(mask) > 0
    step = int(step)
    if step <= 1:
        return filter_map(r, mask, 0, size)
    r = np.where(mask, r, 0.0).astype(np.float32)
    if not mask.any():
        return r
    pad = [(0, (-n) % step) for n in r.shape]
    rp, mp = np.pad(r, pad), np.pad(mask, pad)
    box = brain_bbox(mp, margin=size * step, multiple=step, shape=rp.shape)
    sub = rp[box]
    shp = [n // step for n in sub.shape]
    blocks = sub.reshape(shp[0], step, shp[1], step, shp[2], step).mean(axis=(1, 3, 5), dtype=np.float32)
    med = median_filter(blocks, int(size)) if size and size > 1 else blocks
    up = ndi.zoom(med, step, order=1, mode="nearest", grid_mode=True).astype(np.float32)
    out = np.zeros_like(rp)
    out[box] = up[tuple(slice(0, n) for n in sub.shape)]
    out = out[tuple(slice(0, n) for n in r.shape)]
    return np.where(mask, out, 0.0).astype(np.float32)


def filter_scales(r, brain_mask: np.ndarray, erode_vox: int, sizes, gains=None, residual="abs",
                  steps=None) -> np.ndarray:
    """A map from a residual filtered at one or more median widths: ``max_s(gain_s * m_s)``.

    ``r``: one residual for every width, or a list with one per width; ``residual``: its kind
    (:func:`signed_residual`), one for all or a list with one per width. With one width this is
    :func:`filter_map` (and the magnitude for ``"signed"``). With several (multi-scale), a small
    filter keeps small lesions and a large one lets low-contrast lesions rise above the healthy
    residual, which the larger median averages down more. ``gains`` put the widths on one footing:
    ``volseg calibrate`` sets gain_s = q_first / q_s, with q_s the healthy voxel threshold of width s
    alone, so each width counts as anomalous where it is as far above healthy tissue as the first
    one is (gains default to 1: an uncalibrated model). ``steps``: per width, 1 for the exact median
    on the grid, k > 1 for :func:`coarse_filter_map` on blocks of k^3 voxels (``size`` counts blocks)."""
    sizes = [int(s) for s in sizes]
    n = len(sizes)
    steps = [1] * n if steps is None else [int(k) for k in steps]
    gains = [1.0] * n if gains is None else [float(g) for g in gains]
    rs = list(r) if isinstance(r, (list, tuple)) else [r] * n
    kinds = [residual] * n if isinstance(residual, str) else list(residual)
    if not (len(gains) == len(rs) == len(kinds) == len(steps) == n):
        raise ValueError(f"{n} median sizes but {len(gains)} gains, {len(rs)} residuals, {len(kinds)} kinds, "
                         f"{len(steps)} steps")
    mask = np.asarray(brain_mask) > 0
    if erode_vox > 0:  # once for every width
        mask = ndi.binary_erosion(mask, iterations=int(erode_vox))
    out = None
    for size, gain, ri, kind, step in zip(sizes, gains, rs, kinds, steps):
        m = finish_signed(coarse_filter_map(ri, mask, size, step), kind)  # step 1: filter_map itself
        if gain != 1.0:
            m = (m * np.float32(gain)).astype(np.float32)
        out = m if out is None else np.maximum(out, m)
    return out


def residual_map(x: np.ndarray, recon: np.ndarray, brain_mask: np.ndarray, residual: str = "abs",
                 erode_vox: int = 2, median_size: int = 5) -> np.ndarray:
    """The anomaly map on the working grid: :func:`signed_residual` through :func:`filter_map`.

    ``"signed"`` filters x - x̂ and then takes its magnitude, |median(x - x̂)|: where the
    reconstruction only blurs an edge (cortex, ventricle borders) the residual changes sign from
    voxel to voxel and the median cancels it, while a lesion's residual keeps one sign. Since the
    median commutes with monotone maps this equals the larger of the ``"positive"`` and
    ``"negative"`` maps, and it is never above the ``"abs"`` map."""
    return finish_signed(filter_map(signed_residual(x, recon, residual), brain_mask, erode_vox, median_size),
                         residual)


def finish_signed(filtered: np.ndarray, residual: str) -> np.ndarray:
    """The magnitude of a filtered ``"signed"`` residual; other residual kinds pass through."""
    return np.abs(filtered) if residual == "signed" else filtered


def remove_small(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Drop connected components (26-connectivity) smaller than ``min_voxels``."""
    mask = np.asarray(mask) > 0
    if min_voxels <= 1 or not mask.any():
        return mask
    labels, n = ndi.label(mask, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


def scan_score(values: np.ndarray, top_percent: float = 1.0) -> float:
    """Scan-level anomaly score: the mean of the top ``top_percent`` % of map values in the brain."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return 0.0
    k = max(1, int(np.ceil(v.size * top_percent / 100.0)))
    return float(np.partition(v, v.size - k)[v.size - k:].mean())


__all__ = ["residual_map", "signed_residual", "finish_signed", "filter_scales", "coarse_filter_map", "median_filter", "filter_map", "remove_small", "scan_score", "brain_bbox"]
