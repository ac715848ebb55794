"""Benchmark lesion families: synthetic lesions of set contrasts, sizes, shapes and sites.

The anomaly benchmark (:mod:`volseg.anomaly.benchmark`) paints these into real healthy brains
the model never saw. Each *family* is a contrast band relative to the brain's white-matter
level, reported on its own:

========== ============= =====================================================
family     x white matter what it stands for
========== ============= =====================================================
dark       0.3-0.5       T1 black holes, necrosis, cysts
grey       0.6-0.8       grey-matter-like lesions (chronic MS plaques, oedema)
subtle     1.1-1.25      slightly brighter than white matter (hard on purpose)
bright     1.3-1.6       enhancing lesions, haemorrhage, fat
========== ============= =====================================================

Contrasts are relative to the white matter *around* the lesion, so on a scan with a bias field
the lesion is painted into the bias-corrected brain (:func:`brain_bias_field`: N4 inside the brain
mask) relative to its white-matter peak, and the field is put back (``field=`` of
:func:`insert_family`). Painting relative to the uncorrected brain's global white-matter level
instead gives a lesion whose contrast to its neighbours is not the family's where the field is
far from its mean: on the clinical open_ms scans a "bright" lesion (1.3-1.6x) came out of N4 at
1.1-1.2x its surroundings, and in one T1_brain_c1 case at 1.0x.

Every case holds three lesions of one family, one small (3-6 mm radius), one medium (6-12 mm)
and one large (12-25 mm), each at a different *site* (deep white matter, periventricular,
juxtacortical), each either an ellipsoid or an irregular multi-lobed shape, with soft edges
and texture. Sites are found from the image itself (white matter near the white-matter level,
ventricles as dark voxels deep in the brain, cortex as grey-level voxels near the surface), so
the generator works on any T1 brain.

The training corruption (:func:`volseg.anomaly.lesions.corrupt_patch`) is a different
generator on purpose: these shapes, levels and sites are not what the network was taught.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from volseg.anomaly.lesions import _random_rotation, _smooth_noise

FAMILIES: dict[str, tuple[float, float]] = {
    "dark": (0.3, 0.5),
    "grey": (0.6, 0.8),
    "subtle": (1.1, 1.25),
    "bright": (1.3, 1.6),
}
SITES = ("deep_wm", "periventricular", "juxtacortical")
SHAPES = ("ellipsoid", "lobed")
SIZE_BANDS_MM = ((3.0, 6.0), (6.0, 12.0), (12.0, 25.0))


def tissue_sites(image: np.ndarray, mask: np.ndarray, zooms) -> dict[str, np.ndarray]:
    """Candidate lesion centres (bool arrays) for each site of :data:`SITES`.

    White matter: smoothed intensity within 12% of the white-matter peak. Ventricles: voxels
    below 0.45x white matter at least 15 mm inside the brain. Cortex: 0.5-0.8x white matter
    within 12 mm of the surface. Deep white matter is >= 8 mm from both; periventricular white
    matter within 6 mm of a ventricle; juxtacortical white matter within 3 mm of cortex.
    A site with no voxel falls back to white matter at the matching depth.
    """
    from volseg.anomaly.prep import wm_peak

    zooms = np.asarray(zooms, dtype=float)
    mask = np.asarray(mask) > 0
    x = np.asarray(image, dtype=np.float32)
    rel = ndi.gaussian_filter(x, 1.0 / zooms) / max(wm_peak(x[mask]), 1e-6)
    depth = ndi.distance_transform_edt(mask, sampling=zooms)
    wm = mask & (rel > 0.88) & (rel < 1.12) & (depth > 4)
    vent = mask & (rel < 0.45) & (depth > 15)
    cortex = mask & (rel > 0.5) & (rel < 0.8) & (depth < 12)
    d_vent = ndi.distance_transform_edt(~vent, sampling=zooms) if vent.any() else np.full(mask.shape, np.inf)
    d_ctx = ndi.distance_transform_edt(~cortex, sampling=zooms) if cortex.any() else np.full(mask.shape, np.inf)
    sites = {
        "deep_wm": wm & (d_vent > 8) & (d_ctx > 8),
        "periventricular": wm & (d_vent <= 6),
        "juxtacortical": wm & (d_ctx <= 3),
    }
    fallback = {"deep_wm": wm & (depth > 25), "periventricular": wm & (depth > 30),
                "juxtacortical": wm & (depth < 15)}
    for k, v in sites.items():
        if v.sum() < 20:
            sites[k] = fallback[k] if fallback[k].sum() >= 20 else (wm if wm.any() else mask)
    return sites


def lesion_alpha(shape, centre_vox, radius_mm: float, zooms, kind: str, rng, edge_mm: float = 1.5) -> np.ndarray:
    """Soft lesion occupancy in [0, 1] on a box of ``shape``: an ellipsoid (axes 0.6-1.0 x
    ``radius_mm``, random orientation) or a multi-lobed shape (2-4 overlapping ellipsoids,
    outline warped by smooth noise)."""
    zooms = np.asarray(zooms, dtype=np.float32)
    grids = np.meshgrid(*[(np.arange(s, dtype=np.float32) - c) * z for s, c, z in zip(shape, centre_vox, zooms)],
                        indexing="ij")
    pts = np.stack(grids, -1)  # mm from the centre
    if kind == "ellipsoid":
        lobes = [(np.zeros(3), radius_mm * rng.uniform(0.6, 1.0, 3))]
        warp_amp = 0.05
    elif kind == "lobed":
        k = int(rng.integers(2, 5))
        lobes = [(np.zeros(3), radius_mm * rng.uniform(0.55, 0.8, 3))]
        for _ in range(k - 1):
            d = rng.standard_normal(3)
            d = d / np.linalg.norm(d) * radius_mm * rng.uniform(0.35, 0.6)
            lobes.append((d, radius_mm * rng.uniform(0.3, 0.55, 3)))
        warp_amp = 0.25
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {kind!r}")
    # signed distance proxy: the smallest normalised radius over lobes (< 1 inside)
    rho = np.full(shape, np.inf, np.float32)
    for off, semi in lobes:
        p = (pts - off.astype(np.float32)) @ _random_rotation(rng).T.astype(np.float32)
        rho = np.minimum(rho, np.sqrt(((p / semi.astype(np.float32)) ** 2).sum(-1)))
    rho = rho * (1.0 + warp_amp * _smooth_noise(rng, shape, max(1.0, radius_mm / 3 / float(zooms.mean()))))
    return np.clip((1.0 - rho) * radius_mm / max(edge_mm, 1e-3) + 0.5, 0.0, 1.0).astype(np.float32)


def lesion_box(mask: np.ndarray, centre_vox, radius_mm: float, zooms, kind: str, rng):
    """``(box, alpha)``: the slices around one lesion centred at ``centre_vox`` (voxel) with room
    for its shape, and its occupancy there (:func:`lesion_alpha`) inside ``mask``. Paint with
    ``image[box] = image[box] * (1 - alpha) + level * alpha``; the lesion is ``alpha >= 0.5``."""
    zooms = np.asarray(zooms, dtype=float)
    centre = np.asarray(centre_vox, dtype=float)
    pad = np.ceil(radius_mm * 1.6 / zooms).astype(int) + 2
    lo = np.maximum(centre.astype(int) - pad, 0)
    hi = np.minimum(centre.astype(int) + pad + 1, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    return box, lesion_alpha(tuple(hi - lo), centre - lo, radius_mm, zooms, kind, rng) * mask[box]


def brain_bias_field(image: np.ndarray, brain_mask: np.ndarray, zooms) -> np.ndarray:
    """The scan's multiplicative bias field inside its brain (N4 in the mask, volseg's NumPy N4
    with default settings; float32, 1 outside the mask): ``image / field`` is the corrected brain
    into which :func:`insert_family` paints."""
    from volseg.transforms.n4 import n4_log_field_numpy

    mask = np.asarray(brain_mask) > 0
    log_field, _ = n4_log_field_numpy(np.where(mask, image, 0).astype(np.float32), zooms, mask=mask)
    return np.where(mask, np.exp(log_field), 1.0).astype(np.float32)


def insert_family(image: np.ndarray, brain_mask: np.ndarray, zooms, family: str, rng: np.random.Generator,
                  sites: dict | None = None, texture: float = 0.05, wm_level: float | None = None,
                  field: np.ndarray | None = None):
    """Paint one case of ``family``: three lesions (small, medium, large), one per site.

    ``field``: the scan's bias field (:func:`brain_bias_field`); the lesions are then painted into
    ``image / field`` (levels relative to its white matter; ``sites`` and ``wm_level`` refer to it)
    and the result is multiplied by ``field`` again, so each lesion has its family's contrast to
    the tissue around it. Returns (image, lesion mask (bool: occupancy >= 0.5, inside the brain),
    per-lesion params).
    """
    from volseg.anomaly.prep import wm_peak

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")
    zooms = np.asarray(zooms, dtype=float)
    mask = np.asarray(brain_mask) > 0
    out = np.asarray(image, dtype=np.float32).copy()
    if field is not None:
        out = np.where(mask, out / np.asarray(field, np.float32), out).astype(np.float32)
    wm = float(wm_level) if wm_level is not None else wm_peak(out[mask])
    sites = sites if sites is not None else tissue_sites(out, mask, zooms)
    truth = np.zeros(mask.shape, bool)
    order = rng.permutation(len(SITES))
    placed: list[tuple[np.ndarray, float]] = []
    params = []
    for band, si in zip(SIZE_BANDS_MM, order):
        site = SITES[int(si)]
        radius = float(np.exp(rng.uniform(np.log(band[0]), np.log(band[1]))))
        cand = np.argwhere(sites[site])
        for _ in range(100):
            centre = cand[int(rng.integers(len(cand)))].astype(float)
            if all(np.linalg.norm(centre * zooms - c) > r + radius + 3.0 for c, r in placed):
                break
        placed.append((centre * zooms, radius))
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        box, alpha = lesion_box(mask, centre, radius, zooms, kind, rng)
        level = wm * rng.uniform(*FAMILIES[family])
        tex = level * (1.0 + texture * _smooth_noise(rng, alpha.shape, 1.0 / float(zooms.mean())))
        out[box] = out[box] * (1 - alpha) + tex * alpha
        truth[box] |= alpha >= 0.5
        params.append({"site": site, "shape": kind, "radius_mm": round(radius, 2), "level_x_wm": round(level / wm, 3),
                       "centre_vox": [int(c) for c in centre], "voxels": int((alpha >= 0.5).sum())})
    if field is not None:
        out = np.where(mask, out * np.asarray(field, np.float32), out).astype(np.float32)
    return out, truth & mask, params


__all__ = ["FAMILIES", "SITES", "SHAPES", "SIZE_BANDS_MM", "tissue_sites", "lesion_alpha", "lesion_box", "insert_family",
           "brain_bias_field"]
