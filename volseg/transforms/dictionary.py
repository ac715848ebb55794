"""Dictionary wrappers of volseg's transforms, for ``monai.transforms.Compose`` and ``Invertd``."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

from monai.transforms import InvertibleTransform, MapTransform

from volseg.transforms.array import HeadGrid, N4BiasField, NormalizeHead


class N4BiasFieldd(MapTransform):
    """Dictionary wrapper of :class:`~volseg.transforms.array.N4BiasField`."""

    def __init__(self, keys, allow_missing_keys: bool = False, **kwargs):
        super().__init__(keys, allow_missing_keys)
        self.n4 = N4BiasField(**kwargs)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.n4(d[key])
        return d


class HeadGridd(MapTransform, InvertibleTransform):
    """Dictionary wrapper of :class:`~volseg.transforms.array.HeadGrid`.

    The grid is computed once from ``ref_key`` (default: the first key) and every key is
    resampled onto it, with its own interpolation ``mode`` (e.g. ``("bilinear", "nearest")``
    for an image and its label).
    """

    def __init__(self, keys, spacing_mm: float = 2.0, size=(96, 128, 160),
                 top_margin_mm: float = 10.0, mode: str | Sequence[str] = "bilinear",
                 ref_key: str | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.grid = HeadGrid(spacing_mm, size, top_margin_mm)
        self.modes = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        if len(self.modes) != len(self.keys):
            raise ValueError(f"give one mode per key: {len(self.keys)} keys, {len(self.modes)} modes")
        self.ref_key = ref_key or self.keys[0]

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        grid_affine = self.grid.compute_grid(d[self.ref_key])
        for key, mode in self.key_iterator(d, self.modes):
            d[key] = self.grid(d[key], grid_affine=grid_affine, mode=mode)
        return d

    def inverse(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.grid.inverse(d[key])
        return d


class NormalizeHeadd(MapTransform):
    """Dictionary wrapper of :class:`~volseg.transforms.array.NormalizeHead`."""

    def __init__(self, keys, allow_missing_keys: bool = False, **kwargs):
        super().__init__(keys, allow_missing_keys)
        self.norm = NormalizeHead(**kwargs)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.norm(d[key])
        return d
