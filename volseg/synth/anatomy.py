"""Paint one synthetic head on the model grid (MNI mm, 1 mm voxels, before any deformation).

Inside the template brain mask: the template T1 with a random contrast. Outside it, layers
drawn from a cached distance map (CSF, skull inner table, diploe, outer table, temporal
muscle, galea, fat, skin) with random thicknesses that also vary smoothly over the head.
Then a neck with a cervical spine and airway, a face (nose, sinuses, palate, tongue,
mandible), ears, two eyes in fat-filled orbits, optional defacing (NaN voxels, which the
acquisition turns into exact zeros) and optional lesions. Intensities are relative to white
matter = 1; lengths are drawn in world mm and divided by the subject's scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from volseg.synth.atlas import (
    LUT_LEN,
    LUT_PER_MM,
    MODEL_MIN,
    MODEL_SHAPE,
    TEMPORAL_LEVELS,
    Atlas,
    bspline_weights,
    field_gain,
    random_field,
    tensor_eval,
)

from volseg.synth.face import Painter, paint_ears, paint_eyes, paint_face, paint_neck, place_eyes
from volseg.synth.face import deface as paint_deface
from volseg.synth.shapes import uniform


@dataclass
class HeadModel:
    """A painted head on the model grid; NaN marks defaced voxels."""

    image: np.ndarray  # float32, MODEL_SHAPE
    lesion_box: np.ndarray | None  # uint8 on atlas.box, or None
    params: dict


# Tissue intensity ranges per contrast, relative to white matter = 1 (each drawn uniformly).
# "t1" is the default and keeps the draws of earlier versions bit for bit; "t2", "pd" and
# "flair" follow the usual ordering of those sequences (T2: CSF brightest, fat bright on fast
# spin echo, flow voids dark; FLAIR: CSF suppressed, grey matter above white; PD: little
# contrast, CSF slightly above grey matter); "any" gives every tissue an independent random
# level, as SynthStrip and SynthSeg do, so that no ordering of tissues can be relied on.
# The vessel draw is two-sided in T1 (flow void or enhancement): (lo, hi, p_low, lo2, hi2).
CONTRASTS = ("t1", "t2", "pd", "flair", "any")
_RANGES = {
    "t1": {
        "gm": (0.45, 0.8), "csf": (0.05, 0.35), "fat": (0.8, 1.5), "marrow": (0.35, 1.0),
        "bone": (0.0, 0.12), "muscle": (0.3, 0.6), "skin": (0.45, 0.85), "galea": (0.2, 0.45),
        "sclera": (0.3, 0.6), "lens": (0.4, 0.8), "air": (0.0, 0.04), "disc": (0.25, 0.5),
        "cord": (0.75, 0.95), "cartilage": (0.3, 0.6), "vessel": (0.0, 0.1, 0.7, 0.9, 1.4),
        "csf_out": (0.8, 1.3), "vitreous": (0.6, 1.2), "tongue": (0.9, 1.3),
    },
    "t2": {
        "gm": (1.2, 1.7), "csf": (2.0, 3.5), "fat": (0.9, 1.9), "marrow": (0.7, 1.6),
        "bone": (0.0, 0.1), "muscle": (0.35, 0.75), "skin": (0.7, 1.4), "galea": (0.3, 0.6),
        "sclera": (0.3, 0.6), "lens": (0.3, 0.7), "air": (0.0, 0.04), "disc": (1.0, 2.2),
        "cord": (0.9, 1.3), "cartilage": (0.6, 1.1), "vessel": (0.0, 0.1, 0.9, 0.0, 0.2),
        "csf_out": (0.85, 1.15), "vitreous": (0.9, 1.2), "tongue": (0.9, 1.4),
    },
    "pd": {
        "gm": (1.1, 1.35), "csf": (1.1, 1.7), "fat": (0.9, 1.5), "marrow": (0.8, 1.3),
        "bone": (0.0, 0.12), "muscle": (0.5, 0.85), "skin": (0.8, 1.3), "galea": (0.4, 0.7),
        "sclera": (0.4, 0.7), "lens": (0.4, 0.8), "air": (0.0, 0.04), "disc": (0.9, 1.5),
        "cord": (0.9, 1.1), "cartilage": (0.6, 1.0), "vessel": (0.0, 0.15, 0.9, 0.0, 0.3),
        "csf_out": (0.9, 1.1), "vitreous": (0.9, 1.1), "tongue": (0.9, 1.2),
    },
    "flair": {
        "gm": (1.1, 1.45), "csf": (0.05, 0.35), "fat": (0.8, 1.7), "marrow": (0.6, 1.4),
        "bone": (0.0, 0.1), "muscle": (0.3, 0.65), "skin": (0.6, 1.2), "galea": (0.3, 0.6),
        "sclera": (0.3, 0.6), "lens": (0.3, 0.7), "air": (0.0, 0.04), "disc": (0.7, 1.5),
        "cord": (0.85, 1.2), "cartilage": (0.5, 0.9), "vessel": (0.0, 0.1, 0.9, 0.0, 0.2),
        "csf_out": (0.8, 1.5), "vitreous": (0.6, 1.3), "tongue": (0.9, 1.3),
    },
}
_DERIVED = {"csf_out": "csf", "vitreous": "csf", "tongue": "muscle"}  # drawn as factors of these


def draw_tissues(rng: np.random.Generator, contrast: str = "t1") -> dict[str, float]:
    """Random tissue intensities of one contrast (:data:`CONTRASTS`), relative to white matter = 1.

    Every contrast takes the same number of draws from ``rng`` in the same order, so the rest of
    the anatomy (drawn from the same stream afterwards) does not depend on the contrast.
    """
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast {contrast!r} is not one of {', '.join(CONTRASTS)}")
    if contrast == "any":
        t = {"wm": 1.0}
        for key in _RANGES["t1"]:
            if key == "vessel":
                rng.random()
            # independent levels (no factors of other tissues); air and bone stay dark
            t[key] = uniform(rng, 0.0, 0.3) if key in ("air", "bone") else uniform(rng, 0.0, 2.0)
        return t
    ranges = _RANGES[contrast]
    t = {"wm": 1.0}
    for key, r in ranges.items():
        if key == "vessel":
            lo, hi, p_low, lo2, hi2 = r
            t[key] = uniform(rng, lo, hi) if rng.random() < p_low else uniform(rng, lo2, hi2)
        elif key in _DERIVED:
            t[key] = t[_DERIVED[key]] * uniform(rng, *r)
        else:
            t[key] = uniform(rng, *r)
    return t


def _brain(atlas: Atlas, rng: np.random.Generator, tis: dict, t1: bool = True) -> tuple[np.ndarray, dict]:
    """Template brain with a random contrast: a gamma curve of the T1 template mixed with a
    GM/WM/CSF relabelling (CSF is what the brain mask holds beyond GM and WM). Other contrasts
    than T1 (``t1=False``) are the relabelling alone: the label map with the drawn levels."""
    gamma = uniform(rng, 0.7, 1.5)
    alpha = uniform(rng, 0.0, 1.0)  # drawn for every contrast: the stream stays aligned
    if not t1:
        alpha = 0.0
    relabel = (tis["csf"] * atlas.brain_box + (tis["gm"] - tis["csf"]) * atlas.gm
               + (tis["wm"] - tis["csf"]) * atlas.wm)
    brain = alpha * np.power(atlas.t1, gamma, dtype=np.float32) + (1.0 - alpha) * relabel
    return brain.astype(np.float32), {"gamma": gamma, "gamma_weight": alpha}


def _layers(atlas: Atlas, rng: np.random.Generator, tis: dict, scale: float):
    """Skull and scalp layers from the distance to the brain, with smoothly varying thickness.

    Returns the layered head, the distance to the brain in look-up bins after the thickness
    variation (``q``, per voxel) and the layer radii (model mm).
    """
    s = 1.0 / scale
    csf = uniform(rng, 1.0, 4.0) * s
    inner, outer = uniform(rng, 0.8, 2.0) * s, uniform(rng, 1.0, 2.5) * s
    skull = uniform(rng, 4.0, 9.0) * s
    diploe = max(skull - inner - outer, 0.8 * s)
    galea, skin = uniform(rng, 0.5, 1.5) * s, uniform(rng, 1.0, 2.5) * s
    scalp = uniform(rng, 3.0, 8.0) * s
    fat = max(scalp - galea - skin, 1.0 * s)
    temporal = uniform(rng, 3.0, 9.0) * s
    values = np.array([tis["csf_out"], tis["bone"], tis["marrow"], tis["bone"], tis["muscle"],
                       tis["galea"], tis["fat"], tis["skin"], 0.0], dtype=np.float32)
    d = (np.arange(LUT_LEN) + 0.5) / LUT_PER_MM
    lut = np.zeros((TEMPORAL_LEVELS, LUT_LEN), dtype=np.float32)
    for lev in range(TEMPORAL_LEVELS):
        muscle = temporal * lev / (TEMPORAL_LEVELS - 1)
        edges = np.cumsum([csf, inner, diploe, outer, muscle, galea, fat, skin])
        row = values[np.searchsorted(edges, d, side="right")]
        lut[lev] = np.convolve(np.pad(row, 1, mode="edge"), [0.25, 0.5, 0.25], mode="valid")

    # Thickness varies smoothly over the head (log-std sigma): distances are divided by it.
    sigma = uniform(rng, 0.08, 0.22)
    weights = [bspline_weights(np.arange(n), 30.0)[0] for n in MODEL_SHAPE]
    coef = LUT_PER_MM * np.exp(-sigma / field_gain(weights)
                               * rng.standard_normal([w.shape[1] for w in weights]))
    q = tensor_eval(coef, weights)
    np.multiply(q, atlas.dist, out=q)
    np.minimum(q, LUT_LEN - 1, out=q)
    idx = q.astype(np.int16)
    idx += atlas.lut_row
    head = lut.ravel().take(idx)
    shell = {"csf_mm": csf, "skull_mm": skull, "diploe_mm": diploe, "scalp_mm": scalp,
             "temporal_muscle_mm": temporal, "thickness_log_std": sigma,
             "skull_out": csf + skull, "orbit_roof": csf + inner + 1.0,
             "r_out": csf + skull + galea + fat + skin}
    return head, q, shell


def _lesions(atlas: Atlas, rng: np.random.Generator, brain: np.ndarray, scale: float):
    """1-4 soft-edged ellipsoids inside the brain, hyper- or hypointense, some textured."""
    from scipy.spatial.transform import Rotation

    mask = np.zeros(brain.shape, dtype=np.uint8)
    found = []
    for _ in range(int(rng.integers(1, 5))):
        radii = uniform(rng, 3.0, 15.0) * np.array([1.0, uniform(rng, 0.6, 1.0), uniform(rng, 0.6, 1.0)]) / scale
        cand = np.flatnonzero(atlas.depth_in.ravel() >= 0.5 * radii.max() + 2.0)
        centre = np.array(np.unravel_index(cand[rng.integers(len(cand))], brain.shape))
        quat = rng.standard_normal(4)
        rot = Rotation.from_quat(quat / np.linalg.norm(quat)).as_matrix()
        half = int(np.ceil(radii.max())) + 1
        lo = np.maximum(centre - half, 0)
        hi = np.minimum(centre + half + 1, brain.shape)
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        grid = np.stack(np.meshgrid(*[np.arange(a, b) - c for a, b, c in zip(lo, hi, centre)],
                                    indexing="ij"), axis=-1).astype(np.float32)
        rho = np.linalg.norm((grid @ rot) / radii, axis=-1)
        soft = uniform(rng, 0.15, 0.5)
        w = np.clip((1.0 - rho) / soft, 0.0, 1.0)
        w = (w * w * (3.0 - 2.0 * w) * atlas.brain_box[sl]).astype(np.float32)
        kind = "hyper" if rng.random() < 0.5 else "hypo"
        factor = uniform(rng, 1.3, 1.9) if kind == "hyper" else uniform(rng, 0.15, 0.65)
        textured = bool(rng.random() < 0.4)
        gain = np.float32(factor)
        if textured:
            gain = factor * (1.0 + uniform(rng, 0.15, 0.4) * random_field(rng, w.shape, 2.5))
        brain[sl] *= 1.0 + w * (gain - 1.0)
        mask[sl] |= (w > 0.5).astype(np.uint8)
        centre_mm = centre + [b.start for b in atlas.box] + MODEL_MIN
        found.append({"centre_mni_mm": centre_mm.tolist(),
                      "radii_mm": (radii * scale).round(2).tolist(),
                      "kind": kind, "factor": factor, "textured": textured})
    return mask, found


def build_head(atlas: Atlas, rng: np.random.Generator, scale: float, deface_rng=None,
               lesion_rng=None, contrast: str = "t1") -> HeadModel:
    """Paint a head on the model grid. ``scale`` is the subject's size relative to MNI;
    ``contrast`` one of :data:`CONTRASTS` (the anatomy does not depend on it)."""
    tis = draw_tissues(rng, contrast)
    brain, brain_contrast = _brain(atlas, rng, tis, t1=contrast == "t1")
    head, q, shell = _layers(atlas, rng, tis, scale)
    painter = Painter(atlas, head, q, shell, tis)
    eyes = place_eyes(atlas, rng, scale, shell)
    neck = paint_neck(painter, rng, scale)
    face = paint_face(painter, rng, scale, eyes, neck)
    ears = paint_ears(painter, rng, scale)
    paint_eyes(painter, eyes)
    deface = paint_deface(painter, deface_rng, eyes) if deface_rng is not None else None
    lesion_box, found = None, []
    if lesion_rng is not None:
        lesion_box, found = _lesions(atlas, lesion_rng, brain, scale)
    head[atlas.box] = np.where(atlas.brain_box, brain, head[atlas.box])
    params = {"tissues": tis, "contrast": dict(brain_contrast, sequence=contrast),
              "layers": {k: v for k, v in shell.items() if k.endswith("mm") or k.endswith("std")},
              "eyes": eyes, "ears": ears, "neck": neck, "face": face, "deface": deface,
              "lesions": found}
    return HeadModel(image=head, lesion_box=lesion_box, params=params)
