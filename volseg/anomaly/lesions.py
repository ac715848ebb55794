"""Synthetic anomalies painted into healthy brains.

Two generators with different jobs:

- :func:`insert_lesions` makes *evaluation* cases on a native grid: a few ellipsoids (6-12 mm
  semi-axes by default) with soft edges and texture, deep in the brain, at fixed multiples
  of the white-matter level (hyper- and hypointense), with the lesion mask as ground truth.
- :func:`corrupt_patch` makes *training* corruptions on working-grid patches, deliberately
  broader (2-16 mm, irregular outlines, contrasts from 0.1x to 2x white matter, replace or
  scale the tissue, coarse noise), so the network learns "unlike healthy tissue" rather than
  one lesion model.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def _smooth_noise(rng: np.random.Generator, shape, sigma_vox: float) -> np.ndarray:
    n = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="wrap")
    return n / max(float(n.std()), 1e-6)


def _ellipsoid_alpha(shape, centre, semi_vox, edge_vox: float, rotation=None, warp=None):
    """Soft ellipsoid: alpha 1 inside, 0 outside, a linear ramp ``edge_vox`` wide on the surface."""
    grids = np.meshgrid(*[np.arange(s, dtype=np.float32) - c for s, c in zip(shape, centre)], indexing="ij")
    pts = np.stack(grids, -1)
    if rotation is not None:
        pts = pts @ rotation.T.astype(np.float32)
    rho = np.sqrt(sum((pts[..., i] / semi_vox[i]) ** 2 for i in range(3)))
    if warp is not None:
        rho = rho * (1.0 + warp)
    r_mean = float(np.mean(semi_vox))
    alpha = np.clip((1.0 - rho) * r_mean / max(edge_vox, 1e-3) + 0.5, 0.0, 1.0)
    return alpha, rho <= 1.0


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def insert_lesions(image: np.ndarray, brain_mask: np.ndarray, zooms, rng: np.random.Generator,
                   n: int = 3, radius_mm=(6.0, 12.0), contrasts=(1.4, 1.4, 0.45), contrast_jitter: float = 0.05,
                   edge_mm: float = 2.0, texture: float = 0.05, wm_level: float | None = None,
                   min_depth_mm: float = 4.0) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Paint ``n`` ellipsoidal lesions into a brain (evaluation cases).

    Lesion ``i`` takes ``contrasts[i % len(contrasts)]`` (+- ``contrast_jitter``) times the
    white-matter level (``wm_level`` or the brain's white-matter peak), with a smooth texture
    of relative strength ``texture``; semi-axes are drawn from ``radius_mm``; centres lie at
    least ``semi-axis + min_depth_mm`` inside the brain and lesions do not overlap.
    Returns (image, lesion mask (bool, alpha >= 0.5), per-lesion parameters).
    """
    from volseg.anomaly.prep import wm_peak

    zooms = np.asarray(zooms, dtype=float)
    mask = np.asarray(brain_mask) > 0
    out = np.asarray(image, dtype=np.float32).copy()
    truth = np.zeros(mask.shape, bool)
    wm = float(wm_level) if wm_level is not None else wm_peak(out[mask])
    depth = ndi.distance_transform_edt(mask, sampling=zooms)
    placed: list[tuple[np.ndarray, float]] = []  # (centre in mm, extent in mm)
    params = []
    for i in range(n):
        semi_mm = rng.uniform(*radius_mm, size=3)
        need = semi_mm.max() + min_depth_mm
        cand = np.argwhere(depth >= need)
        if len(cand) == 0:
            raise ValueError(f"no room for a lesion of {semi_mm.max():.1f} mm in this brain")
        for _ in range(200):  # apart from the lesions already placed
            centre = cand[rng.integers(len(cand))].astype(float)
            if all(np.linalg.norm(centre * zooms - c) > r + semi_mm.max() + 2 * edge_mm for c, r in placed):
                break
        else:
            raise ValueError("no room for another lesion apart from the others in this brain")
        placed.append((centre * zooms, float(semi_mm.max())))
        semi = semi_mm / zooms
        pad = np.ceil(semi.max() * 1.3 + edge_mm / zooms.min()).astype(int) + 1
        lo = np.maximum(centre.astype(int) - pad, 0)
        hi = np.minimum(centre.astype(int) + pad + 1, mask.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        shape = tuple(hi - lo)
        alpha, inside = _ellipsoid_alpha(shape, centre - lo, semi, edge_mm / float(zooms.mean()),
                                         rotation=_random_rotation(rng))
        alpha = alpha * mask[box]
        level = wm * (contrasts[i % len(contrasts)] + rng.uniform(-contrast_jitter, contrast_jitter))
        tex = level * (1.0 + texture * _smooth_noise(rng, shape, 1.0 / float(zooms.mean())))
        out[box] = out[box] * (1 - alpha) + tex * alpha
        truth[box] |= inside & mask[box]
        params.append({"centre_vox": centre.tolist(), "semi_axes_mm": semi_mm.round(2).tolist(),
                       "level_x_wm": round(level / wm, 3)})
    return out, truth, params


def _noise_blob_alpha(shape, centre, semi, rng) -> np.ndarray:
    """An organic shape: smooth noise thresholded inside a ball, soft-edged (0..1)."""
    grids = np.meshgrid(*[np.arange(s, dtype=np.float32) - c for s, c in zip(shape, centre)], indexing="ij")
    rho = np.sqrt(sum((g / max(float(r), 0.5)) ** 2 for g, r in zip(grids, semi)))
    field = _smooth_noise(rng, shape, max(1.0, float(np.mean(semi)) / 2.5))
    level = 1.6 * (1.0 - rho) + 0.6 * field  # > 0: inside
    return np.clip(level * 2.0 + 0.5, 0.0, 1.0)


def _contrast(rng, lo: float, hi: float, log: bool) -> float:
    """A factor in [lo, hi]; with ``log`` its distance from 1 is log-uniform, so subtle and strong
    contrasts are drawn equally often."""
    if not log:
        return float(rng.uniform(lo, hi))
    a, b = sorted((abs(lo - 1.0), abs(hi - 1.0)))
    d = float(np.exp(rng.uniform(np.log(max(a, 1e-3)), np.log(max(b, 2e-3)))))
    return 1.0 + d if hi > 1.0 else 1.0 - d


def corrupt_patch(patch: np.ndarray, mask: np.ndarray, rng: np.random.Generator, cfg,
                  spacing_mm: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Training corruption of a white-matter-scaled patch (WM = 1).

    1 to ``cfg.max_blobs`` anomalies, each a warped ellipsoid or (``cfg.noise_blob``) an organic
    thresholded-noise shape; its content replaces the tissue by a level relative to white matter,
    scales the tissue that is there, or (``cfg.foreign``) is tissue from elsewhere in the patch,
    mirrored and rescaled. Optionally coarse low-resolution noise on top (Kascenas et al.).
    Returns (corrupted patch, per-voxel corruption strength in [0, 1]) for the loss weights.
    ``cfg`` is a :class:`volseg.anomaly.config.CorruptionConfig`.
    """
    x = patch.astype(np.float32).copy()
    weight = np.zeros(x.shape, np.float32)
    inside = mask > 0
    if rng.random() >= cfg.prob or not inside.any():
        return x, weight
    n = int(rng.integers(1, cfg.max_blobs + 1))
    cand = np.argwhere(inside)
    log_c = cfg.log_contrast
    for _ in range(n):
        semi_mm = rng.uniform(*cfg.radius_mm) * rng.uniform(0.6, 1.0, size=3)
        semi = semi_mm / spacing_mm
        centre = cand[rng.integers(len(cand))].astype(float)
        pad = np.ceil(semi.max() * 1.5 + 2).astype(int)
        lo = np.maximum(centre.astype(int) - pad, 0)
        hi = np.minimum(centre.astype(int) + pad + 1, x.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        shape = tuple(hi - lo)
        if min(shape) < 2:
            continue
        if rng.random() < cfg.noise_blob:
            alpha = _noise_blob_alpha(shape, centre - lo, semi, rng)
        else:
            warp = 0.25 * rng.uniform() * _smooth_noise(rng, shape, max(1.0, semi.mean() / 2))
            edge = rng.uniform(0.3, 2.5)
            alpha, _ = _ellipsoid_alpha(shape, centre - lo, semi, edge, rotation=_random_rotation(rng), warp=warp)
        alpha = alpha * inside[box]
        if not alpha.any():
            continue
        bright = rng.random() < 0.5
        factor = _contrast(rng, *(cfg.bright if bright else cfg.dark), log_c)
        tex = 1.0 + rng.uniform(0.0, 0.15) * _smooth_noise(rng, shape, rng.uniform(0.5, 2.0))
        u = rng.random()
        if u < cfg.foreign:  # tissue from elsewhere: wrong anatomy for this place
            shift = [int(rng.integers(-s // 2, s // 2 + 1)) for s in x.shape]
            src = np.roll(x, shift, axis=(0, 1, 2))[::-1][box]
            new = src * rng.uniform(0.8, 1.25)
        elif u < 0.5 + cfg.foreign / 2:  # replace the tissue by a level relative to WM
            new = factor * tex
        else:  # scale the tissue that is there
            new = x[box] * factor * tex
        old = x[box].copy()
        x[box] = old * (1 - alpha) + new * alpha
        weight[box] = np.maximum(weight[box], alpha * np.clip(np.abs(x[box] - old) / 0.05, 0.0, 1.0))
    if rng.random() < cfg.coarse_noise:
        low = [max(2, s // 8) for s in x.shape]
        noise = rng.standard_normal(low).astype(np.float32) * cfg.coarse_noise_std
        zoom = [s / lo_ for s, lo_ in zip(x.shape, low)]
        x = x + ndi.zoom(noise, zoom, order=1)[: x.shape[0], : x.shape[1], : x.shape[2]] * inside
    x = np.where(inside, x, 0.0)
    return x.astype(np.float32), weight


__all__ = ["insert_lesions", "corrupt_patch"]
