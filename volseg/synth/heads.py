"""Synthetic heads (T1-weighted by default) with brain masks: the public API of :mod:`volseg.synth`.

A subject is painted once on a 1 mm model grid in MNI space (:mod:`volseg.synth.anatomy`),
then "acquired": every output voxel (or, for thick slices, several points across the slice)
is mapped through the acquisition affine, the subject's pose (rotation, scaling) and a smooth
elastic displacement back to the model grid, and sampled there trilinearly with one
``torch.nn.functional.grid_sample`` call (about twice as fast on CPU as
``scipy.ndimage.map_coordinates``); the masks get a nearest-neighbour call inside the brain's
box. Thick slices average their points (partial volume). A bias field, Rician or Gaussian
noise and a scanner-like intensity scale follow.

Every random draw comes from ``numpy.random.default_rng`` streams spawned from the seed, one
stream per concern, so overriding the voxel size or orientation leaves the anatomy unchanged
and the same seed always gives bit-identical arrays.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass

import numpy as np

from volseg.io.image import MAX_ZOOM_MM, MIN_ZOOM_MM

log = logging.getLogger(__name__)

# Orientations seen in practice (nibabel RAS, FSL LAS, DICOM LPS, FreeSurfer LIA, sagittal
# and coronal acquisitions); the rest of the 48 are drawn too, less often.
COMMON_AXCODES = ("RAS", "LAS", "LPS", "LPI", "RPI", "LIA", "PIR", "ASL", "PSR", "RSA", "LSA", "AIL")
ALL_AXCODES = tuple(
    "".join(c) for perm in itertools.permutations((("L", "R"), ("P", "A"), ("I", "S")))
    for c in itertools.product(*perm)
)
OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
# Points per slice are at most this far apart (mm) when averaging thick slices.
SUBSLICE_MM = 1.5
STREAMS = ("anatomy", "acquisition", "elastic", "lesions", "deface", "noise")


@dataclass
class SynthSubject:
    """One synthetic head: T1 image, brain mask (skull-stripping label), optional lesions."""

    image: np.ndarray  # float32, 3D
    brain_mask: np.ndarray  # uint8 0/1, same shape
    lesion_mask: np.ndarray | None  # uint8 0/1 or None
    affine: np.ndarray  # 4x4 voxel -> world (mm)
    params: dict  # JSON-ready description of the random draws

    def meta(self, path: str = "<synth>", **header):
        """The image's geometry as a :class:`volseg.io.ImageMeta` (voxel sizes from the affine);
        ``header``: further ImageMeta fields (e.g. ``qform_code=1``)."""
        from volseg.io import ImageMeta

        zooms = tuple(float(z) for z in np.linalg.norm(self.affine[:3, :3], axis=0))
        return ImageMeta(path=str(path), affine=np.asarray(self.affine, dtype=float),
                         shape=tuple(self.image.shape), zooms=zooms, **header)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _log_u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def draw_acquisition(rng: np.random.Generator, voxel_size=None, axcodes=None, oblique=None) -> dict:
    """Random acquisition: grid, orientation, field of view, noise, bias, intensity scale.

    Everything is drawn before the overrides are applied, so an override never shifts the
    other draws.
    """
    three_d = rng.random() < 0.45
    slice_axis = int(rng.integers(3))
    if three_d:
        inplane = 1.0 if rng.random() < 0.5 else _u(rng, 0.75, 1.2)
        spacing = inplane * (1.0 if rng.random() < 0.6 else _u(rng, 1.0, 1.25))
        thickness = spacing
    else:
        inplane = _u(rng, 0.7, 1.2)
        spacing = _u(rng, 1.5, 6.0)
        thickness = spacing * _u(rng, 0.8, 1.0)
    zooms = [inplane] * 3
    zooms[slice_axis] = spacing
    codes = COMMON_AXCODES[rng.integers(len(COMMON_AXCODES))] if rng.random() < 0.6 \
        else ALL_AXCODES[rng.integers(len(ALL_AXCODES))]
    axis = rng.standard_normal(3)
    tilt = np.radians(_u(rng, 2.0, 15.0)) * axis / np.linalg.norm(axis)
    is_oblique = bool(rng.random() < 0.3)
    mode = str(rng.choice(["full", "deface", "crop"], p=[0.5, 0.25, 0.25]))
    margins = {
        "L": _u(rng, 28, 45), "R": _u(rng, 28, 45), "P": _u(rng, 25, 45),
        "A": _u(rng, 10, 25) if mode == "crop" else _u(rng, 30, 55),
        "S": _u(rng, -8, 0) if rng.random() < 0.05 else _u(rng, 10, 30),
        "I": _u(rng, 0, 15) if mode == "crop" else _u(rng, 15, 80),
    }
    acq = {
        "zooms": zooms, "slice_axis": slice_axis, "slice_thickness": thickness,
        "axcodes": codes, "oblique_rotvec": tilt.tolist() if is_oblique else None,
        "fov_mode": mode, "margins_mm": margins,
        "noise": "rician" if rng.random() < 0.65 else "gaussian", "snr": _log_u(rng, 8, 50),
        "bias_log_std": _u(rng, 0.1, 0.3), "max_value": _log_u(rng, 100, 4000),
        "integer": bool(rng.random() < 0.5),
    }
    if voxel_size is not None:
        zooms = [float(z) for z in np.broadcast_to(np.asarray(voxel_size, dtype=float), (3,))]
        if not all(MIN_ZOOM_MM <= z <= MAX_ZOOM_MM for z in zooms):
            raise ValueError(f"voxel_size {voxel_size!r} is outside {MIN_ZOOM_MM}-{MAX_ZOOM_MM} mm")
        acq["zooms"] = zooms
        acq["slice_axis"] = int(np.argmax(zooms))
        acq["slice_thickness"] = max(zooms)
    if axcodes is not None:
        acq["axcodes"] = _check_axcodes(axcodes)
    if oblique is not None:
        acq["oblique_rotvec"] = tilt.tolist() if oblique else None
    return acq


def _check_axcodes(axcodes) -> str:
    codes = "".join(axcodes).upper()
    if codes not in ALL_AXCODES:
        raise ValueError(f"axcodes {axcodes!r} is not an orientation like 'RAS' or 'LPI' "
                         "(one of L/R, one of A/P, one of S/I, in any order)")
    return codes


def draw_pose(rng: np.random.Generator) -> dict:
    """Head pose in the scanner: size relative to MNI, rotation (mostly pitch), shift."""
    return {
        "scale": _u(rng, 0.85, 0.97), "axis_scales": [_u(rng, 0.95, 1.05) for _ in range(3)],
        "rotation_deg": [_u(rng, -15, 15), _u(rng, -6, 6), _u(rng, -6, 6)],
        "shift_mm": [_u(rng, -15, 15) for _ in range(3)], "elastic_mm": _u(rng, 1.0, 3.0),
    }


def _pose_affine(pose: dict) -> np.ndarray:
    """MNI mm -> scanner world mm."""
    from scipy.spatial.transform import Rotation

    aff = np.eye(4)
    rot = Rotation.from_euler("xyz", pose["rotation_deg"], degrees=True).as_matrix()
    aff[:3, :3] = rot @ np.diag(pose["scale"] * np.asarray(pose["axis_scales"]))
    aff[:3, 3] = pose["shift_mm"]
    return aff


def _output_grid(atlas, pose_aff: np.ndarray, acq: dict) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of the acquisition grid: brain extent plus random margins."""
    from scipy.spatial.transform import Rotation

    from volseg.io import orientation_affine, voxel_to_world

    zooms = np.asarray(acq["zooms"], dtype=float)
    codes = acq["axcodes"]
    rot = np.eye(4)
    if acq["oblique_rotvec"] is not None:
        rot[:3, :3] = Rotation.from_rotvec(acq["oblique_rotvec"]).as_matrix()
    # Unit vectors of the voxel axes (columns), then the brain's extent along each.
    unit = (rot @ orientation_affine(codes, (1, 1, 1), np.ones(3)))[:3, :3]
    proj = voxel_to_world(pose_aff, atlas.boundary_points) @ unit
    lo = proj.min(axis=0) - [acq["margins_mm"][OPPOSITE[c]] for c in codes]
    hi = proj.max(axis=0) + [acq["margins_mm"][c] for c in codes]
    shape = tuple(int(n) for n in np.ceil((hi - lo) / zooms).astype(int) + 1)
    affine = rot @ orientation_affine(codes, shape, zooms)
    affine[:3, 3] += unit @ ((lo + hi) / 2.0)
    return shape, affine


