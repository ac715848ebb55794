"""Geometric building blocks of the synthetic head: model-grid boxes, ellipsoids and a smooth
maximum to join shapes."""

from __future__ import annotations

import numpy as np

from volseg.synth.atlas import box_of

# Shapes (neck, face parts, head) are joined with a smooth maximum over this many mm.
BLEND_MM = 10.0
FAR = np.float32(-1e4)  # "depth" far outside every shape



class Box:
    """A model-grid box: its slices and its voxels' MNI coordinates as broadcastable axes."""

    def __init__(self, lo_mm, hi_mm):
        self.sl, axes = box_of(lo_mm, hi_mm)
        self.x = axes[0][:, None, None]
        self.y = axes[1][None, :, None]
        self.z = axes[2][None, None, :]
        self.shape = tuple(len(a) for a in axes)

    def sub(self, lo_mm, hi_mm) -> tuple["Box", tuple[slice, ...]]:
        """A box inside this one, with its slices relative to this box."""
        lo = np.maximum(lo_mm, [self.x.min(), self.y.min(), self.z.min()])
        hi = np.minimum(hi_mm, [self.x.max(), self.y.max(), self.z.max()])
        child = Box(lo, np.maximum(hi, lo))
        local = tuple(slice(c.start - p.start, c.start - p.start + n)
                      for c, p, n in zip(child.sl, self.sl, child.shape))
        return child, local


def uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def radius(box: Box, centre, semi) -> np.ndarray:
    """Normalised radius (1 on the surface) of an axis-aligned ellipsoid, over a box."""
    return np.sqrt(((box.x - centre[0]) / semi[0]) ** 2 + ((box.y - centre[1]) / semi[1]) ** 2
                   + ((box.z - centre[2]) / semi[2]) ** 2)


def smax(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth maximum (polynomial, blending over ``k``): fills the crease where shapes meet."""
    h = np.clip(0.5 + 0.5 / k * (a - b), 0.0, 1.0)
    return b + (a - b) * h + k * h * (1.0 - h)


def ellipsoid(box: Box, centre, semi, pad: float = 1.0):
    """Slices (relative to ``box``) of the sub-box around an ellipsoid, that sub-box, and the
    ellipsoid's normalised radius there."""
    child, local = box.sub(np.subtract(centre, semi) - pad, np.add(centre, semi) + pad)
    return local, child, radius(child, centre, semi)
