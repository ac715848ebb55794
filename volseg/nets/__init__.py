"""Networks of volseg as importable ``torch.nn.Module`` factories."""

from volseg.nets.unet import ResidualUNet, build_unet

__all__ = ["ResidualUNet", "build_unet"]
