"""The residual 3D U-Net used for skull stripping (MONAI ``UNet`` with residual units)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from monai.networks.nets import UNet


@dataclass(frozen=True)
class NetConfig:
    """The strip U-Net's shape (``net:`` of ``configs/strip.yaml`` and of the model's ``model.json``)."""

    in_channels: int = 1
    out_channels: int = 1
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 1
    dropout: float = 0.0


class ResidualUNet(UNet):
    """A 3D U-Net with residual units, PReLU and instance norm (MONAI ``UNet``).

    Args:
        spatial_dims: 3 for volumes.
        in_channels: input channels (1: a T1 image on the working grid).
        out_channels: output channels (1: brain logit).
        channels: feature maps per level, e.g. ``(16, 32, 64, 128, 256)``.
        strides: downsampling per level, e.g. ``(2, 2, 2, 2)``.
        num_res_units: residual units per block.
        dropout: dropout probability.

    Input sizes must be divisible by the product of the strides (16 for four stride-2 levels):
    the working grid 96x128x160 is.

    Examples::

        >>> net = ResidualUNet(3, 1, 1, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2))
        >>> logits = net(torch.zeros(1, 1, 96, 128, 160))  # (1, 1, 96, 128, 160)
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 1,
                 channels: Sequence[int] = (16, 32, 64, 128, 256), strides: Sequence[int] = (2, 2, 2, 2),
                 num_res_units: int = 1, dropout: float = 0.0):
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                         channels=tuple(channels), strides=tuple(strides), num_res_units=num_res_units,
                         norm="instance", dropout=dropout)


def build_unet(net_cfg) -> ResidualUNet:
    """Build from a :class:`NetConfig`."""
    return ResidualUNet(3, net_cfg.in_channels, net_cfg.out_channels, net_cfg.channels,
                        net_cfg.strides, net_cfg.num_res_units, net_cfg.dropout)


__all__ = ["NetConfig", "ResidualUNet", "build_unet"]
