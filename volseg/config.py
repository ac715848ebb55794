"""Settings: YAML files in ``configs/`` loaded into frozen dataclasses.

An unknown key or a value of the wrong type is a :class:`~volseg.errors.ConfigError` that
names the key and the file. Missing keys take the defaults below, which mirror
``configs/default.yaml``.
"""

from __future__ import annotations

import dataclasses
import os
import string
import typing
from dataclasses import dataclass, field
from pathlib import Path

from volseg.errors import ConfigError


@dataclass(frozen=True)
class N4Config:
    """N4 bias-field correction (SimpleITK, or ANTs through nipype)."""

    backend: str = "numpy"  # "numpy" (volseg.transforms.n4) | "simpleitk" | "ants" | "none"
    shrink_target_mm: float = 4.0  # per-axis shrink = max(1, round(target / voxel size))
    shrink: typing.Optional[tuple[int, int, int]] = None  # explicit per-axis shrink factors
    iterations: tuple[int, ...] = (50, 50, 50, 50)  # per fitting level
    convergence: float = 0.001
    bspline_spacing_mm: float = 200.0  # knot distance at the coarsest fitting level (ANTs -b)
    bspline_order: int = 3
    mask: str = "otsu"  # "otsu" head mask, or "none" for the whole field of view


@dataclass(frozen=True)
class GridConfig:
    """The working grid: RAS-aligned, ``spacing_mm`` isotropic, ``size`` voxels, head-centred."""

    spacing_mm: float = 2.0
    size: tuple[int, int, int] = (96, 128, 160)
    top_margin_mm: float = 10.0


@dataclass(frozen=True)
class IntensityConfig:
    """Normalisation on the working grid, inside the head mask."""

    method: str = "percentile"  # "percentile" | "zscore"
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    clip: tuple[float, float] = (0.0, 1.5)


@dataclass(frozen=True)
class IOConfig:
    nonfinite: str = "zero"  # "zero" (warn and zero NaN/Inf) | "error"


@dataclass(frozen=True)
class Config:
    n4: N4Config = field(default_factory=N4Config)
    grid: GridConfig = field(default_factory=GridConfig)
    intensity: IntensityConfig = field(default_factory=IntensityConfig)
    io: IOConfig = field(default_factory=IOConfig)


@dataclass(frozen=True)
class TrainBase:
    """The ``train:`` settings every network's training shares (:func:`volseg.training.train_loop`).

    Each network's config extends it with its own fields and defaults
    (:class:`volseg.strip.config.TrainConfig`, :class:`volseg.anomaly.config.AETrainConfig`).
    """

    steps: int = 2000  # optimiser steps of the one-cycle schedule
    steps_per_epoch: int = 200  # validation, checkpoint and log row every this many steps
    batch_size: int = 1  # per process (under torchrun a step sees world_size x batch_size samples)
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 1e-5
    # decay of an exponential moving average of the weights (0: off). When on, validation, best/,
    # final/ and the checkpoint's "ema" use the averaged weights (Polyak averaging: smooths the
    # step-to-step noise of the last, low-learning-rate part of the schedule)
    ema: float = 0.0
    seed: int = 0
    threads: int = 2  # torch CPU threads
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # float16 autocast on CUDA
    out_dir: str = "runs/train"


CHOICES = {
    "n4.backend": ("numpy", "simpleitk", "ants", "none"),
    "n4.mask": ("otsu", "none"),
    "intensity.method": ("percentile", "zscore"),
    "io.nonfinite": ("zero", "error"),
    "maps.residual": ("abs", "positive", "negative", "signed", "excess"),
    "maps.masked_fill": ("wm", "median", "blur"),
    "maps.masked_phases": (2, 8),
    "inpaint.fill": ("wm", "median"),
    "maps.masked_mode": ("all", "bright"),
    "maps.grey_mode": ("both", "raise"),
}


def shared_data_dir() -> Path:
    """The shared real scans: ``$VOLSEG_SHARED_DATA``, by default ``../shared/data``."""
    return Path(os.environ.get("VOLSEG_SHARED_DATA", "../shared/data"))


def expand_path(spec: str) -> str:
    """Expand ``${VOLSEG_SHARED_DATA}`` (default ``../shared/data``) and other variables."""
    env = dict(os.environ)
    env.setdefault("VOLSEG_SHARED_DATA", str(shared_data_dir()))
    return string.Template(str(spec)).safe_substitute(env)


def default_config_path() -> Path:
    """``configs/default.yaml`` of the source tree, or the copy installed with the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "configs" / "default.yaml", here / "configs" / "default.yaml"):
        if candidate.exists():
            return candidate
    return here.parent / "configs" / "default.yaml"


def _coerce(value, hint, key: str, source: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:  # Optional[...]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' must be a mapping, got {type(value).__name__}")
        return _build(hint, value, source, prefix=key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: key '{key}' must be a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{source}: key '{key}' must have {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: key '{key}' must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: key '{key}' must be an integer, got {type(value).__name__} {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: key '{key}' must be a string, got {type(value).__name__} {value!r}")
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"{source}: key '{key}' must be one of {CHOICES[key]}, got {value!r}")
        return value
    return value


def _build(cls, data: dict, source: str, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' (allowed here: {', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k, source) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict | None, cls=Config, source: str = "<dict>"):
    """Build a frozen config of type ``cls`` from a nested dict, checking keys and types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    return _build(cls, data, source)


def load_config(path: str | os.PathLike | None = None, cls=Config):
    """Load a YAML config into ``cls``; ``None`` loads ``configs/default.yaml`` (or built-in defaults)."""
    import yaml

    if path is None:
        path = default_config_path()
        if not Path(path).exists():
            return cls()
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    return config_from_dict(data, cls, source=str(path))


def config_to_dict(cfg) -> dict:
    """Plain dict (lists for tuples) for JSON sidecars."""
    def conv(v):
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(dataclasses.asdict(cfg))
