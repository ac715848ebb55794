"""Skull-stripping settings (``configs/strip.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from volseg.config import Config, TrainBase
from volseg.nets.unet import NetConfig


@dataclass(frozen=True)
class DataConfig:
    real: tuple[str, ...] = ()  # folders or CSV files of image/mask pairs (relative: to the config)
    validation: tuple[str, ...] = ()  # held-out real image/mask pairs
    synth_count: int = 200  # synthetic heads in the training pool
    synth_seed: int = 1000
    synth_ratio: float = 0.5  # share of training samples drawn from the synthetic pool
    # contrasts of the synthetic heads (volseg.synth CONTRASTS: t1, t2, pd, flair, any) and their
    # shares; each head's contrast is a weighted draw fixed by its seed. Empty weights: equal.
    synth_contrasts: tuple[str, ...] = ("t1",)
    synth_contrast_weights: tuple[float, ...] = ()
    cache_dir: str = "runs/strip/cache"


@dataclass(frozen=True)
class AugmentConfig:
    prob: float = 0.8  # chance of each spatial augmentation
    rotate_deg: float = 15.0
    translate_mm: float = 16.0
    scale: float = 0.12
    flip_lr: float = 0.5
    bias: float = 0.5
    gamma: float = 0.5
    contrast: float = 0.5
    blur: float = 0.2
    noise: float = 0.3
    salt_pepper: float = 0.1
    thick_slices: float = 0.3
    histogram: float = 0.3  # chance of a random non-linear intensity curve (RandHistogramShiftd)
    lesion: float = 0.3  # chance of painting tumour-like lesions inside the brain


@dataclass(frozen=True)
class TrainConfig(TrainBase):
    """The shared training settings (:class:`~volseg.config.TrainBase`) with the strip defaults,
    plus the weights of the Dice+focal loss."""

    steps: int = 3000
    steps_per_epoch: int = 150
    batch_size: int = 1
    lr: float = 2e-3
    out_dir: str = "runs/strip"
    lambda_dice: float = 1.0
    lambda_focal: float = 1.0


@dataclass(frozen=True)
class InferConfig:
    threshold: float = 0.5
    border_mm: float = 0.0


@dataclass(frozen=True)
class StripConfig:
    net: NetConfig = field(default_factory=NetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    preprocess: Config = field(default_factory=Config)


def load_strip_config(path=None) -> StripConfig:
    from volseg.config import load_config

    return load_config(path, cls=StripConfig) if path else StripConfig()


__all__ = ["StripConfig", "NetConfig", "DataConfig", "AugmentConfig", "TrainConfig",
           "InferConfig", "load_strip_config"]
