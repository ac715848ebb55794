"""Pure functions behind volseg's transforms: head masks, N4 bias correction, normalisation.

They take and return numpy arrays; the MONAI array/dictionary classes in ``array.py`` and
``dictionary.py`` validate parameters and handle metadata around them.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

log = logging.getLogger(__name__)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1D sample (numpy only, robust to a few bright outliers)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    hi = np.percentile(values, 99.9)
    lo = values.min()
    if hi <= lo:
        return float(lo)
    hist, edges = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def largest_component(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """The largest connected component of a binary mask (empty stays empty)."""
    structure = ndi.generate_binary_structure(3, connectivity)
    labels, n = ndi.label(mask, structure=structure)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def head_mask(data: np.ndarray, step: int = 1, closing: int = 2, fill_slices: bool = False) -> np.ndarray:
    """Otsu head (foreground) mask: threshold, closing (``closing`` iterations), largest
    component, holes filled.

    ``step`` > 1 computes it on a subsampled copy (``data[::step, ::step, ::step]``) and
    returns the mask at that subsampled size. ``fill_slices`` also fills holes slice by slice
    along each axis: a head that the field of view cuts (an axial slab) is open at that face,
    so 3D filling leaves its inside empty and the mask is only the bright scalp.
    """
    small = np.asarray(data[::step, ::step, ::step], dtype=np.float32)
    thr = otsu_threshold(small[small > small.min()] if (small > small.min()).any() else small)
    mask = small > thr
    if not mask.any():
        mask = small > small.min()
    mask = ndi.binary_closing(mask, iterations=closing)
    mask = largest_component(mask)
    mask = fill_holes(mask)
    if fill_slices:
        for ax in range(3):
            mask |= fill_holes(mask, structure=_in_plane(ax))
    return mask


def fill_holes(mask: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes``, the same result in about half the time: the
    background's components (connected by ``structure``, a symmetric 3x3(x3) structure;
    default: faces only) that do not reach the array's border across a face the structure
    connects through are holes. scipy grows the outside in from the border one step at a
    time; one labelling finds the same components."""
    mask = np.asarray(mask, bool)
    if structure is None:
        structure = ndi.generate_binary_structure(mask.ndim, 1)
    structure = np.asarray(structure, bool)
    labels, n = ndi.label(~mask, structure=structure)
    if n == 0:
        return mask.copy()
    outside = np.zeros(n + 1, bool)
    for ax in range(mask.ndim):
        if np.take(structure, 0, axis=ax).any():  # the structure steps across this axis's faces
            outside[np.take(labels, 0, axis=ax)] = True
            outside[np.take(labels, -1, axis=ax)] = True
    outside[0] = False  # label 0: the mask itself
    return ~outside[labels]


def _in_plane(axis: int) -> np.ndarray:
    """A 3x3x3 structure that connects voxels only within planes normal to ``axis``."""
    s = np.zeros((3, 3, 3), bool)
    idx = [slice(None)] * 3
    idx[axis] = 1
    s[tuple(idx)] = ndi.generate_binary_structure(2, 1)
    return s


def shrink_factors(zooms, target_mm: float = 4.0) -> tuple[int, int, int]:
    """Per-axis shrink so that shrunk voxels are about ``target_mm`` (1 for thick slices)."""
    return tuple(max(1, int(round(target_mm / float(z)))) for z in zooms)  # type: ignore[return-value]


def _to_sitk(data: np.ndarray, zooms):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data, dtype=np.float32).transpose(2, 1, 0)))
    img.SetSpacing([float(z) for z in zooms])
    return img


def _from_sitk(img) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(img).transpose(2, 1, 0)


