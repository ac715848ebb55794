"""Affine maths: world coordinates of voxels and the head-centred RAS working grid."""

from __future__ import annotations

import numpy as np


def voxel_to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Map an (N, 3) array of voxel indices to world (mm) coordinates."""
    ijk = np.asarray(ijk, dtype=float)
    return ijk @ np.asarray(affine, dtype=float)[:3, :3].T + np.asarray(affine, dtype=float)[:3, 3]


def world_bbox(affine: np.ndarray, mask: np.ndarray, max_points: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """World-space (RAS mm) bounding box of the voxels of ``mask``."""
    ijk = np.argwhere(mask)
    if len(ijk) == 0:
        raise ValueError("empty mask has no bounding box")
    if len(ijk) > max_points:
        ijk = ijk[:: len(ijk) // max_points + 1]
    xyz = voxel_to_world(affine, ijk)
    return xyz.min(axis=0), xyz.max(axis=0)


def head_grid_affine(
    bbox_min: np.ndarray,
    bbox_max: np.ndarray,
    spacing: float,
    size: tuple[int, int, int],
    top_margin_mm: float = 10.0,
) -> np.ndarray:
    """RAS-aligned affine of a ``size`` grid at ``spacing`` mm centred on a head bounding box.

    Left-right and front-back are centred on the box. Head-foot is centred too unless the
    box (head plus neck and shoulders) is taller than the grid; then the top of the head is
    kept ``top_margin_mm`` below the grid's top, and the neck is what falls off.
    """
    bbox_min = np.asarray(bbox_min, dtype=float)
    bbox_max = np.asarray(bbox_max, dtype=float)
    fov = np.asarray(size, dtype=float) * spacing
    centre = (bbox_min + bbox_max) / 2.0
    if bbox_max[2] - bbox_min[2] > fov[2] - 2 * top_margin_mm:
        centre[2] = bbox_max[2] + top_margin_mm - fov[2] / 2.0
    affine = np.eye(4)
    affine[:3, :3] = np.diag([spacing] * 3)
    affine[:3, 3] = centre - (np.asarray(size, dtype=float) - 1) / 2.0 * spacing
    return affine


def grid_box_in_native(native_affine: np.ndarray, native_shape, grid_affine: np.ndarray,
                       grid_size) -> dict:
    """Where the working grid lies in the native voxel index space (for provenance)."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in grid_size], indexing="ij")).reshape(3, -1).T
    xyz = voxel_to_world(grid_affine, corners)
    ijk = voxel_to_world(np.linalg.inv(native_affine), xyz)
    return {
        "grid_affine": np.asarray(grid_affine).round(6).tolist(),
        "grid_size": [int(n) for n in grid_size],
        "native_index_min": ijk.min(axis=0).round(3).tolist(),
        "native_index_max": ijk.max(axis=0).round(3).tolist(),
        "native_shape": [int(n) for n in native_shape],
    }


def random_affine(rng: np.random.Generator, shape, zooms, max_rotation_deg: float = 20.0,
                  flip: bool = True) -> np.ndarray:
    """A random (oblique, possibly flipped) affine with the given voxel sizes, centred at 0."""
    from scipy.spatial.transform import Rotation

    rot = Rotation.from_rotvec(
        np.radians(rng.uniform(-max_rotation_deg, max_rotation_deg, 3))
    ).as_matrix()
    perm = np.eye(3)[rng.permutation(3)]
    signs = np.diag(rng.choice([-1.0, 1.0], 3)) if flip else np.eye(3)
    lin = rot @ perm @ signs @ np.diag(np.asarray(zooms, dtype=float))
    affine = np.eye(4)
    affine[:3, :3] = lin
    affine[:3, 3] = -lin @ ((np.asarray(shape, dtype=float) - 1) / 2.0)
    return affine


def orientation_affine(axcodes: str, shape, zooms) -> np.ndarray:
    """Axis-aligned affine with the given orientation codes (e.g. 'LPS', 'LIA'), centred at 0."""
    import nibabel as nib

    ornt = nib.orientations.axcodes2ornt(tuple(axcodes))
    lin = np.zeros((3, 3))
    for vox_axis, (world_axis, flip) in enumerate(ornt):
        lin[int(world_axis), vox_axis] = flip * zooms[vox_axis]
    affine = np.eye(4)
    affine[:3, :3] = lin
    affine[:3, 3] = -lin @ ((np.asarray(shape, dtype=float) - 1) / 2.0)
    return affine
