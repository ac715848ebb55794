"""Normative residuals: how large the residual of *healthy* brains is at each template location.

Some places are always hard to reconstruct (the cortical ribbon, CSF borders, the cerebellum), so a
raw residual lights them up in every brain. With ``maps.normative`` on, the map is instead
``max(r - mean(loc), 0) / std(loc)``: the residual ``r`` in units of the healthy spread at that
location. ``mean`` and ``std`` live on nilearn's MNI152 2009 brain (on its working grid, shipped
in the model folder as ``normative.npz``); an affine registration (:mod:`volseg.transforms.register`)
brings them onto each scan's working grid. They are estimated by ``volseg calibrate`` from the
healthy calibration brains (never from training brains, whose residuals are too small), smoothed
by ``maps.normative_sigma_mm``, with a floor of half the median spread so that no location is
divided by almost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi


NORMATIVE_FILE = "normative.npz"


@dataclass
class Normative:
    template: np.ndarray  # MNI152 brain, white-matter scaled, on its working grid
    template_mask: np.ndarray
    mean: np.ndarray  # healthy residual mean per template voxel
    std: np.ndarray  # healthy residual spread per template voxel (smoothed, floored)
    spacing_mm: float = 2.0
    brains: int = 0

    def transform(self, fixed: np.ndarray, fixed_mask: np.ndarray):
        from volseg.transforms.register import register_affine

        return register_affine(fixed, self.template, self.spacing_mm, fixed_mask=fixed_mask)

    def on(self, fixed: np.ndarray, fixed_mask: np.ndarray, transform=None) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) on a scan's working grid."""
        from volseg.transforms.register import warp

        tr = transform if transform is not None else self.transform(fixed, fixed_mask)
        floor = float(np.median(self.std[self.template_mask])) if self.template_mask.any() else 1.0
        m = warp(self.mean, tr, fixed.shape, self.spacing_mm, default=0.0)
        s = warp(self.std, tr, fixed.shape, self.spacing_mm, default=floor)
        return m, np.maximum(s, 1e-3)

    def save(self, dest_dir) -> Path:
        dest = Path(dest_dir) / NORMATIVE_FILE
        tmp = dest.with_name(".normative.tmp.npz")
        np.savez_compressed(tmp, template=self.template.astype(np.float16), template_mask=self.template_mask,
                            mean=self.mean.astype(np.float16), std=self.std.astype(np.float16),
                            spacing_mm=np.float32(self.spacing_mm), brains=np.int32(self.brains))
        tmp.replace(dest)
        return dest

    @classmethod
    def load(cls, model_dir) -> "Normative | None":
        path = Path(model_dir) / NORMATIVE_FILE
        if not path.exists():
            return None
        with np.load(path) as z:
            return cls(template=z["template"].astype(np.float32), template_mask=z["template_mask"].astype(bool),
                       mean=z["mean"].astype(np.float32), std=z["std"].astype(np.float32),
                       spacing_mm=float(z["spacing_mm"]), brains=int(z["brains"]))


def mni_template(cfg) -> tuple[np.ndarray, np.ndarray]:
    """nilearn's MNI152 2009 brain on its working grid, white-matter scaled (image, mask)."""
    from volseg.anomaly.data import load_brain
    from volseg.anomaly.prep import prepare_brain

    data, mask, meta = load_brain("mni152")
    prep = prepare_brain(data, mask, meta, cfg, n4=False)
    return prep.grid_image[0].numpy(), prep.grid_mask


def estimate(template: np.ndarray, template_mask: np.ndarray, residuals_in_template: list[np.ndarray],
             masks_in_template: list[np.ndarray], spacing_mm: float = 2.0, sigma_mm: float = 4.0) -> Normative:
    """Mean and spread of healthy residuals per template voxel, from residual maps already warped
    into template space (``masks_in_template``: where each brain has data)."""
    r = np.stack([np.where(m, x, 0.0) for x, m in zip(residuals_in_template, masks_in_template)]).astype(np.float32)
    w = np.stack([m.astype(np.float32) for m in masks_in_template])
    sigma = sigma_mm / spacing_mm
    n = ndi.gaussian_filter(w.sum(0), sigma)
    s1 = ndi.gaussian_filter(r.sum(0), sigma)
    s2 = ndi.gaussian_filter((r ** 2).sum(0), sigma)
    ok = n > 0.5
    mean = np.where(ok, s1 / np.maximum(n, 1e-6), 0.0)
    var = np.where(ok, s2 / np.maximum(n, 1e-6) - mean ** 2, 0.0)
    std = np.sqrt(np.maximum(var, 0.0))
    inside = template_mask & ok
    median = float(np.median(std[inside])) if inside.any() else None
    floor = 0.5 * median if median is not None else 1e-2
    outside = max(floor, median) if median is not None else 1.0
    std = np.where(inside, np.maximum(std, floor), outside)
    return Normative(template=template, template_mask=template_mask, mean=mean.astype(np.float32),
                     std=std.astype(np.float32), spacing_mm=spacing_mm, brains=len(residuals_in_template))


def to_template(arr: np.ndarray, transform, template_shape, spacing_mm: float, order: int = 1) -> np.ndarray:
    """A scan-grid array pulled into template space (the inverse of ``transform``)."""
    from volseg.transforms.register import warp

    return warp(arr, transform.GetInverse(), template_shape, spacing_mm, order=order)


def normalise(residual: np.ndarray, mean: np.ndarray, std: np.ndarray, signed: bool = False) -> np.ndarray:
    """``max(r - mean, 0) / std``; with ``signed`` (a signed residual x - x̂) ``(r - mean) / std``,
    so that darker-than-expected voxels keep their negative sign for the median filter."""
    z = residual - mean
    return ((z if signed else np.maximum(z, 0.0)) / std).astype(np.float32)


__all__ = ["Normative", "NORMATIVE_FILE", "mni_template", "estimate", "to_template", "normalise"]