def _sample_positions(shape, acq: dict) -> tuple[list[np.ndarray], int]:
    """Output-index positions sampled along each axis; thick slices get several points."""
    axis = acq["slice_axis"]
    thickness = acq["slice_thickness"]
    k = int(np.ceil(thickness / SUBSLICE_MM - 1e-6)) if thickness > SUBSLICE_MM else 1
    positions = [np.arange(n, dtype=np.float64) for n in shape]
    if k > 1:
        frac = thickness / acq["zooms"][axis]
        offsets = ((np.arange(k) + 0.5) / k - 0.5) * frac
        positions[axis] = (positions[axis][:, None] + offsets[None, :]).ravel()
    return positions, k


def _sampling_grid(to_model: np.ndarray, positions, zooms, elastic_mm: float,
                   rng: np.random.Generator) -> np.ndarray:
    """``torch.grid_sample`` grid (N0, N1, N2, 3) of the sample points: model-grid positions
    (affine plus elastic spline), normalised to [-1, 1], last axis in (z, y, x) order.

    The model's head-foot coordinate is clamped so the neck continues below the model grid.
    """
    from volseg.synth.atlas import MODEL_SHAPE, bspline_weights, field_gain, tensor_eval

    pairs = [bspline_weights(p, 32.0 / z) for p, z in zip(positions, zooms)]
    weights = [w for w, _ in pairs]
    knots = np.meshgrid(*[k for _, k in pairs], indexing="ij")
    noise = rng.standard_normal((3,) + knots[0].shape) * (elastic_mm / field_gain(weights))
    coef = np.empty(knots[0].shape + (3,), dtype=np.float64)
    for m in range(3):
        norm = 2.0 / (MODEL_SHAPE[m] - 1)
        coef[..., 2 - m] = norm * (to_model[m, 0] * knots[0] + to_model[m, 1] * knots[1]
                                   + to_model[m, 2] * knots[2] + to_model[m, 3] + noise[m]) - 1.0
    grid = tensor_eval(coef, weights)
    np.clip(grid[..., 0], -1.0, 1.0, out=grid[..., 0])  # model z (head-foot) is channel 0
    return grid


