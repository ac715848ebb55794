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
    box_of,
    field_gain,
    random_field,
    tensor_eval,
)

# Shapes (neck, face parts, head) are joined with a smooth maximum over this many mm.
BLEND_MM = 10.0
FAR = np.float32(-1e4)  # "depth" far outside every shape


@dataclass
class HeadModel:
    """A painted head on the model grid; NaN marks defaced voxels."""

    image: np.ndarray  # float32, MODEL_SHAPE
    lesion_box: np.ndarray | None  # uint8 on atlas.box, or None
    params: dict


class _Box:
    """A model-grid box: its slices and its voxels' MNI coordinates as broadcastable axes."""

    def __init__(self, lo_mm, hi_mm):
        self.sl, axes = box_of(lo_mm, hi_mm)
        self.x = axes[0][:, None, None]
        self.y = axes[1][None, :, None]
        self.z = axes[2][None, None, :]
        self.shape = tuple(len(a) for a in axes)

    def sub(self, lo_mm, hi_mm) -> tuple["_Box", tuple[slice, ...]]:
        """A box inside this one, with its slices relative to this box."""
        lo = np.maximum(lo_mm, [self.x.min(), self.y.min(), self.z.min()])
        hi = np.minimum(hi_mm, [self.x.max(), self.y.max(), self.z.max()])
        child = _Box(lo, np.maximum(hi, lo))
        local = tuple(slice(c.start - p.start, c.start - p.start + n)
                      for c, p, n in zip(child.sl, self.sl, child.shape))
        return child, local


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _rho(box: _Box, centre, semi) -> np.ndarray:
    """Normalised radius (1 on the surface) of an axis-aligned ellipsoid, over a box."""
    return np.sqrt(((box.x - centre[0]) / semi[0]) ** 2 + ((box.y - centre[1]) / semi[1]) ** 2
                   + ((box.z - centre[2]) / semi[2]) ** 2)


