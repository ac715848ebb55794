"""QC measures of one processed scan: brain volume, SNR, the self-QC measures
(:mod:`volseg.cohort.selfqc`) and the notes that put it on the "check" list.

SNR follows Dietrich et al. (2007): the brain's mean intensity over the noise sigma, the sigma
measured in the air around the head. A magnitude image's air holds Rayleigh noise, whose
spread is smaller than sigma: ``std(air) = sigma * sqrt((4 - pi) / 2)`` (about 0.655 sigma)
and ``mean(air) = sigma * sqrt(pi / 2)``; :func:`air_noise_sigma` undoes that.
"""

from __future__ import annotations

import math

import numpy as np

from volseg.cohort.selfqc import BRAIN_ML_RANGE  # noqa: F401  (re-exported: plausible brain mask volumes, mL)

# Fewer non-zero air voxels than this and the noise estimate is not trusted (SNR left empty).
MIN_AIR_VOXELS = 500
# std(air) / sigma for Rayleigh-distributed air (magnitude of complex Gaussian noise).
RAYLEIGH_STD_FACTOR = math.sqrt((4.0 - math.pi) / 2.0)


def air_noise_sigma(air_values) -> float | None:
    """The noise sigma from air voxel values of a magnitude image, or None with too little air.

    Zeros (zero padding, defacing, masked-out air) and non-finite values are not noise and are
    left out before counting; fewer than :data:`MIN_AIR_VOXELS` remaining gives None.
    """
    air = np.asarray(air_values, dtype=np.float64).ravel()
    air = air[np.isfinite(air) & (air != 0)]
    if air.size < MIN_AIR_VOXELS:
        return None
    return float(np.std(air)) / RAYLEIGH_STD_FACTOR


def snr(brain_values, sigma: float | None) -> float | None:
    """Mean brain intensity over the noise sigma (None without a sigma, a zero sigma or a brain)."""
    brain = np.asarray(brain_values, dtype=np.float64).ravel()
    if sigma is None or not sigma > 0 or brain.size == 0:
        return None
    return float(brain.mean()) / float(sigma)


def air_values(img: np.ndarray, brain: np.ndarray | None = None) -> np.ndarray:
    """Voxel values outside the (dilated) head, on a subsampled copy for large volumes.

    The head is the Otsu head mask filled slice by slice as well (a head cut by the field of
    view, as in an axial slab, is open at that face and 3D filling alone leaves its inside,
    the brain included, counted as air) and joined with ``brain`` (a mask on ``img``'s grid)
    when given."""
    from scipy import ndimage as ndi

    from volseg.transforms.functional import head_mask

    step = 2 if min(img.shape) >= 64 else 1
    head = head_mask(img, step=step, fill_slices=True)
    if brain is not None:
        head |= np.asarray(brain[::step, ::step, ::step], bool)
    head = ndi.binary_dilation(head, iterations=2)
    return img[::step, ::step, ::step][~head]


def qc_measures(res) -> dict:
    """Brain volume, SNR, the self-QC measures and QC notes (plus the anomaly numbers when that
    stage ran).

    ``res`` is a :class:`~volseg.cohort.stages.ScanResult`: ``meta`` (zooms, affine, header
    warnings), ``prep.native`` (the N4-corrected image), ``mask``, ``anomaly`` (either may be
    None) and ``grid_qc`` (the strip network's own measures,
    :func:`volseg.strip.infer.predict_grid_batch_qc`; may be missing). The self-QC measures
    and their reasons: :mod:`volseg.cohort.selfqc`; ``qc`` is ``check`` when a header warning
    or any reason fired, each named in ``qc_notes``.
    """
    meta = res.meta
    vox_ml = float(np.prod(meta.zooms)) / 1000.0
    out: dict = {"qc_notes": list(meta.header_warnings)}
    img = res.prep.native
    if res.mask is not None:
        from volseg.cohort.selfqc import self_qc

        affine = getattr(meta, "affine", None)
        if affine is None:  # a bare geometry: axis-aligned at the voxel sizes
            affine = np.diag(list(meta.zooms) + [1.0])
        sq = self_qc(img, res.mask, affine, meta.zooms, prediction=getattr(res, "grid_qc", None))
        out.update(sq.measures)
        out["qc_notes"] += sq.notes
    if res.anomaly is not None:
        a = res.anomaly
        out["anomaly_score"] = round(float(a.score), 6)
        out["anomaly_flag"] = None if a.flag is None else bool(a.flag)  # None: not calibrated
        out["anomalous_volume_ml"] = round(float(np.asarray(a.mask).sum()) * vox_ml, 2)
    out["qc"] = "check" if out["qc_notes"] else "ok"
    return out
