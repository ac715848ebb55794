"""Affine registration between two brains on the working grid (SimpleITK).

Both arrays lie on working grids (RAS-aligned, isotropic ``spacing_mm``, centred on the brain:
:class:`volseg.transforms.HeadGrid`), so registration works in grid millimetres with an
identity direction; the result maps *fixed* grid points to *moving* grid points. Used to bring
the MNI152 template (and maps made in its space) onto a subject's grid: the template-difference
baseline of the anomaly benchmark and the normative (template-location) residual statistics.
"""

from __future__ import annotations

import numpy as np


def _image(a: np.ndarray, spacing_mm: float):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(a, dtype=np.float32).transpose(2, 1, 0)))
    img.SetSpacing((float(spacing_mm),) * 3)
    return img


def register_affine(fixed: np.ndarray, moving: np.ndarray, spacing_mm: float = 2.0, fixed_mask=None,
                    iterations: int = 60, seed: int = 0, threads: int | None = None):
    """An affine transform taking ``fixed`` grid points (mm) to ``moving`` grid points.

    Mattes mutual information, moments initialisation, two levels (8 and 4 mm), regular-step
    gradient descent. Deterministic for a given ``seed`` and thread count.
    """
    import SimpleITK as sitk

    f, m = _image(fixed, spacing_mm), _image(moving, spacing_mm)
    init = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    if threads:
        reg.SetNumberOfThreads(int(threads))
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed)
    if fixed_mask is not None:
        reg.SetMetricFixedMask(sitk.Cast(_image(np.asarray(fixed_mask) > 0, spacing_mm), sitk.sitkUInt8))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=int(iterations),
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(init, inPlace=False)
    return reg.Execute(f, m)


def warp(moving: np.ndarray, transform, shape, spacing_mm: float = 2.0, order: int = 1, default: float = 0.0) -> np.ndarray:
    """``moving`` resampled onto a fixed grid of ``shape`` through ``transform``
    (from :func:`register_affine`); ``order`` 0 nearest, 1 linear."""
    import SimpleITK as sitk

    ref = sitk.Image([int(s) for s in shape], sitk.sitkFloat32)
    ref.SetSpacing((float(spacing_mm),) * 3)
    interp = sitk.sitkNearestNeighbor if order == 0 else sitk.sitkLinear
    out = sitk.Resample(_image(moving, spacing_mm), ref, transform, interp, float(default), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0).copy()


__all__ = ["register_affine", "warp"]
