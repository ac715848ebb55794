"""3D augmentation for training on the working grid (MONAI transforms plus two of our own).

Covers what the X-ray classifier of our sources used (rotation, translation, zoom, flip,
brightness/contrast, blur, salt-and-pepper and Gaussian noise) and MRI's own artefacts (bias
field, gamma, thick slices / low resolution, a non-linear intensity curve), plus lesions painted
inside the brain (tumour-like blobs with an optional enhancing rim and oedema) so that a mask
does not cut around a glioma or a large lesion.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as TF
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandHistogramShiftd,
    RandomizableTransform,
    RandScaleIntensityd,
    RandShiftIntensityd,
)


class RandSaltPepperd(RandomizableTransform, MapTransform):
    """Set a random fraction (up to ``amount``) of voxels to the image's min or max."""

    def __init__(self, keys, prob: float = 0.1, amount: float = 0.01):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        self.amount = amount

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        frac = self.R.uniform(0, self.amount)
        for key in self.key_iterator(d):
            img = d[key]
            noise = torch.as_tensor(self.R.uniform(size=img.shape), dtype=torch.float32)
            lo, hi = float(img.min()), float(img.max())
            img = img.clone()
            img[noise < frac / 2] = lo
            img[noise > 1 - frac / 2] = hi
            d[key] = img
        return d


class RandThickSlicesd(RandomizableTransform, MapTransform):
    """Simulate a 2D acquisition: average ``factor`` (2-4) neighbouring slices along a random
    axis, sample every ``factor``-th, and interpolate back (partial volume + lost detail)."""

    def __init__(self, keys, prob: float = 0.3, factors=(2, 4)):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        self.factors = factors

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        axis = int(self.R.randint(0, 3))
        factor = float(self.R.uniform(*self.factors))
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key]).float()[None]  # (1, C, X, Y, Z)
            size = list(img.shape[2:])
            kernel = [1, 1, 1]
            kernel[axis] = max(1, int(round(factor)))
            low = TF.avg_pool3d(img, kernel_size=kernel, stride=kernel, ceil_mode=True)
            back = TF.interpolate(low, size=size, mode="trilinear", align_corners=False)
            out = d[key].clone() if hasattr(d[key], "clone") else d[key]
            out[...] = back[0].to(out.dtype)
            d[key] = out
        return d


class RandBrainLesiond(RandomizableTransform, MapTransform):
    """Paint 1-3 ellipsoidal lesions inside the brain label (the label is left unchanged).

    Each lesion has semi-axes ``radius_mm`` (on a grid of ``spacing_mm``), a core whose
    intensity is a random 0.2-1.8 times the brain's median, soft edges and some texture; half
    of them get an enhancing rim (1.4-2.2x) and a darker oedema halo, as gliomas on a
    post-contrast T1 do. Lesion voxels outside the label are not touched.
    """

    def __init__(self, keys, label_key: str = "label", prob: float = 0.3,
                 radius_mm=(4.0, 30.0), spacing_mm: float = 2.0):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        self.label_key, self.radius_mm, self.spacing = label_key, radius_mm, spacing_mm

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        label = torch.as_tensor(d[self.label_key])[0] > 0.5
        inside = torch.nonzero(label)
        if len(inside) == 0:
            return d
        shape = label.shape
        grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
        for key in self.key_iterator(d):
            img = torch.as_tensor(d[key]).float().clone()
            ref = float(img[0][label].median())
            for _ in range(int(self.R.randint(1, 4))):
                c = inside[int(self.R.randint(len(inside)))].float()
                radii = self.R.uniform(*self.radius_mm, size=3) / self.spacing
                rot = torch.as_tensor(_random_rotation(self.R), dtype=torch.float32)
                offs = torch.stack([g - c[i] for i, g in enumerate(grids)], -1) @ rot
                r = torch.sqrt(sum((offs[..., i] / float(radii[i])) ** 2 for i in range(3)))
                edge = float(self.R.uniform(0.05, 0.3))
                core = torch.sigmoid((1.0 - r) / edge) * label
                texture = 1.0 + 0.15 * torch.as_tensor(self.R.standard_normal(shape), dtype=torch.float32)
                target = ref * float(self.R.uniform(0.2, 1.8)) * texture
                new = img[0] * (1 - core) + target * core
                if self.R.uniform() < 0.5:
                    rim = torch.exp(-(((r - 1.0) / 0.12) ** 2)) * label
                    halo = torch.sigmoid((1.6 - r) / 0.1) * (1 - core) * label
                    new = new * (1 - 0.4 * halo * float(self.R.uniform(0, 1)))
                    new = new * (1 - rim) + ref * float(self.R.uniform(1.4, 2.2)) * rim
                img[0] = new
            d[key] = img
        return d


def _random_rotation(R) -> np.ndarray:
    q, _ = np.linalg.qr(R.standard_normal((3, 3)))
    return q


def train_augmentation(aug, spacing_mm: float = 2.0) -> Compose:
    """The training augmentation from an :class:`volseg.strip.config.AugmentConfig`."""
    rot = math.radians(aug.rotate_deg)
    shift = aug.translate_mm / spacing_mm
    keys = ("image", "label")
    return Compose([
        RandBrainLesiond("image", prob=aug.lesion, spacing_mm=spacing_mm),
        RandAffined(keys, prob=aug.prob, rotate_range=(rot, rot, rot), translate_range=(shift,) * 3,
                    scale_range=(aug.scale,) * 3, mode=("bilinear", "bilinear"), padding_mode="zeros",
                    cache_grid=False),
        RandFlipd(keys, prob=aug.flip_lr, spatial_axis=0),
        RandThickSlicesd(keys, prob=aug.thick_slices),
        RandBiasFieldd("image", prob=aug.bias, coeff_range=(0.0, 0.4)),
        RandAdjustContrastd("image", prob=aug.gamma, gamma=(0.6, 1.7)),
        RandHistogramShiftd("image", prob=aug.histogram, num_control_points=(4, 8)),
        RandScaleIntensityd("image", prob=aug.contrast, factors=0.25),
        RandShiftIntensityd("image", prob=aug.contrast, offsets=0.1),
        RandGaussianSmoothd("image", prob=aug.blur, sigma_x=(0.3, 1.2), sigma_y=(0.3, 1.2),
                            sigma_z=(0.3, 1.2)),
        RandGaussianNoised("image", prob=aug.noise, std=0.06),
        RandSaltPepperd("image", prob=aug.salt_pepper, amount=0.01),
    ])


def seeded(transform: Compose, seed: int) -> Compose:
    transform.set_random_state(seed=int(seed) % (2**32 - 1))
    return transform


__all__ = ["RandBrainLesiond", "RandSaltPepperd", "RandThickSlicesd", "train_augmentation", "seeded"]
