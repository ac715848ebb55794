"""The MNI152 2009 template on the synthesiser's model grid, and smooth random fields.

The model grid is 1 mm, RAS, in MNI millimetres, and wider than the template so that it
holds the scalp, the face and the neck that the synthesiser paints around the brain. The
template and everything derived from it (distance from the brain, a temporal-muscle map,
boundary points) is computed once per process and cached.

Smooth random fields (bias, thickness, elastic displacement, texture) are cubic B-splines
evaluated as a tensor product: three small matrix products instead of a 3D spline zoom,
which keeps a full-grid field at a few tens of milliseconds.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

# Model grid: 1 mm RAS voxels covering MNI x -112..112, y -145..115, z -165..120.
MODEL_MIN = np.array([-112.0, -145.0, -165.0])
MODEL_SHAPE = (225, 261, 286)
# Distance look-up tables have this many bins per millimetre, up to LUT_MM.
LUT_PER_MM = 4
LUT_MM = 48
LUT_LEN = LUT_PER_MM * LUT_MM
# Temporal-muscle weight is quantised to this many levels (rows of the layer table).
TEMPORAL_LEVELS = 8


@dataclass(frozen=True)
class Atlas:
    """Template-derived arrays on the model grid (read-only; shared by every subject)."""

    box: tuple[slice, slice, slice]  # brain bounding box in the model grid
    t1: np.ndarray  # float32, box, template T1 scaled so that white matter is 1
    gm: np.ndarray  # float32, box
    wm: np.ndarray  # float32, box
    brain_box: np.ndarray  # bool, box
    depth_in: np.ndarray  # float32, box: mm from a brain voxel to the mask's edge
    mask: np.ndarray  # float32 0/1, full grid
    dist: np.ndarray  # float32, full grid: mm from the brain mask (0 inside)
    temporal_level: np.ndarray  # uint8, full grid: 0 .. TEMPORAL_LEVELS-1
    lut_row: np.ndarray  # int16, full grid: temporal_level * LUT_LEN
    boundary_points: np.ndarray  # (N, 3) MNI mm points on the brain mask's edge
    cord_top: tuple[float, float, float]  # MNI mm centre of the lowest brainstem slice

    @property
    def affine(self) -> np.ndarray:
        """Model index -> MNI mm."""
        aff = np.eye(4)
        aff[:3, 3] = MODEL_MIN
        return aff

    @property
    def shape(self) -> tuple[int, int, int]:
        return MODEL_SHAPE


def _template_arrays() -> dict[str, np.ndarray]:
    """The four nilearn MNI152 2009 volumes (shipped with nilearn; no download).

    Not cached itself: :func:`load_atlas` keeps what it needs (cropped to the brain).
    """
    from nilearn import datasets

    loaders = {
        "t1": datasets.load_mni152_template,
        "mask": datasets.load_mni152_brain_mask,
        "gm": datasets.load_mni152_gm_template,
        "wm": datasets.load_mni152_wm_template,
    }
    out = {}
    affine = None
    for key, load in loaders.items():
        img = load(resolution=1)
        if affine is None:
            affine = np.asarray(img.affine)
        elif not np.allclose(img.affine, affine):
            raise ValueError(f"nilearn MNI152 {key} template is not on the T1 template's grid")
        out[key] = np.asarray(img.get_fdata(dtype=np.float32))
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise ValueError(f"nilearn MNI152 template is not 1 mm RAS (affine {affine.tolist()})")
    out["origin"] = affine[:3, 3]
    return out


@functools.lru_cache(maxsize=1)
def load_atlas() -> Atlas:
    """Build (once per process) the model-grid arrays from nilearn's MNI152 template."""
    from scipy import ndimage as ndi

    tpl = _template_arrays()
    offset = np.round(tpl["origin"] - MODEL_MIN).astype(int)
    tshape = tpl["t1"].shape
    if np.any(offset < 0) or np.any(offset + tshape > np.array(MODEL_SHAPE)):
        raise ValueError(f"MNI152 template (origin {tpl['origin']}) does not fit the model grid")
    place = tuple(slice(o, o + n) for o, n in zip(offset, tshape))

    mask = np.zeros(MODEL_SHAPE, dtype=np.float32)
    mask[place] = tpl["mask"] > 0.5
    idx = np.argwhere(mask)
    # Brain box with a small margin, kept inside the template's placement.
    lo = np.maximum(idx.min(axis=0) - 4, offset)
    hi = np.minimum(idx.max(axis=0) + 5, offset + tshape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    inner = tuple(slice(b.start - p.start, b.stop - p.start) for b, p in zip(box, place))
    brain_box = mask[box].astype(bool)

    t1 = tpl["t1"][inner] * brain_box
    gm = tpl["gm"][inner] * brain_box
    wm = tpl["wm"][inner] * brain_box
    t1 = (t1 / float(np.median(t1[wm > 0.9]))).astype(np.float32)

    dist = ndi.distance_transform_edt(mask == 0).astype(np.float32)
    depth_in = ndi.distance_transform_edt(brain_box).astype(np.float32)

    # Temporalis muscle: thick over the lateral skull between the ear and the temple.
    xs, ys, zs = (MODEL_MIN[i] + np.arange(MODEL_SHAPE[i]) for i in range(3))
    fx = 1.0 / (1.0 + np.exp(-(np.abs(xs) - 45.0) / 6.0))
    fy = np.exp(-((ys + 5.0) ** 2) / (2 * 35.0**2))
    fz = np.exp(-((zs + 10.0) ** 2) / (2 * 20.0**2))
    weight = fx[:, None, None] * fy[None, :, None] * fz[None, None, :]
    level = np.round(weight * (TEMPORAL_LEVELS - 1)).astype(np.uint8)
    lut_row = level.astype(np.int16) * np.int16(LUT_LEN)

    edge = brain_box & ~ndi.binary_erosion(brain_box)
    pts = np.argwhere(edge)[::7] + lo
    boundary_points = pts + MODEL_MIN

    bottom = int(idx[:, 2].min())
    low = idx[idx[:, 2] <= bottom + 3]
    cord_top = tuple(float(v) for v in low.mean(axis=0) + MODEL_MIN)

    # Shared by every subject: locked, except the mask, which torch wraps without a copy
    # (torch warns about read-only arrays); nothing writes to it.
    for arr in (t1, gm, wm, depth_in, dist, level, lut_row, brain_box):
        arr.setflags(write=False)
    return Atlas(
        box=box, t1=t1, gm=gm, wm=wm, brain_box=brain_box,
        depth_in=depth_in, mask=mask, dist=dist, temporal_level=level, lut_row=lut_row,
        boundary_points=boundary_points, cord_top=cord_top,
    )


def box_of(lo_mm, hi_mm) -> tuple[tuple[slice, slice, slice], list[np.ndarray]]:
    """Model-grid slices of an MNI mm box, and the MNI coordinates along each of its axes."""
    lo = np.clip(np.floor(np.asarray(lo_mm) - MODEL_MIN).astype(int), 0, MODEL_SHAPE)
    hi = np.clip(np.ceil(np.asarray(hi_mm) - MODEL_MIN).astype(int) + 1, 0, MODEL_SHAPE)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    axes = [(MODEL_MIN[i] + np.arange(lo[i], hi[i])).astype(np.float32) for i in range(3)]
    return sl, axes


# --- smooth random fields -----------------------------------------------------------------


def bspline_weights(positions: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Cubic B-spline weights of control points every ``spacing`` at ``positions``.

    Returns ``(weights, knots)``: weights is (len(positions), n_knots) float32 with rows that
    sum to one, knots the control point positions (same units as ``positions``). Uniform cubic
    B-splines reproduce linear functions, so coefficients ``a * knots + b`` evaluate exactly
    to ``a * positions + b``.
    """
    t = np.asarray(positions, dtype=np.float64) / spacing
    k = np.arange(int(np.floor(t.min())) - 1, int(np.floor(t.max())) + 3)
    u = np.abs(t[:, None] - k[None, :])
    w = np.where(u < 1.0, (4.0 - 6.0 * u**2 + 3.0 * u**3) / 6.0,
                 np.where(u < 2.0, (2.0 - u) ** 3 / 6.0, 0.0))
    return w.astype(np.float32), (k * spacing).astype(np.float64)


def tensor_eval(coef: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """Evaluate a 3D tensor-product spline: coef (n0, n1, n2[, C]) -> (N0, N1, N2[, C]) float32.

    Trailing channels come out interleaved (the layout ``torch.grid_sample`` wants).
    """
    w0, w1, w2 = weights
    coef = np.asarray(coef, dtype=np.float32)
    chans = coef.shape[3:]
    n0, n1, n2 = coef.shape[:3]
    c = int(np.prod(chans)) if chans else 1
    x = coef.reshape(n0, n1, n2, c).transpose(0, 1, 3, 2) @ w2.T  # (n0, n1, c, N2)
    x = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).reshape(n0, n1, -1)  # (n0, n1, N2*c)
    x = np.matmul(w1, x)  # (n0, N1, N2*c)
    out = w0 @ x.reshape(n0, -1)
    return out.reshape((w0.shape[0], w1.shape[0], w2.shape[0]) + chans)


def field_gain(weights: list[np.ndarray]) -> float:
    """Standard deviation of a spline field whose coefficients are unit white noise."""
    return float(np.sqrt(np.prod([np.mean(np.sum(w.astype(np.float64) ** 2, axis=1))
                                  for w in weights])))


def random_field(rng: np.random.Generator, shape, spacing: float, std: float = 1.0,
                 mean: float = 0.0) -> np.ndarray:
    """Smooth Gaussian random field on a grid of ``shape`` (control points every ``spacing``)."""
    weights = [bspline_weights(np.arange(n), spacing)[0] for n in shape]
    coef = rng.standard_normal([w.shape[1] for w in weights]) * (std / field_gain(weights))
    return tensor_eval(coef + mean, weights)
