"""QC pictures drawn with nilearn: three orthogonal views of a scan with its brain-mask contour,
and the anomaly map over the brain.

Images are first resampled to an RAS grid of at least 2 mm (nilearn would otherwise resample a
1 mm oblique head itself, at about 3 s a picture); figures are plain matplotlib ``Figure``
objects, not pyplot's, so nothing is left open or registered in the process.
"""

from __future__ import annotations

import os

import numpy as np

PLOT_MM = 2.0  # pictures are drawn on a grid of at least this voxel size
FIG_SIZE = (9.0, 3.2)
DPI = 80


def _ras_grid(img, interpolation: str, like=None):
    from nilearn.image import resample_img, resample_to_img

    if like is not None:
        return resample_to_img(img, like, interpolation=interpolation, force_resample=True,
                               copy_header=True)
    zooms = np.linalg.norm(np.asarray(img.affine)[:3, :3], axis=0)
    mm = max(PLOT_MM, float(min(zooms)))
    return resample_img(img, target_affine=np.diag([mm, mm, mm]), interpolation=interpolation,
                        force_resample=True, copy_header=True)


def _centre(mask_img) -> tuple[float, float, float] | None:
    """World coordinates of the centre of mass of a mask (None when empty)."""
    from scipy import ndimage as ndi

    data = np.asarray(mask_img.dataobj) > 0
    if not data.any():
        return None
    ijk = ndi.center_of_mass(data)
    return tuple(float(v) for v in (np.asarray(mask_img.affine) @ np.r_[ijk, 1.0])[:3])


def _largest_blob(mask_img):
    from volseg.transforms.functional import largest_component
    import nibabel as nib

    data = np.asarray(mask_img.dataobj) > 0
    return nib.Nifti1Image(largest_component(data).astype(np.uint8), mask_img.affine)


def _save(display, fig, path) -> None:
    display.savefig(str(path), dpi=DPI, format="png")  # staged names do not end in .png
    fig.clf()  # not display.close(): that asks pyplot, which never saw this figure


def mask_figure(anat_img, mask_img, path: str | os.PathLike, title: str = "") -> None:
    """Three orthogonal views of ``anat_img`` with the brain-mask contour in red (PNG)."""
    from matplotlib.figure import Figure
    from nilearn import plotting

    anat = _ras_grid(anat_img, "continuous")
    fig = Figure(figsize=FIG_SIZE, facecolor="black")
    cut = None
    if mask_img is not None:
        mask = _ras_grid(mask_img, "nearest", like=anat)
        cut = _centre(mask)
    display = plotting.plot_anat(anat, display_mode="ortho", cut_coords=cut, dim=-0.3,
                                 colorbar=False, annotate=True, draw_cross=False, black_bg=True, figure=fig,
                                 title=title or None)
    if mask_img is not None:
        display.add_contours(mask, levels=[0.5], colors="r", linewidths=1.0)
    _save(display, fig, path)


def anomaly_figure(anat_img, map_img, brain_img, anomaly_mask_img, path: str | os.PathLike,
                   title: str = "") -> None:
    """The anomaly map (hot colours) over the scan, cut through the largest anomalous region
    (else the brain's centre), with the anomaly mask's contour in cyan (PNG)."""
    from matplotlib.figure import Figure
    from nilearn import plotting

    anat = _ras_grid(anat_img, "continuous")
    amap = _ras_grid(map_img, "continuous", like=anat)
    brain = _ras_grid(brain_img, "nearest", like=anat)
    values = np.asarray(amap.dataobj)[np.asarray(brain.dataobj) > 0]
    vmax = float(np.percentile(values, 99.9)) if values.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    cut = None
    amask = None
    if anomaly_mask_img is not None and np.asarray(anomaly_mask_img.dataobj).any():
        amask = _ras_grid(anomaly_mask_img, "nearest", like=anat)
        cut = _centre(_largest_blob(amask)) if np.asarray(amask.dataobj).any() else None
    cut = cut or _centre(brain)
    fig = Figure(figsize=FIG_SIZE, facecolor="black")
    display = plotting.plot_stat_map(amap, bg_img=anat, display_mode="ortho", cut_coords=cut,
                                     threshold=0.1 * vmax, vmax=vmax, cmap="hot", colorbar=True, symmetric_cbar=False,
                                     annotate=True, draw_cross=False, black_bg=True, dim=-0.3,
                                     figure=fig, title=title or None)
    if amask is not None and np.asarray(amask.dataobj).any():
        display.add_contours(amask, levels=[0.5], colors="c", linewidths=1.0)
    _save(display, fig, path)
