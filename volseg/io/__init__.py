"""All file access and affine maths of volseg."""

from volseg.io.geometry import (
    grid_box_in_native,
    head_grid_affine,
    orientation_affine,
    random_affine,
    voxel_to_world,
    world_bbox,
)
from volseg.io.image import (
    IMAGE_EXTENSIONS,
    AtomicWriter,
    ImageMeta,
    check_writable_dir,
    load_image,
    make_image,
    obliquity_deg,
    scan_id,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "AtomicWriter",
    "ImageMeta",
    "check_writable_dir",
    "grid_box_in_native",
    "head_grid_affine",
    "load_image",
    "make_image",
    "obliquity_deg",
    "orientation_affine",
    "random_affine",
    "scan_id",
    "voxel_to_world",
    "world_bbox",
]