def _smax(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth maximum (polynomial, blending over ``k``): fills the crease where shapes meet."""
    h = np.clip(0.5 + 0.5 / k * (a - b), 0.0, 1.0)
    return b + (a - b) * h + k * h * (1.0 - h)


def _ellipsoid(box: _Box, centre, semi, pad: float = 1.0):
    """Slices (relative to ``box``) of the sub-box around an ellipsoid, that sub-box, and the
    ellipsoid's normalised radius there."""
    child, local = box.sub(np.subtract(centre, semi) - pad, np.add(centre, semi) + pad)
    return local, child, _rho(child, centre, semi)


def draw_tissues(rng: np.random.Generator) -> dict[str, float]:
    """Random T1-weighted tissue intensities, relative to white matter = 1."""
    t = {
        "wm": 1.0, "gm": _u(rng, 0.45, 0.8), "csf": _u(rng, 0.05, 0.35),
        "fat": _u(rng, 0.8, 1.5), "marrow": _u(rng, 0.35, 1.0), "bone": _u(rng, 0.0, 0.12),
        "muscle": _u(rng, 0.3, 0.6), "skin": _u(rng, 0.45, 0.85), "galea": _u(rng, 0.2, 0.45),
        "sclera": _u(rng, 0.3, 0.6), "lens": _u(rng, 0.4, 0.8), "air": _u(rng, 0.0, 0.04),
        "disc": _u(rng, 0.25, 0.5), "cord": _u(rng, 0.75, 0.95), "cartilage": _u(rng, 0.3, 0.6),
        "vessel": _u(rng, 0.0, 0.1) if rng.random() < 0.7 else _u(rng, 0.9, 1.4),
    }
    t["csf_out"] = t["csf"] * _u(rng, 0.8, 1.3)
    t["vitreous"] = t["csf"] * _u(rng, 0.6, 1.2)
    t["tongue"] = t["muscle"] * _u(rng, 0.9, 1.3)
    return t


def _brain(atlas: Atlas, rng: np.random.Generator, tis: dict) -> tuple[np.ndarray, dict]:
    """Template brain with a random contrast: a gamma curve mixed with a GM/WM/CSF relabelling
    (CSF is what the brain mask holds beyond GM and WM)."""
    gamma = _u(rng, 0.7, 1.5)
    alpha = _u(rng, 0.0, 1.0)
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
    csf = _u(rng, 1.0, 4.0) * s
    inner, outer = _u(rng, 0.8, 2.0) * s, _u(rng, 1.0, 2.5) * s
    skull = _u(rng, 4.0, 9.0) * s
    diploe = max(skull - inner - outer, 0.8 * s)
    galea, skin = _u(rng, 0.5, 1.5) * s, _u(rng, 1.0, 2.5) * s
    scalp = _u(rng, 3.0, 8.0) * s
    fat = max(scalp - galea - skin, 1.0 * s)
    temporal = _u(rng, 3.0, 9.0) * s
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
    sigma = _u(rng, 0.08, 0.22)
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


class _Painter:
    """Shared state to paint structures outside the skull into boxes of the head."""

    def __init__(self, atlas: Atlas, head: np.ndarray, q: np.ndarray, shell: dict, tis: dict):
        self.atlas, self.head, self.q, self.shell, self.tis = atlas, head, q, shell, tis

    def outside_skull(self, box: _Box, radius: str = "skull_out") -> np.ndarray:
        return self.q[box.sl] > LUT_PER_MM * self.shell[radius]

    def head_depth(self, box: _Box) -> np.ndarray:
        """Depth (mm) below the scalp surface of the layered head (negative outside it)."""
        level = self.atlas.temporal_level[box.sl]
        per_level = self.shell["temporal_muscle_mm"] / (TEMPORAL_LEVELS - 1)
        return self.shell["r_out"] + per_level * level - self.q[box.sl] / LUT_PER_MM

    def soft_tissue(self, rng, box: _Box, depth, skin, fat, fat_share) -> np.ndarray:
        """Skin, subcutaneous fat, then muscle with fat planes and pads (by depth)."""
        tex = random_field(rng, box.shape, 7.0)
        planes = np.clip(1.0 - np.abs(tex) / _u(rng, 0.08, 0.2), 0.0, 1.0)
        pads = np.clip((tex - fat_share) * 3.0, 0.0, 1.0)
        core = self.tis["muscle"] + (self.tis["fat"] - self.tis["muscle"]) * np.maximum(planes, pads)
        return np.where(depth < skin, np.float32(self.tis["skin"]),
                        np.where(depth < skin + fat, np.float32(self.tis["fat"]), core))


def _neck_depth(box: _Box, nk: dict) -> np.ndarray:
    """Depth (mm) inside the neck: an elliptic cylinder, tapering and domed at its top."""
    z = box.z
    t = np.clip((nk["z_top"] - 20.0 - z) / 70.0, 0.0, 1.0)
    ax = nk["ax_top"] + (nk["ax_bot"] - nk["ax_top"]) * t
    ay = nk["ay_top"] + (nk["ay_bot"] - nk["ay_top"]) * t
    dome = np.sqrt(np.clip(1.0 - ((z - nk["z_top"] + 30.0) / 30.0).clip(0, None) ** 2, 1e-3, 1.0))
    ax, ay = ax * dome, ay * dome
    yc = nk["y_centre"] + nk["tilt"] * (nk["z_top"] - z)
    rho = np.sqrt((box.x / ax) ** 2 + ((box.y - yc) / ay) ** 2)
    return (1.0 - rho) * np.minimum(ax, ay)


def _paint_neck(p: _Painter, rng: np.random.Generator, scale: float) -> dict:
    s = 1.0 / scale
    _, cy, cz = p.atlas.cord_top
    nk = {"z_top": _u(rng, -40.0, -25.0), "y_centre": cy + _u(rng, 12.0, 24.0),
          "tilt": _u(rng, -0.05, 0.15), "ax_top": _u(rng, 55, 65) * s, "ax_bot": _u(rng, 42, 52) * s,
          "ay_top": _u(rng, 52, 62) * s, "ay_bot": _u(rng, 45, 55) * s,
          "skin": _u(rng, 1.0, 2.5) * s, "fat": _u(rng, 3.0, 10.0) * s,
          "fat_share": _u(rng, 0.5, 1.5)}
    half_x = max(nk["ax_top"], nk["ax_bot"]) + 2
    half_y = max(nk["ay_top"], nk["ay_bot"]) + 2
    y_lo = nk["y_centre"] - half_y + min(0.0, nk["tilt"] * 200)
    y_hi = nk["y_centre"] + half_y + max(0.0, nk["tilt"] * 200)
    box = _Box((-half_x, y_lo, -170.0), (half_x, y_hi, nk["z_top"]))
    head_depth = p.head_depth(box)
    depth = _smax(_neck_depth(box, nk), head_depth, BLEND_MM)
    paint = (depth > 0) & (depth > head_depth + 1e-3) & p.outside_skull(box)
    tissue = p.soft_tissue(rng, box, depth, nk["skin"], nk["fat"], nk["fat_share"])
    sub = p.head[box.sl]
    sub[paint] = tissue[paint]

    # Cervical spine, vessels and airway, below the foramen magnum (replacing skull base).
    sp = {"canal": (_u(rng, 8, 10) * s, _u(rng, 7, 9) * s),
          "cord": (_u(rng, 5, 6.5) * s, _u(rng, 4, 5) * s),
          "body": (_u(rng, 8, 11) * s, _u(rng, 7, 9) * s), "period": _u(rng, 15, 19) * s,
          "phase": _u(rng, 0, 19), "disc": _u(rng, 3.5, 6) * s,
          "airway": (_u(rng, 6, 11) * s, _u(rng, 4, 8) * s), "lordosis": _u(rng, 0.0, 0.25)}
    box = _Box((-45.0, cy - 40.0, -170.0), (45.0, cy + 70.0, cz + 6.0))
    sub = p.head[box.sl]
    yc = cy + sp["lordosis"] * np.clip(cz - box.z, 0, None)
    phase = (cz - 12.0 - box.z + sp["phase"]) % sp["period"]
    body = np.sqrt((box.x / sp["body"][0]) ** 2 + ((box.y - yc - 17 * s) / sp["body"][1]) ** 2)
    arch = np.sqrt((box.x / (14 * s)) ** 2 + ((box.y - yc + 14 * s) / (5 * s)) ** 2)
    below = box.z < cz - 10.0
    inside = (body < 1.0) & below
    sub[inside] = np.where(body < 0.8, np.where(phase < sp["disc"], p.tis["disc"], p.tis["marrow"]),
                           p.tis["bone"])[inside]
    inside = (arch < 1.0) & below & (phase > sp["disc"] + 2.0 * s)
    sub[inside] = np.where(arch < 0.6, p.tis["marrow"], p.tis["bone"])[inside]
    for side in (-1.0, 1.0):
        vessel = ((box.x - side * 21 * s) / (4 * s)) ** 2 + ((box.y - yc - 30 * s) / (4 * s)) ** 2 < 1
        sub[vessel & below] = p.tis["vessel"]
    airway = (box.x / sp["airway"][0]) ** 2 + ((box.y - yc - 38 * s) / sp["airway"][1]) ** 2 < 1.0
    sub[airway & (box.z < cz - 5.0)] = p.tis["air"]
    canal = (box.x / sp["canal"][0]) ** 2 + ((box.y - yc) / sp["canal"][1]) ** 2
    cord = (box.x / sp["cord"][0]) ** 2 + ((box.y - yc) / sp["cord"][1]) ** 2
    inside = (canal < 1.0) & (box.z < cz + 6.0)
    sub[inside] = np.where(cord < 1.0, p.tis["cord"], p.tis["csf_out"])[inside]
    return {**nk, **{k: v for k, v in sp.items() if not isinstance(v, tuple)}}


def _place_eyes(atlas: Atlas, rng: np.random.Generator, scale: float, shell: dict) -> dict:
    """Eye globes anterior-inferior to the frontal lobes, moved down until clear of the brain.

    The orbit's roof is thin: the globe only has to clear the CSF and the inner table
    (``shell["orbit_roof"]``), and the orbit is carved through the rest of the skull.
    """
    radius = _u(rng, 11.0, 12.8) / scale
    x, y, z = _u(rng, 29, 35), _u(rng, 54, 62), _u(rng, -40, -32)
    need = radius + shell["orbit_roof"] + 1.0
    top = np.array(MODEL_SHAPE) - 1
    for _ in range(40):
        ijk = [np.clip(np.round(np.array([sx, y, z]) - MODEL_MIN).astype(int), 0, top)
               for sx in (-x, x)]
        dists = [atlas.dist[tuple(i)] for i in ijk]
        if min(dists) >= need:
            break
        y, z = y + 0.4, z - 1.0
    return {"radius": radius, "x": x, "y": y, "z": z}


def _paint_face(p: _Painter, rng: np.random.Generator, scale: float, eyes: dict, neck: dict) -> dict:
    s = 1.0 / scale
    r, xe, ye, ze = eyes["radius"], eyes["x"], eyes["y"], eyes["z"]
    ax, ay, az = _u(rng, 54, 62) * s, _u(rng, 48, 56) * s, _u(rng, 36, 44) * s
    zc = ze - _u(rng, 8, 16)
    lid = _u(rng, 1.0, 4.0)
    # The midface passes just in front of the corneas.
    yc = ye + r + lid - ay * np.sqrt(max(1.0 - (xe / ax) ** 2 - ((ze - zc) / az) ** 2, 0.05))
    mid = ((0.0, yc, zc), (ax, ay, az))
    jaw = ((0.0, yc - _u(rng, 4, 12), zc - _u(rng, 38, 48)),
           (_u(rng, 44, 52) * s, _u(rng, 42, 50) * s, _u(rng, 24, 30) * s))
    zn = ze - _u(rng, 6, 12)
    y_front = yc + ay * np.sqrt(max(1.0 - ((zn - zc) / az) ** 2, 0.05))
    nose = ((0.0, y_front - 4.0, zn),
            (_u(rng, 9, 13) * s, _u(rng, 12, 18) * s, _u(rng, 18, 24) * s))
    parts = (mid, jaw, nose)
    lo = np.min([np.subtract(c, semi) for c, semi in parts], axis=0) - BLEND_MM / 2
    hi = np.max([np.add(c, semi) for c, semi in parts], axis=0) + BLEND_MM / 2
    box = _Box(lo, hi)
    face = np.full(box.shape, FAR, dtype=np.float32)
    for centre, semi in parts:
        local, _, rho = _ellipsoid(box, centre, semi, pad=BLEND_MM / 2)
        face[local] = _smax((1.0 - rho) * min(semi), face[local], BLEND_MM)
    # The neck only matters at the back of the face.
    neck_front = neck["y_centre"] + max(neck["ay_top"], neck["ay_bot"]) + abs(neck["tilt"]) * 150
    child, local = box.sub(lo, (hi[0], neck_front + BLEND_MM, neck["z_top"]))
    neck_depth = np.full(box.shape, FAR, dtype=np.float32)
    neck_depth[local] = _neck_depth(child, neck)
    head_depth = p.head_depth(box)
    depth = _smax(_smax(face, neck_depth, BLEND_MM), head_depth, BLEND_MM)
    paint = ((depth > 0) & (depth > head_depth + 1e-3) & (face + BLEND_MM / 4 >= neck_depth)
             & p.outside_skull(box))
    skin, fat = _u(rng, 1.0, 2.5) * s, _u(rng, 4.0, 12.0) * s
    tissue = p.soft_tissue(rng, box, depth, skin, fat, _u(rng, 0.2, 1.0))
    t = p.tis
    # Maxillary sinuses (air with a bony rim) below the eyes.
    for side in (-1.0, 1.0):
        centre = (side * _u(rng, 21, 27), ye - _u(rng, 4, 10), ze - _u(rng, 20, 26))
        local, _, rho = _ellipsoid(box, centre, (_u(rng, 8, 12) * s, _u(rng, 11, 15) * s,
                                              _u(rng, 10, 14) * s), pad=3.0)
        tissue[local] = np.where(rho < 1.0, t["air"], np.where(rho < 1.15, t["bone"], tissue[local]))
    # Nasal cavity: air between turbinates, above a bony palate.
    local, _, rho = _ellipsoid(box, (0.0, ye - 2.0, ze - 14.0), (_u(rng, 7, 10) * s, 24 * s, 15 * s))
    turbinates = np.abs(random_field(rng, rho.shape, 5.0)) < 0.35
    tissue[local] = np.where((rho < 1.0) & ~turbinates, t["air"], tissue[local])
    z_palate = ze - 14.0 - 15 * s
    local, _, rho = _ellipsoid(box, (0.0, ye - 8.0, z_palate - 2.0), (22 * s, 26 * s, 2.5 * s))
    tissue[local] = np.where(rho < 1.0, np.where(rho < 0.5, t["marrow"], t["bone"]), tissue[local])
    # Tongue under the palate, sometimes with air in the mouth above it.
    local, _, rho = _ellipsoid(box, (0.0, ye - 8.0, z_palate - 18 * s), (22 * s, 30 * s, 15 * s))
    tissue[local] = np.where(rho < 1.0, t["tongue"], tissue[local])
    if rng.random() < 0.5:
        local, _, rho = _ellipsoid(box, (0.0, ye - 10.0, z_palate - 4.5 * s),
                                   (18 * s, 22 * s, 2.0 * s))
        tissue[local] = np.where(rho < 1.0, t["air"], tissue[local])
    # Mandible: a horseshoe of cortical bone and marrow inside the jaw's outline, open at
    # the back, from the chin's lower border up to the teeth.
    (jx, jy, jz), (sx, sy, sz) = jaw
    child, local = box.sub((jx - sx, jy - 15 * s, jz - sz + 3 * s), (jx + sx, jy + sy, jz + 10 * s))
    ring = (1.0 - np.sqrt((child.x / sx) ** 2 + ((child.y - jy) / sy) ** 2)) * min(sx, sy)
    inner, outer = skin + fat, skin + fat + _u(rng, 5.0, 8.0) * s
    bone = (ring > inner) & (ring < outer)
    marrow = np.abs(ring - (inner + outer) / 2) < (outer - inner) / 4
    tissue[local] = np.where(bone, np.where(marrow, t["marrow"], t["bone"]), tissue[local])
    sub = p.head[box.sl]
    sub[paint] = tissue[paint]
    return {"midface_centre": [0.0, float(yc), float(zc)], "jaw_centre": list(jaw[0]),
            "nose_centre": list(nose[0])}


def _paint_ears(p: _Painter, rng: np.random.Generator, scale: float) -> dict:
    """Ears: plates of cartilage under skin, rooted on the side of the head, leaning back."""
    s = 1.0 / scale
    y_root, z_c = _u(rng, -26, -14), _u(rng, -34, -22)
    half_z, reach = _u(rng, 24, 31) * s, _u(rng, 10, 18) * s
    thick, lean = _u(rng, 3.0, 5.0) * s, _u(rng, 1.0, 2.0)  # lean: mm back per mm out
    for side in (-1.0, 1.0):
        lo_x, hi_x = (20.0, 112.0) if side > 0 else (-112.0, -20.0)
        box = _Box((lo_x, y_root - reach * lean - thick - 1, z_c - half_z),
                   (hi_x, y_root + thick + 1, z_c + half_z))
        sub = p.head[box.sl]
        outward = sub if side > 0 else sub[::-1]  # axis 0 now runs away from the midline
        empty = outward == 0
        first = np.where(empty.any(axis=0), np.argmax(empty, axis=0), -1)[None]  # head surface
        step = np.arange(outward.shape[0])[:, None, None] - first
        height = reach * np.sqrt(np.clip(1.0 - ((box.z - z_c) / half_z) ** 2, 0.0, 1.0))
        offset = np.abs(box.y - (y_root - step * lean))
        ear = (first >= 0) & (step >= 0) & (step <= height) & (offset < thick / 2) & empty
        core = ear & (offset < thick / 2 - 1.2 * s) & (step >= 1) & (step <= height - 1)
        outward[ear] = p.tis["skin"]
        outward[core] = p.tis["cartilage"]
    return {"root_mm": [y_root, z_c], "height_mm": 2 * half_z * scale, "reach_mm": reach * scale}


def _paint_eyes(p: _Painter, eyes: dict) -> None:
    r = eyes["radius"]
    for side in (-1.0, 1.0):
        xe, ye, ze = side * eyes["x"], eyes["y"], eyes["z"]
        orbit_c = (xe + side * 2.0, ye - 10.0, ze)
        orbit_s = (r + 6.0, r + 16.0, r + 5.0)
        box = _Box(np.subtract(orbit_c, orbit_s) - 3, np.add(orbit_c, orbit_s) + 3)
        sub = p.head[box.sl]
        outside = p.outside_skull(box, "orbit_roof")
        orbit = _rho(box, orbit_c, orbit_s)
        globe = _rho(box, (xe, ye, ze), (r, r, r))
        wall = outside & (orbit >= 1.0) & (orbit < 1.0 + 2.5 / min(orbit_s)) & (box.y < ye)
        sub[wall] = p.tis["bone"]
        fat = outside & (orbit < 1.0) & (box.y < ye + 0.3 * r) & (globe >= 1.0)
        sub[fat] = p.tis["fat"]
        # Optic nerve: a 2.5 mm tube from the back of the globe towards the chiasm.
        a = np.array([xe, ye - r, ze])
        ab = np.array([xe * 0.45, ye - r - 30.0, ze + 8.0]) - a
        t = np.clip(((box.x - a[0]) * ab[0] + (box.y - a[1]) * ab[1] + (box.z - a[2]) * ab[2])
                    / float(ab @ ab), 0.0, 1.0)
        dist2 = ((box.x - a[0] - t * ab[0]) ** 2 + (box.y - a[1] - t * ab[1]) ** 2
                 + (box.z - a[2] - t * ab[2]) ** 2)
        sub[fat & (dist2 < 2.5**2)] = p.tis["cord"] * 0.8
        ball = outside & (globe < 1.0)
        lens = _rho(box, (xe, ye + r - 3.5, ze), (4.5, 2.0, 4.5)) < 1.0
        sub[ball] = np.where(lens, p.tis["lens"],
                             np.where(globe > 1.0 - 1.0 / r, p.tis["sclera"], p.tis["vitreous"]))[ball]


def _deface(p: _Painter, rng: np.random.Generator, eyes: dict) -> dict:
    """Set an anterior-inferior wedge to NaN (zeros in the final image), sparing the skull."""
    y0, z0 = eyes["y"] - _u(rng, 0, 20), eyes["z"] + _u(rng, 10, 25)
    phi = np.radians(_u(rng, 25, 60))
    box = _Box((-120.0, y0 - 40.0, -170.0), (120.0, 130.0, z0 + _u(rng, 0, 15)))
    plane = (np.cos(phi) * (box.y - y0) - np.sin(phi) * (box.z - z0)) > 0
    cut = plane & (p.q[box.sl] > LUT_PER_MM * (p.shell["skull_out"] + 2.0))
    p.head[box.sl][cut] = np.nan
    return {"plane_point_mm": [0.0, y0, z0], "plane_angle_deg": float(np.degrees(phi))}


def _lesions(atlas: Atlas, rng: np.random.Generator, brain: np.ndarray, scale: float):
    """1-4 soft-edged ellipsoids inside the brain, hyper- or hypointense, some textured."""
    from scipy.spatial.transform import Rotation

    mask = np.zeros(brain.shape, dtype=np.uint8)
    found = []
    for _ in range(int(rng.integers(1, 5))):
        radii = _u(rng, 3.0, 15.0) * np.array([1.0, _u(rng, 0.6, 1.0), _u(rng, 0.6, 1.0)]) / scale
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
        soft = _u(rng, 0.15, 0.5)
        w = np.clip((1.0 - rho) / soft, 0.0, 1.0)
        w = (w * w * (3.0 - 2.0 * w) * atlas.brain_box[sl]).astype(np.float32)
        kind = "hyper" if rng.random() < 0.5 else "hypo"
        factor = _u(rng, 1.3, 1.9) if kind == "hyper" else _u(rng, 0.15, 0.65)
        textured = bool(rng.random() < 0.4)
        gain = np.float32(factor)
        if textured:
            gain = factor * (1.0 + _u(rng, 0.15, 0.4) * random_field(rng, w.shape, 2.5))
        brain[sl] *= 1.0 + w * (gain - 1.0)
        mask[sl] |= (w > 0.5).astype(np.uint8)
        centre_mm = centre + [b.start for b in atlas.box] + MODEL_MIN
        found.append({"centre_mni_mm": centre_mm.tolist(),
                      "radii_mm": (radii * scale).round(2).tolist(),
                      "kind": kind, "factor": factor, "textured": textured})
    return mask, found


def build_head(atlas: Atlas, rng: np.random.Generator, scale: float, deface_rng=None,
               lesion_rng=None) -> HeadModel:
    """Paint a head on the model grid. ``scale`` is the subject's size relative to MNI."""
    tis = draw_tissues(rng)
    brain, contrast = _brain(atlas, rng, tis)
    head, q, shell = _layers(atlas, rng, tis, scale)
    painter = _Painter(atlas, head, q, shell, tis)
    eyes = _place_eyes(atlas, rng, scale, shell)
    neck = _paint_neck(painter, rng, scale)
    face = _paint_face(painter, rng, scale, eyes, neck)
    ears = _paint_ears(painter, rng, scale)
    _paint_eyes(painter, eyes)
    deface = _deface(painter, deface_rng, eyes) if deface_rng is not None else None
    lesion_box, found = None, []
    if lesion_rng is not None:
        lesion_box, found = _lesions(atlas, lesion_rng, brain, scale)
    head[atlas.box] = np.where(atlas.brain_box, brain, head[atlas.box])
    params = {"tissues": tis, "contrast": contrast,
              "layers": {k: v for k, v in shell.items() if k.endswith("mm") or k.endswith("std")},
              "eyes": eyes, "ears": ears, "neck": neck, "face": face, "deface": deface,
              "lesions": found}
    return HeadModel(image=head, lesion_box=lesion_box, params=params)