def _grid_sample(volume: np.ndarray, grid: np.ndarray, mode: str = "bilinear") -> np.ndarray:
    """Samples of a model-grid volume at a normalised grid (zeros outside)."""
    import torch

    with torch.no_grad():
        out = torch.nn.functional.grid_sample(
            torch.from_numpy(volume)[None, None], torch.from_numpy(grid)[None],
            mode=mode, padding_mode="zeros", align_corners=True)
    return out[0, 0].numpy()


def _average_slices(data: np.ndarray, axis: int, k: int) -> np.ndarray:
    if k == 1:
        return data
    shape = list(data.shape)
    shape[axis : axis + 1] = [shape[axis] // k, k]
    return data.reshape(shape).mean(axis=axis + 1, dtype=np.float32)


def _brain_window(atlas, to_model: np.ndarray, shape, pad_vox) -> tuple[slice, ...]:
    """Output-index box holding the brain (corners of its model box, padded)."""
    from volseg.io import voxel_to_world

    corners = np.array(list(itertools.product(*[(b.start, b.stop) for b in atlas.box])),
                       dtype=float)
    ijk = voxel_to_world(np.linalg.inv(to_model), corners)
    lo = np.clip(np.floor(ijk.min(axis=0) - pad_vox).astype(int), 0, shape)
    hi = np.clip(np.ceil(ijk.max(axis=0) + pad_vox).astype(int) + 1, 0, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _sample_labels(labels: np.ndarray, grid: np.ndarray, window, shape, axis: int, k: int):
    """Brain (label >= 1) and lesion (label 2) masks on the output grid.

    ``labels`` holds 0 outside the brain, 1 in it and 2 in lesions; it is sampled (nearest
    neighbour) inside ``window``, and thick slices keep a voxel when more than half of its
    points are inside (partial volume).
    """
    sample_window = list(window)
    sample_window[axis] = slice(window[axis].start * k, window[axis].stop * k)
    vals = _grid_sample(labels, grid[tuple(sample_window)], mode="nearest")
    brain = np.zeros(shape, dtype=np.uint8)
    lesion = np.zeros(shape, dtype=np.uint8)
    for out, level in ((brain, 0.5), (lesion, 1.5)):
        inside = vals > level
        out[window] = _average_slices(inside.astype(np.float32), axis, k) > 0.5 if k > 1 else inside
    return brain, lesion & brain


def synth_head(seed: int, lesions: bool = False, *, voxel_size=None, axcodes=None,
               oblique=None, contrast: str = "t1") -> SynthSubject:
    """A random synthetic head (deterministic by ``seed``) with its brain mask.

    ``voxel_size`` (one value or three, mm), ``axcodes`` (e.g. ``'RAS'``) and ``oblique``
    (True/False) override the random acquisition draws; the anatomy does not change with
    them. With ``lesions=True`` 1-4 lesions are added and returned in ``lesion_mask``.
    ``contrast`` paints the label map (brain tissues from the MNI152 maps, head layers, face,
    neck) with the tissue levels of ``'t1'`` (default), ``'t2'``, ``'pd'``, ``'flair'`` or
    ``'any'`` (independent random levels per tissue); the same seed gives the same anatomy,
    pose and acquisition in every contrast.

    Examples::

        subj = synth_head(3, voxel_size=(1, 1, 1), axcodes="RAS", oblique=False)
        subj.image.shape, subj.brain_mask.sum()
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    with _one_blas_thread():
        return _synthesise(int(seed), lesions, voxel_size, axcodes, oblique, contrast)


@contextlib.contextmanager
def _one_blas_thread():
    """Hold BLAS to one thread during a call, then restore it.

    The spline contractions are thin matrix products bound by memory; a second BLAS thread
    gains nothing and, on a machine whose cores are busy, spins: measured 2.7 s -> 1.5 s per
    subject with both cores loaded.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # an optional speed-up only
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _synthesise(seed: int, lesions: bool, voxel_size, axcodes, oblique, contrast: str) -> SynthSubject:
    from volseg.synth.anatomy import CONTRASTS, build_head
    from volseg.synth.atlas import bspline_weights, field_gain, load_atlas, tensor_eval

    if contrast not in CONTRASTS:
        raise ValueError(f"contrast {contrast!r} is not one of {', '.join(CONTRASTS)}")
    rngs = dict(zip(STREAMS, (np.random.default_rng(s)
                              for s in np.random.SeedSequence(seed).spawn(len(STREAMS)))))
    atlas = load_atlas()
    pose = draw_pose(rngs["anatomy"])
    acq = draw_acquisition(rngs["acquisition"], voxel_size, axcodes, oblique)
    model = build_head(atlas, rngs["anatomy"], pose["scale"],
                       deface_rng=rngs["deface"] if acq["fov_mode"] == "deface" else None,
                       lesion_rng=rngs["lesions"] if lesions else None, contrast=contrast)

    pose_aff = _pose_affine(pose)
    shape, affine = _output_grid(atlas, pose_aff, acq)
    positions, k = _sample_positions(shape, acq)
    axis = acq["slice_axis"]
    to_model = np.linalg.inv(atlas.affine) @ np.linalg.inv(pose_aff) @ affine
    grid = _sampling_grid(to_model, positions, acq["zooms"], pose["elastic_mm"], rngs["elastic"])
    image = _average_slices(_grid_sample(model.image, grid), axis, k)
    labels = atlas.mask
    if model.lesion_box is not None:
        labels = atlas.mask.copy()
        labels[atlas.box] += model.lesion_box
    pad = 4.0 * pose["elastic_mm"] / min(acq["zooms"]) + 2.0  # elastic shifts stay below 4 sd
    window = _brain_window(atlas, to_model, shape, pad)
    brain_mask, lesion_mask = _sample_labels(labels, grid, window, shape, axis, k)
    if model.lesion_box is None:
        lesion_mask = None
    del grid

    noise_rng = rngs["noise"]
    weights = [bspline_weights(np.arange(n), 64.0 / z)[0] for n, z in zip(shape, acq["zooms"])]
    coef = noise_rng.standard_normal([w.shape[1] for w in weights])
    bias = tensor_eval(np.exp(coef * (acq["bias_log_std"] / field_gain(weights))), weights)
    defaced = np.isnan(image)
    image = np.nan_to_num(image, nan=0.0) * bias
    sigma = np.float32(1.0 / acq["snr"])
    noise = noise_rng.standard_normal(shape, dtype=np.float32) * sigma
    if acq["noise"] == "rician":
        imag = noise_rng.standard_normal(shape, dtype=np.float32) * sigma
        image = np.sqrt((image + noise) ** 2 + imag**2)
    else:
        image = np.maximum(image + noise, 0.0)
    image[defaced] = 0.0
    image *= np.float32(acq["max_value"] / max(float(image.max()), 1e-6))
    if acq["integer"]:
        image = np.round(image)

    zooms = acq["zooms"]
    params = {
        "seed": int(seed), "lesions": bool(lesions), "contrast": contrast, "shape": list(shape),
        "voxel_size": [round(float(z), 4) for z in zooms], "orientation": acq["axcodes"],
        "oblique": acq["oblique_rotvec"] is not None, "slice_axis": axis,
        "slice_thickness": acq["slice_thickness"], "points_per_slice": k,
        "brain_volume_ml": float(brain_mask.sum() * np.prod(zooms) / 1000.0),
        "lesion_count": len(model.params["lesions"]), "acquisition": acq, "pose": pose,
        "anatomy": model.params,
    }
    return SynthSubject(image=image.astype(np.float32), brain_mask=brain_mask,
                        lesion_mask=lesion_mask, affine=affine, params=_jsonable(params))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    return obj
