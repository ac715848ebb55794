"""MONAI array transforms: N4 bias correction, the head-centred 2 mm grid, normalisation.

Each validates its parameters and delegates the maths to ``functional.py``. Inputs are
channel-first MetaTensors (``C, X, Y, Z``) carrying the scan's affine.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, SpatialResample, Transform

from volseg.io import grid_box_in_native, head_grid_affine, world_bbox
from volseg.transforms import functional as F

GRID_KEY = "volseg_grid"
N4_KEY = "volseg_n4"


def _affine_of(img) -> np.ndarray:
    if isinstance(img, MetaTensor):
        return np.asarray(img.affine, dtype=float)
    raise TypeError("volseg transforms need a monai.data.MetaTensor carrying the scan's affine")


def _zooms(affine: np.ndarray):
    return tuple(float(z) for z in np.linalg.norm(affine[:3, :3], axis=0))


class N4BiasField(Transform):
    """N4 bias-field correction of a channel-first volume (not invertible: an intensity step).

    Args:
        backend: ``"numpy"`` (:mod:`volseg.transforms.n4`, ITK's algorithm with separable
            B-spline fits), ``"simpleitk"``, ``"ants"`` (nipype + ANTs binary on PATH) or ``"none"``.
        shrink: explicit per-axis shrink factors, or ``None`` to pick them from the voxel size
            so that shrunk voxels are about ``shrink_target_mm``.
        iterations, convergence, bspline_spacing_mm, bspline_order: N4's fitting settings.
        mask: ``"otsu"`` head mask or ``"none"``.

    The estimate (shrink, iterations, time) is stored in ``img.meta["volseg_n4"]``; the
    log field is kept in ``self.last_log_field`` for tests and QC.

    Examples::

        >>> n4 = N4BiasField(shrink=(4, 4, 4), iterations=(20, 20))
        >>> corrected = n4(MetaTensor(volume[None], affine=affine))
    """

    backend_choices = ("numpy", "simpleitk", "ants", "none")

    def __init__(self, backend: str = "numpy", shrink=None, shrink_target_mm: float = 4.0,
                 iterations=(50, 50, 50, 50), convergence: float = 0.001,
                 bspline_spacing_mm: float = 200.0, bspline_order: int = 3, mask: str = "otsu"):
        if backend not in self.backend_choices:
            raise ValueError(f"N4 backend must be one of {self.backend_choices}, got {backend!r}")
        if backend == "ants" and not F.ants_available():
            raise RuntimeError("N4 backend 'ants' needs N4BiasFieldCorrection (ANTs) on PATH")
        if shrink is not None and (len(shrink) != 3 or min(shrink) < 1):
            raise ValueError(f"shrink must be three factors >= 1, got {shrink!r}")
        if not iterations or min(iterations) < 1:
            raise ValueError(f"iterations must be positive counts per level, got {iterations!r}")
        if backend == "numpy" and int(bspline_order) != 3:
            raise ValueError(f"the numpy N4 backend fits cubic B-splines only (bspline_order 3), got {bspline_order}")
        if mask not in ("otsu", "none"):
            raise ValueError(f"mask must be 'otsu' or 'none', got {mask!r}")
        self.backend = backend
        self.shrink = tuple(shrink) if shrink is not None else None
        self.shrink_target_mm = float(shrink_target_mm)
        self.iterations = tuple(int(i) for i in iterations)
        self.convergence = float(convergence)
        self.bspline_spacing_mm = float(bspline_spacing_mm)
        self.bspline_order = int(bspline_order)
        self.mask = mask
        self.last_log_field: np.ndarray | None = None

    def __call__(self, img: MetaTensor) -> MetaTensor:
        affine = _affine_of(img)
        data = img[0].detach().cpu().numpy().astype(np.float32)
        if self.backend == "none":
            self.last_log_field = np.zeros_like(data)
            img.meta[N4_KEY] = {"backend": "none"}
            return img
        mask = None if self.mask == "otsu" else np.ones(data.shape, bool)
        kwargs = dict(shrink=self.shrink, shrink_target_mm=self.shrink_target_mm,
                      iterations=self.iterations, convergence=self.convergence,
                      bspline_spacing_mm=self.bspline_spacing_mm)
        if self.backend == "ants":
            log_field, info = F.n4_log_field_ants(data, affine, _zooms(affine), mask=mask, **kwargs)
        else:
            from volseg.transforms.n4 import n4_log_field_in_process

            log_field, info = n4_log_field_in_process(self.backend, data, _zooms(affine), mask=mask,
                                                      bspline_order=self.bspline_order, **kwargs)
        self.last_log_field = log_field
        corrected = data / np.exp(log_field)
        out = img.clone()
        out[0] = torch.as_tensor(corrected, dtype=out.dtype)
        out.meta[N4_KEY] = info
        return out


class HeadGrid(InvertibleTransform):
    """Resample onto a RAS-aligned ``size`` grid at ``spacing_mm``, centred on the head.

    One resampling takes the scan from its native grid (any orientation, oblique, any voxel
    size) to the working grid; the head is found by an Otsu mask (or ``mask`` given to
    :meth:`compute_grid`). The inverse, through MONAI's ``SpatialResample`` trace, takes any
    prediction on the working grid back to the native grid, so ``monai.transforms.Invertd``
    works on a Compose containing this transform. The grid affine and where the box lies in
    native voxel indices are recorded in ``meta["volseg_grid"]``.

    Examples::

        >>> grid = HeadGrid(spacing_mm=2.0, size=(96, 128, 160))
        >>> on_grid = grid(MetaTensor(volume[None], affine=affine))   # (1, 96, 128, 160)
        >>> back = grid.inverse(prediction_on_grid)                   # native shape and affine
    """

    def __init__(self, spacing_mm: float = 2.0, size=(96, 128, 160), top_margin_mm: float = 10.0,
                 mode: str = "bilinear", padding_mode: str = "zeros"):
        if spacing_mm <= 0:
            raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"size must be three positive integers, got {size!r}")
        self.spacing_mm = float(spacing_mm)
        self.size = tuple(int(s) for s in size)
        self.top_margin_mm = float(top_margin_mm)
        self.mode = mode
        self.padding_mode = padding_mode
        self.resampler = SpatialResample(mode=mode, padding_mode=padding_mode, dtype=torch.float32)

    def compute_grid(self, img: MetaTensor, mask: np.ndarray | None = None) -> np.ndarray:
        """The working-grid affine for ``img`` (head-centred)."""
        affine = _affine_of(img)
        step = 1
        if mask is None:
            data = img[0].detach().cpu().numpy()
            step = max(1, int(round(3.0 / min(_zooms(affine)))))
            mask = F.head_mask(data, step=step)
        sub_affine = affine.copy()
        sub_affine[:3, :3] = affine[:3, :3] * step
        lo, hi = world_bbox(sub_affine, mask)
        half = np.abs(affine[:3, :3]).sum(axis=1) * step / 2.0  # voxel extent in world
        return head_grid_affine(lo - half, hi + half, self.spacing_mm, self.size, self.top_margin_mm)

    def __call__(self, img: MetaTensor, grid_affine: np.ndarray | None = None,
                 mode: str | None = None) -> MetaTensor:
        native_affine = _affine_of(img)
        native_shape = tuple(img.shape[1:])
        if grid_affine is None:
            grid_affine = self.compute_grid(img)
        out = self.resampler(img, dst_affine=torch.as_tensor(grid_affine, dtype=torch.float64),
                             spatial_size=self.size, mode=mode or self.mode)
        out.meta[GRID_KEY] = grid_box_in_native(native_affine, native_shape, grid_affine, self.size)
        return out

    def inverse(self, data: MetaTensor) -> MetaTensor:
        out = self.resampler.inverse(data)
        out.meta.pop(GRID_KEY, None)
        return out


class NormalizeHead(Transform):
    """Robust intensity normalisation inside an Otsu head mask (not invertible)."""

    def __init__(self, method: str = "percentile", lower_percentile: float = 0.5,
                 upper_percentile: float = 99.5, clip=(0.0, 1.5)):
        if method not in ("percentile", "zscore"):
            raise ValueError(f"method must be 'percentile' or 'zscore', got {method!r}")
        if not 0 <= lower_percentile < upper_percentile <= 100:
            raise ValueError("need 0 <= lower_percentile < upper_percentile <= 100")
        self.method = method
        self.lower = float(lower_percentile)
        self.upper = float(upper_percentile)
        self.clip = tuple(clip) if clip is not None else None

    def __call__(self, img: MetaTensor) -> MetaTensor:
        data = img[0].detach().cpu().numpy()
        mask = F.head_mask(data)
        out = img.clone()
        out[0] = torch.as_tensor(
            F.normalize_intensity(data, mask, self.method, self.lower, self.upper, self.clip)
        )
        return out
