"""How sure the strip network was of a mask, from its working-grid probabilities.

Two numbers, both on the 2 mm working grid (so they do not depend on the input's voxel size):

- ``tta_dice``: Dice between the mask of the image (``p > threshold``) and the mask of its
  left-right mirror image, mirrored back. A network that has learnt a brain gives nearly the
  same mask both ways; on an image unlike anything it was trained on (another contrast, an
  upside-down head, heavy noise) the two disagree.
- ``boundary_uncertainty``: grid voxels whose probability lies between 0.1 and 0.9, per
  surface voxel of the mask. A confident network switches from 0 to 1 within about one voxel
  (values near 1); a doubtful one spreads the switch over several.

:func:`volseg.cohort.selfqc.self_qc` sets the thresholds and names the reasons.
"""

from __future__ import annotations

import numpy as np

# probabilities strictly between these count as undecided
UNDECIDED = (0.1, 0.9)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary arrays (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def surface_voxels(mask: np.ndarray) -> int:
    """Voxels of ``mask`` with a face-neighbour outside it (the volume's edge counts as outside)."""
    from scipy import ndimage as ndi

    mask = np.asarray(mask, bool)
    inner = ndi.binary_erosion(mask, border_value=0)
    return int(mask.sum() - inner.sum())


def prediction_measures(prob, prob_flip=None, threshold: float = 0.5) -> dict:
    """``{"tta_dice", "boundary_uncertainty"}`` of a working-grid probability ``prob`` (3D, or
    a channel-first 4D array / tensor) and the probability of its left-right mirrored pass,
    mirrored back (``prob_flip``; None leaves ``tta_dice`` None)."""
    p = _as3d(prob)
    fg = p > threshold
    n_surface = surface_voxels(fg)
    lo, hi = UNDECIDED
    undecided = int(np.count_nonzero((p > lo) & (p < hi)))
    out = {"tta_dice": None,
           "boundary_uncertainty": None if n_surface == 0 else round(undecided / n_surface, 4)}
    if prob_flip is not None:
        out["tta_dice"] = round(dice(fg, _as3d(prob_flip) > threshold), 5)
    return out


def _as3d(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    a = np.asarray(a, dtype=np.float32)
    while a.ndim > 3:
        a = a[0]
    return a


__all__ = ["UNDECIDED", "dice", "prediction_measures", "surface_voxels"]
