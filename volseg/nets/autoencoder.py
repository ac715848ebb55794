"""The 3D convolutional autoencoder of the anomaly stage.

A strided-convolution encoder, a configurable bottleneck and a transposed-convolution
decoder. With ``skips=False`` it is the classic bottleneck autoencoder of the
reconstruction-based anomaly literature; with ``skips=True`` encoder features are added to
the decoder at each scale (a U-Net-style denoising autoencoder, as in Kascenas et al. 2022,
"Denoising autoencoders for unsupervised anomaly detection in brain MRI"), which keeps
healthy detail sharp so that the residual shows what the network refused to reproduce.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.1, inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False),
        nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.1, inplace=True),
    )


@dataclass(frozen=True)
class AENetConfig:
    """The autoencoder's shape (``net:`` of ``configs/ae.yaml`` and of the model's ``model.json``)."""

    in_channels: int = 1
    channels: tuple[int, ...] = (16, 32, 64, 128)
    bottleneck: int = 64
    skips: bool = True
    skip_dropout: float = 0.0
    residual: bool = False  # output = input + correction (residual learning)


class ConvAutoencoder(nn.Module):
    """3D convolutional autoencoder: ``len(channels)`` stride-2 levels.

    Args:
        in_channels: input channels (1: a brain-only T1 on the working grid).
        channels: feature maps per level, e.g. ``(16, 32, 64, 128)``; every level halves the
            resolution (as MONAI's ``UNet``), and a transposed convolution returns to full size.
        bottleneck: feature maps at the coarsest level (the code); small values force a
            compressed code.
        skips: add encoder features to the decoder at each scale (denoising-AE style).
        skip_dropout: probability of dropping each skip tensor during training (pushes the
            network to use the coarse context instead of copying its input).
        residual: return ``x + correction`` (residual learning): healthy tissue needs no
            reconstruction at all, so the network's capacity goes into repairing what it finds
            abnormal and healthy residuals stay small and sharp.

    Input sizes must be divisible by ``2 ** len(channels)``: 16 for four levels, so
    the working grid 96x128x160 and 64^3 training patches are.

    Examples::

        >>> net = ConvAutoencoder(1, channels=(16, 32, 64, 128), bottleneck=64)
        >>> recon = net(torch.zeros(1, 1, 96, 128, 160))  # (1, 1, 96, 128, 160)
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (16, 32, 64, 128),
                 bottleneck: int = 64, skips: bool = True, skip_dropout: float = 0.0,
                 residual: bool = False):
        super().__init__()
        self.residual = bool(residual)
        channels = [int(c) for c in channels]
        if len(channels) < 2:
            raise ValueError(f"channels needs at least two levels, got {channels}")
        self.levels = len(channels) - 1  # decoder steps between encoder levels
        self.skips = bool(skips)
        self.skip_dropout = float(skip_dropout)
        self.enc = nn.ModuleList()
        cin = in_channels
        for c in channels:  # every level halves: the first already works at half resolution
            self.enc.append(_block(cin, c, stride=2))
            cin = c
        self.code = nn.Sequential(nn.Conv3d(channels[-1], bottleneck, 1), nn.LeakyReLU(0.1, inplace=True),
                                  nn.Conv3d(bottleneck, channels[-1], 1), nn.LeakyReLU(0.1, inplace=True))
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in range(self.levels, 0, -1):
            self.up.append(nn.ConvTranspose3d(channels[i], channels[i - 1], 2, stride=2))
            self.dec.append(_block(channels[i - 1], channels[i - 1], stride=1))
        # back to full resolution; the full-resolution input joins only here (when skips)
        self.top = nn.ConvTranspose3d(channels[0], channels[0], 2, stride=2)
        top_in = channels[0] + (in_channels if self.skips else 0)
        self.head = nn.Sequential(nn.Conv3d(top_in, channels[0], 3, padding=1), nn.LeakyReLU(0.1, inplace=True),
                                  nn.Conv3d(channels[0], in_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        h = x
        for enc in self.enc:
            h = enc(h)
            feats.append(h)
        h = self.code(h)
        for j, (up, dec) in enumerate(zip(self.up, self.dec)):
            h = up(h)
            if self.skips:
                skip = feats[self.levels - 1 - j]
                if self.training and self.skip_dropout > 0 and torch.rand(()) < self.skip_dropout:
                    skip = torch.zeros_like(skip)
                h = h + skip
            h = dec(h)
        h = self.top(h)
        if self.skips:
            inp = x
            if self.training and self.skip_dropout > 0 and torch.rand(()) < self.skip_dropout:
                inp = torch.zeros_like(x)
            h = torch.cat([h, inp], dim=1)
        out = self.head(h)
        return x + out if self.residual else out


def build_autoencoder(net_cfg) -> ConvAutoencoder:
    """Build from a :class:`AENetConfig`."""
    return ConvAutoencoder(net_cfg.in_channels, net_cfg.channels, net_cfg.bottleneck, net_cfg.skips,
                           net_cfg.skip_dropout, net_cfg.residual)


__all__ = ["AENetConfig", "ConvAutoencoder", "build_autoencoder"]
