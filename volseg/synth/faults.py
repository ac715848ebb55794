"""Deliberately bad versions of a good scan, to check that self-QC notices them.

Each function takes a native volume (and its affine, and the brain mask where it needs one)
and returns the faulty version; nothing here reads or writes files. Used by
``scripts/bench_selfqc.py`` and ``tests/test_selfqc.py`` (see :mod:`volseg.cohort.selfqc`).

- :func:`cut_fov`: the field of view ends inside the brain (array and affine cropped together);
- :func:`add_rician_noise`: magnitude of complex Gaussian noise added to the image;
- :func:`apply_bias_field`: a smooth multiplicative field (to be run without N4);
- :func:`invert_contrast`: ``max - x`` inside the head (another contrast, or a bad conversion);
- :func:`mislabel_orientation`: the data flipped or two axes swapped, the affine left alone;
- :func:`shift_mask_edge`: a mask eroded (negative mm) or grown (positive mm).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def world_axis(affine, which: str) -> int:
    """The voxel axis that runs most nearly along world axis ``which`` (``"x"``: left-right,
    ``"y"``: posterior-anterior, ``"z"``: inferior-superior)."""
    col = "xyz".index(which)
    a = np.asarray(affine, float)[:3, :3]
    return int(np.argmax(np.abs(a[col]) / np.linalg.norm(a, axis=0)))


def cut_fov(image, affine, mask, which: str = "z", fraction: float = 0.3, top: bool = True):
    """Crop ``image`` along the voxel axis nearest world axis ``which`` so that ``fraction`` of
    the brain's extent along it falls outside the field of view, on the world-positive side
    (superior, anterior, right) with ``top``, else the negative side. Returns
    ``(image, affine, mask)`` cropped alike; the affine keeps every voxel's world position."""
    ax = world_axis(affine, which)
    idx = np.nonzero(np.asarray(mask).any(axis=tuple(i for i in range(3) if i != ax)))[0]
    lo, hi = int(idx.min()), int(idx.max())
    cut = round(fraction * (hi - lo + 1))
    positive = float(np.asarray(affine, float)[("xyz".index(which)), ax]) > 0  # index grows towards +world
    keep_high_end = top != positive  # cropping away the world-positive side means the high indices when positive
    n = image.shape[ax]
    start, stop = (lo + cut, n) if keep_high_end else (0, hi + 1 - cut)
    sl = [slice(None)] * 3
    sl[ax] = slice(start, stop)
    new_aff = np.asarray(affine, float).copy()
    new_aff[:3, 3] = new_aff[:3, :3] @ np.eye(3)[ax] * start + new_aff[:3, 3]
    return image[tuple(sl)].copy(), new_aff, np.asarray(mask)[tuple(sl)].copy()


def add_rician_noise(image, sigma: float, seed: int = 0):
    """``|image + n1 + i n2|`` with ``n1, n2 ~ N(0, sigma)``: what a magnitude image with more
    thermal noise would look like (the air becomes Rayleigh, tissue Rician)."""
    rng = np.random.default_rng(seed)
    x = np.asarray(image, np.float32)
    real = x + rng.normal(0.0, sigma, x.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, x.shape).astype(np.float32)
    return np.hypot(real, imag)


def bias_field(shape, affine, ratio: float = 1.6, seed: int = 0, mask=None) -> np.ndarray:
    """A smooth field ``exp(g)``, ``g`` a random quadratic in world coordinates, scaled so that
    over ``mask`` (default: the whole volume) its largest value is ``ratio`` times its
    smallest (1.6: a strong field, as an uncorrected 3 T head coil gives)."""
    rng = np.random.default_rng(seed)
    a = np.asarray(affine, float)[:3, :3]
    axes = [np.arange(n, dtype=np.float32).reshape([-1 if i == k else 1 for i in range(3)])
            for k, n in enumerate(shape)]
    xyz = [sum(axes[k] * np.float32(a[c, k]) for k in range(3)) for c in range(3)]  # world mm, broadcast
    sel = np.ones(shape, bool) if mask is None else np.asarray(mask, bool)
    xyz = [np.broadcast_to(w, shape) for w in xyz]
    scale = max(max(float(np.ptp(w[sel])) for w in xyz), 1e-6)
    xyz = [(w - float(w[sel].mean())) / scale for w in xyz]
    d = rng.normal(size=3)
    d = d / np.linalg.norm(d)
    curve = 0.5 * rng.normal()
    g = sum(np.float32(d[c]) * xyz[c] + np.float32(curve) * xyz[c] ** 2 for c in range(3))
    lo, hi = float(g[sel].min()), float(g[sel].max())
    g = (g - (lo + hi) / 2) / max(hi - lo, 1e-6) * np.log(ratio)
    return np.exp(g).astype(np.float32)


def apply_bias_field(image, affine, ratio: float = 1.6, seed: int = 0, mask=None):
    """``image`` times :func:`bias_field`."""
    return np.asarray(image, np.float32) * bias_field(image.shape, affine, ratio, seed, mask)


def invert_contrast(image, brain=None):
    """``max - x`` inside the head, the air left as it was: dark tissue becomes bright, as in a
    T2 or an inverted export. The head: the Otsu head mask filled slice by slice, joined with
    ``brain`` when given; max: its 99.9th percentile."""
    from volseg.transforms.functional import head_mask

    x = np.asarray(image, np.float32)
    head = head_mask(x, fill_slices=True)
    if brain is not None:
        head |= np.asarray(brain, bool)
    top = float(np.percentile(x[head], 99.9))
    return np.where(head, np.clip(top - x, 0, None), x).astype(np.float32)


def mislabel_orientation(image, affine, kind: str = "flip-z", mask=None):
    """The data rearranged while the affine stays: ``"flip-z"`` (head-foot axis reversed),
    ``"flip-y"`` (front-back), ``"flip-x"`` (left-right; invisible to anatomy), ``"swap-yz"``
    (the front-back and head-foot data axes exchanged). Returns ``(image, mask)`` (mask None
    when not given)."""
    if kind.startswith("flip-"):
        ax = world_axis(affine, kind[-1])
        fn = lambda a: None if a is None else np.flip(np.asarray(a), ax).copy()
    elif kind == "swap-yz":
        ay, az = world_axis(affine, "y"), world_axis(affine, "z")
        fn = lambda a: None if a is None else np.swapaxes(np.asarray(a), ay, az).copy()
    else:
        raise ValueError(f"mislabel_orientation: unknown kind {kind!r}; use flip-x, flip-y, flip-z or swap-yz")
    return fn(image), fn(mask)


def shift_mask_edge(mask, zooms, mm: float) -> np.ndarray:
    """The mask grown (``mm`` > 0) or eroded (``mm`` < 0) by ``|mm|`` millimetres (uint8)."""
    m = np.asarray(mask, bool)
    z = [float(v) for v in zooms]
    if mm >= 0:
        return (ndi.distance_transform_edt(~m, sampling=z) <= mm).astype(np.uint8)
    return (ndi.distance_transform_edt(m, sampling=z) > -mm).astype(np.uint8)


__all__ = [
    "add_rician_noise",
    "apply_bias_field",
    "bias_field",
    "cut_fov",
    "invert_contrast",
    "mislabel_orientation",
    "shift_mask_edge",
    "world_axis",
]
