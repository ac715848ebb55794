"""MONAI transforms of volseg: pure functions, array classes and dictionary wrappers."""

from volseg.transforms.array import HeadGrid, N4BiasField, NormalizeHead
from volseg.transforms.chain import grid_chain, n4_transform, preprocess_chain
from volseg.transforms.dictionary import HeadGridd, N4BiasFieldd, NormalizeHeadd

__all__ = [
    "HeadGrid",
    "HeadGridd",
    "N4BiasField",
    "N4BiasFieldd",
    "NormalizeHead",
    "NormalizeHeadd",
    "grid_chain",
    "n4_transform",
    "preprocess_chain",
]