def n4_log_field(
    data: np.ndarray,
    zooms,
    mask: np.ndarray | None = None,
    shrink: tuple[int, int, int] | None = None,
    shrink_target_mm: float = 4.0,
    iterations=(50, 50, 50, 50),
    convergence: float = 0.001,
    bspline_spacing_mm: float = 200.0,
    bspline_order: int = 3,
) -> tuple[np.ndarray, dict]:
    """Estimate N4's log bias field with SimpleITK; returns (log field at full resolution, info).

    The fit runs on an image shrunk per axis (``shrink`` or chosen from the voxel size), inside
    ``mask`` (an Otsu head mask when ``None``); the full-resolution field comes from
    ``GetLogBiasFieldAsImage`` evaluated on the original grid.
    """
    import SimpleITK as sitk

    t0 = time.perf_counter()
    data = np.asarray(data, dtype=np.float32)
    shift = float(min(0.0, data.min()))
    positive = data - shift  # N4 works on log intensities: keep them >= 0
    if mask is None:
        mask = head_mask(positive)
    mask = np.asarray(mask, bool) & (positive > 0)
    if mask.sum() < 100:
        raise ValueError("N4 head mask has fewer than 100 voxels; the image looks empty")
    shrink = tuple(int(s) for s in (shrink or shrink_factors(zooms, shrink_target_mm)))
    full = _to_sitk(positive, zooms)
    mask_img = _to_sitk(mask.astype(np.uint8), zooms)
    mask_img = sitk.Cast(mask_img, sitk.sitkUInt8)
    small = sitk.Shrink(full, list(shrink))
    small_mask = sitk.Shrink(mask_img, list(shrink))
    extent = np.asarray(full.GetSize()) * np.asarray(full.GetSpacing())
    # spans at the coarsest level (the mesh doubles at each further level, as in ANTs' -b)
    control_points = [max(1, int(round(e / bspline_spacing_mm))) + bspline_order for e in extent]
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(i) for i in iterations])
    corrector.SetConvergenceThreshold(float(convergence))
    corrector.SetSplineOrder(int(bspline_order))
    corrector.SetNumberOfControlPoints(control_points)
    corrector.Execute(small, small_mask)
    log_field = _from_sitk(corrector.GetLogBiasFieldAsImage(full)).astype(np.float32)
    info = {
        "backend": "simpleitk",
        "simpleitk_version": sitk.Version.VersionString(),
        "shrink": list(shrink),
        "iterations": [int(i) for i in iterations],
        "convergence": float(convergence),
        "bspline_spacing_mm": float(bspline_spacing_mm),
        "bspline_order": int(bspline_order),
        "control_points": control_points,
        "mask_voxels": int(mask.sum()),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return log_field, info


def ants_available() -> bool:
    """Whether ANTs' ``N4BiasFieldCorrection`` binary is on PATH."""
    return shutil.which("N4BiasFieldCorrection") is not None


def n4_log_field_ants(data: np.ndarray, affine: np.ndarray, zooms, shrink=None,
                      shrink_target_mm: float = 4.0, iterations=(50, 50, 50, 50),
                      convergence: float = 0.001, bspline_spacing_mm: float = 200.0,
                      mask: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """The same estimate through nipype's ``ants.N4BiasFieldCorrection`` (needs ANTs on PATH)."""
    if not ants_available():
        raise RuntimeError(
            "the 'ants' N4 backend needs ANTs' N4BiasFieldCorrection on PATH; "
            "install ANTs or use n4.backend: simpleitk"
        )
    from nipype.interfaces.ants import N4BiasFieldCorrection

    from volseg.io import ImageMeta, load_image, make_image

    t0 = time.perf_counter()
    shrink = tuple(int(s) for s in (shrink or shrink_factors(zooms, shrink_target_mm)))
    meta = ImageMeta(path="<n4-input>", affine=affine, shape=tuple(data.shape), zooms=tuple(zooms))
    with tempfile.TemporaryDirectory(prefix="volseg-n4-") as tmp:
        src = Path(tmp) / "in.nii.gz"
        make_image(np.asarray(data, np.float32) - min(0.0, float(data.min())), meta).to_filename(str(src))
        node = N4BiasFieldCorrection(
            dimension=3,
            input_image=str(src),
            shrink_factor=int(max(shrink)),
            n_iterations=[int(i) for i in iterations],
            convergence_threshold=float(convergence),
            bspline_fitting_distance=float(bspline_spacing_mm),
            save_bias=True,
            output_image=str(Path(tmp) / "out.nii.gz"),
            bias_image=str(Path(tmp) / "bias.nii.gz"),
        )
        if mask is not None:
            mpath = Path(tmp) / "mask.nii.gz"
            make_image(mask.astype(np.uint8), meta, kind="mask").to_filename(str(mpath))
            node.inputs.mask_image = str(mpath)
        node.run(cwd=tmp)
        bias, _ = load_image(Path(tmp) / "bias.nii.gz")
    info = {"backend": "ants", "shrink": [int(max(shrink))] * 3, "iterations": list(iterations),
            "convergence": convergence, "bspline_spacing_mm": bspline_spacing_mm,
            "seconds": round(time.perf_counter() - t0, 3)}
    return np.log(np.maximum(bias, 1e-6)).astype(np.float32), info


def grid_to_native(grid_map: np.ndarray, grid_affine, native_affine, native_shape, box=None,
                   mode: str = "bilinear", grid_box=None) -> np.ndarray:
    """A working-grid array back on the native grid: one resampling from the grid's affine to
    the native voxels (MONAI ``SpatialResample``, zero padding), as the chain's inverse
    (``Invertd`` through :class:`~volseg.transforms.HeadGrid`) does, but only inside ``box``
    (native voxel index bounds ``(lo, hi)``; default: the footprint of the grid voxels
    ``grid_box`` = ``(lo, hi)`` grid indices, else of the whole grid), zeros elsewhere.
    Both networks' maps go back to the scan's grid through this one function."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    shape = np.asarray(native_shape, dtype=int)
    native_affine = np.asarray(native_affine, dtype=np.float64)
    grid_affine = np.asarray(grid_affine, dtype=np.float64)
    if box is None:  # the grid's (or grid_box's) corners in native voxel indices, one voxel of margin
        size = np.asarray(grid_map.shape[-3:])
        g_lo, g_hi = (np.zeros(3), size) if grid_box is None else (np.asarray(grid_box[0]), np.asarray(grid_box[1]))
        corners = np.array(np.meshgrid(*[[a - 0.5, b - 0.5] for a, b in zip(g_lo, g_hi)],
                                       indexing="ij")).reshape(3, -1).T
        ijk = (np.linalg.inv(native_affine) @ grid_affine @ np.c_[corners, np.ones(len(corners))].T)[:3].T
        box = (np.floor(ijk.min(0)) - 1, np.ceil(ijk.max(0)) + 2)
    lo = np.clip(np.asarray(box[0], dtype=int), 0, shape)
    hi = np.clip(np.asarray(box[1], dtype=int), 0, shape)
    native = np.zeros(tuple(shape), np.float32)
    if np.any(hi <= lo):
        return native
    sub_affine = native_affine.copy()
    sub_affine[:3, 3] = native_affine[:3, :3] @ lo + native_affine[:3, 3]
    src = MetaTensor(torch.as_tensor(np.asarray(grid_map, dtype=np.float32).reshape((1,) + grid_map.shape[-3:])),
                     affine=torch.as_tensor(grid_affine))
    sub = SpatialResample(mode=mode, padding_mode="zeros", dtype=torch.float32)(
        src, dst_affine=torch.as_tensor(sub_affine), spatial_size=tuple(int(v) for v in hi - lo))
    native[tuple(slice(a, b) for a, b in zip(lo, hi))] = sub[0].detach().cpu().numpy()
    return native


def normalize_intensity(data: np.ndarray, mask: np.ndarray | None = None, method: str = "percentile",
                        lower: float = 0.5, upper: float = 99.5,
                        clip: tuple[float, float] | None = (0.0, 1.5)) -> np.ndarray:
    """Robust scaling inside ``mask``: percentiles to [0, 1], or z-score; then optional clip."""
    data = np.asarray(data, dtype=np.float32)
    inside = data[mask > 0] if mask is not None and np.any(mask) else data
    if method == "percentile":
        lo, hi = np.percentile(inside, [lower, upper])
        out = (data - lo) / max(float(hi - lo), 1e-6)
    elif method == "zscore":
        out = (data - float(inside.mean())) / max(float(inside.std()), 1e-6)
    else:
        raise ValueError(f"unknown normalisation method {method!r}; use 'percentile' or 'zscore'")
    if clip is not None:
        out = np.clip(out, clip[0], clip[1])
    return out.astype(np.float32)
