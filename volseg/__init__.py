"""volseg: bias correction, skull stripping and anomaly maps for 3D brain MRI.

Importing this package is cheap: it must not import torch, MONAI or nibabel, so that
``volseg --help`` answers at once. Heavy imports live inside the functions that need them.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
