"""Device choice with a clean CPU fallback (CUDA, mixed precision and pinned memory only on GPU)."""

from __future__ import annotations

import contextlib
import logging
import re

from volseg.errors import VolsegError

log = logging.getLogger(__name__)

DEVICE_NAMES = "auto, cpu, cuda or cuda:N"


class DeviceError(VolsegError, ValueError):
    """A device name that is not auto, cpu, cuda or cuda:N."""


def check_device_name(name: str) -> str:
    """``name`` if it is a device volseg understands (no torch import, no GPU check), else :class:`DeviceError`."""
    if name in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", str(name)):
        return name
    raise DeviceError(f"unknown device {name!r}: use {DEVICE_NAMES}")


def pick_device(name: str = "auto"):
    """``"auto"`` takes CUDA when available; ``"cuda"`` without a GPU falls back to CPU with a warning."""
    import torch

    check_device_name(name)
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda" if name == "auto" else name)
    if name != "auto":
        log.warning("device %s asked for but CUDA is not available; using the CPU", name)
    return torch.device("cpu")


def autocast(device, enabled: bool = True):
    """Mixed precision on CUDA (float16); a no-op context on CPU."""
    import torch

    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def grad_scaler(device, enabled: bool = True):
    import torch

    return torch.amp.GradScaler("cuda", enabled=bool(enabled and device.type == "cuda"))


def pin_memory(device) -> bool:
    return device.type == "cuda"
