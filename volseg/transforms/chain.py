"""The preprocessing chain built from a :class:`volseg.config.Config`."""

from __future__ import annotations

from monai.transforms import Compose, CopyItemsd

from volseg.config import Config
from volseg.transforms.dictionary import HeadGridd, N4BiasFieldd, NormalizeHeadd


def n4_transform(cfg: Config, keys=("image",)) -> N4BiasFieldd:
    c = cfg.n4
    return N4BiasFieldd(keys, backend=c.backend, shrink=c.shrink, shrink_target_mm=c.shrink_target_mm,
                        iterations=c.iterations, convergence=c.convergence,
                        bspline_spacing_mm=c.bspline_spacing_mm, bspline_order=c.bspline_order,
                        mask=c.mask)


def grid_chain(cfg: Config, keys=("image",), modes=("bilinear",), normalize: bool = True) -> Compose:
    """Native (N4-corrected) scan -> head-centred working grid -> normalised intensities."""
    steps = [HeadGridd(keys, spacing_mm=cfg.grid.spacing_mm, size=cfg.grid.size,
                       top_margin_mm=cfg.grid.top_margin_mm, mode=list(modes))]
    if normalize:
        i = cfg.intensity
        steps.append(NormalizeHeadd(keys[0], method=i.method, lower_percentile=i.lower_percentile,
                                    upper_percentile=i.upper_percentile, clip=i.clip))
    return Compose(steps)


def preprocess_chain(cfg: Config, native_key: str = "native") -> Compose:
    """The whole chain on ``{"image": MetaTensor}``: N4, a copy of the corrected native image
    under ``native_key``, the working grid and normalisation. Invert predictions made on the
    grid with ``Invertd(keys="pred", transform=chain, orig_keys="image", nearest_interp=False)``.
    """
    return Compose([
        n4_transform(cfg),
        CopyItemsd(keys="image", times=1, names=native_key),
        *grid_chain(cfg).transforms,
    ])
