"""The head outside the skull: neck with spine and airway, face (nose, sinuses, palate, tongue,
mandible), ears, eyes in fat-filled orbits, and defacing."""

from __future__ import annotations

import numpy as np

from volseg.synth.atlas import (
    LUT_PER_MM,
    MODEL_MIN,
    MODEL_SHAPE,
    TEMPORAL_LEVELS,
    Atlas,
    random_field,
)

from volseg.synth.shapes import BLEND_MM, FAR, Box, ellipsoid, radius, smax, uniform


class Painter:
    """Shared state to paint structures outside the skull into boxes of the head."""

    def __init__(self, atlas: Atlas, head: np.ndarray, q: np.ndarray, shell: dict, tis: dict):
        self.atlas, self.head, self.q, self.shell, self.tis = atlas, head, q, shell, tis

    def outside_skull(self, box: Box, radius: str = "skull_out") -> np.ndarray:
        return self.q[box.sl] > LUT_PER_MM * self.shell[radius]

    def head_depth(self, box: Box) -> np.ndarray:
        """Depth (mm) below the scalp surface of the layered head (negative outside it)."""
        level = self.atlas.temporal_level[box.sl]
        per_level = self.shell["temporal_muscle_mm"] / (TEMPORAL_LEVELS - 1)
        return self.shell["r_out"] + per_level * level - self.q[box.sl] / LUT_PER_MM

    def soft_tissue(self, rng, box: Box, depth, skin, fat, fat_share) -> np.ndarray:
        """Skin, subcutaneous fat, then muscle with fat planes and pads (by depth)."""
        tex = random_field(rng, box.shape, 7.0)
        planes = np.clip(1.0 - np.abs(tex) / uniform(rng, 0.08, 0.2), 0.0, 1.0)
        pads = np.clip((tex - fat_share) * 3.0, 0.0, 1.0)
        core = self.tis["muscle"] + (self.tis["fat"] - self.tis["muscle"]) * np.maximum(planes, pads)
        return np.where(depth < skin, np.float32(self.tis["skin"]),
                        np.where(depth < skin + fat, np.float32(self.tis["fat"]), core))


def _neck_depth(box: Box, nk: dict) -> np.ndarray:
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


def paint_neck(p: Painter, rng: np.random.Generator, scale: float) -> dict:
    s = 1.0 / scale
    _, cy, cz = p.atlas.cord_top
    nk = {"z_top": uniform(rng, -40.0, -25.0), "y_centre": cy + uniform(rng, 12.0, 24.0),
          "tilt": uniform(rng, -0.05, 0.15), "ax_top": uniform(rng, 55, 65) * s, "ax_bot": uniform(rng, 42, 52) * s,
          "ay_top": uniform(rng, 52, 62) * s, "ay_bot": uniform(rng, 45, 55) * s,
          "skin": uniform(rng, 1.0, 2.5) * s, "fat": uniform(rng, 3.0, 10.0) * s,
          "fat_share": uniform(rng, 0.5, 1.5)}
    half_x = max(nk["ax_top"], nk["ax_bot"]) + 2
    half_y = max(nk["ay_top"], nk["ay_bot"]) + 2
    y_lo = nk["y_centre"] - half_y + min(0.0, nk["tilt"] * 200)
    y_hi = nk["y_centre"] + half_y + max(0.0, nk["tilt"] * 200)
    box = Box((-half_x, y_lo, -170.0), (half_x, y_hi, nk["z_top"]))
    head_depth = p.head_depth(box)
    depth = smax(_neck_depth(box, nk), head_depth, BLEND_MM)
    paint = (depth > 0) & (depth > head_depth + 1e-3) & p.outside_skull(box)
    tissue = p.soft_tissue(rng, box, depth, nk["skin"], nk["fat"], nk["fat_share"])
    sub = p.head[box.sl]
    sub[paint] = tissue[paint]

    # Cervical spine, vessels and airway, below the foramen magnum (replacing skull base).
    sp = {"canal": (uniform(rng, 8, 10) * s, uniform(rng, 7, 9) * s),
          "cord": (uniform(rng, 5, 6.5) * s, uniform(rng, 4, 5) * s),
          "body": (uniform(rng, 8, 11) * s, uniform(rng, 7, 9) * s), "period": uniform(rng, 15, 19) * s,
          "phase": uniform(rng, 0, 19), "disc": uniform(rng, 3.5, 6) * s,
          "airway": (uniform(rng, 6, 11) * s, uniform(rng, 4, 8) * s), "lordosis": uniform(rng, 0.0, 0.25)}
    box = Box((-45.0, cy - 40.0, -170.0), (45.0, cy + 70.0, cz + 6.0))
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


def place_eyes(atlas: Atlas, rng: np.random.Generator, scale: float, shell: dict) -> dict:
    """Eye globes anterior-inferior to the frontal lobes, moved down until clear of the brain.

    The orbit's roof is thin: the globe only has to clear the CSF and the inner table
    (``shell["orbit_roof"]``), and the orbit is carved through the rest of the skull.
    """
    radius = uniform(rng, 11.0, 12.8) / scale
    x, y, z = uniform(rng, 29, 35), uniform(rng, 54, 62), uniform(rng, -40, -32)
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


def paint_face(p: Painter, rng: np.random.Generator, scale: float, eyes: dict, neck: dict) -> dict:
    s = 1.0 / scale
    r, xe, ye, ze = eyes["radius"], eyes["x"], eyes["y"], eyes["z"]
    ax, ay, az = uniform(rng, 54, 62) * s, uniform(rng, 48, 56) * s, uniform(rng, 36, 44) * s
    zc = ze - uniform(rng, 8, 16)
    lid = uniform(rng, 1.0, 4.0)
    # The midface passes just in front of the corneas.
    yc = ye + r + lid - ay * np.sqrt(max(1.0 - (xe / ax) ** 2 - ((ze - zc) / az) ** 2, 0.05))
    mid = ((0.0, yc, zc), (ax, ay, az))
    jaw = ((0.0, yc - uniform(rng, 4, 12), zc - uniform(rng, 38, 48)),
           (uniform(rng, 44, 52) * s, uniform(rng, 42, 50) * s, uniform(rng, 24, 30) * s))
    zn = ze - uniform(rng, 6, 12)
    y_front = yc + ay * np.sqrt(max(1.0 - ((zn - zc) / az) ** 2, 0.05))
    nose = ((0.0, y_front - 4.0, zn),
            (uniform(rng, 9, 13) * s, uniform(rng, 12, 18) * s, uniform(rng, 18, 24) * s))
    parts = (mid, jaw, nose)
    lo = np.min([np.subtract(c, semi) for c, semi in parts], axis=0) - BLEND_MM / 2
    hi = np.max([np.add(c, semi) for c, semi in parts], axis=0) + BLEND_MM / 2
    box = Box(lo, hi)
    face = np.full(box.shape, FAR, dtype=np.float32)
    for centre, semi in parts:
        local, _, rho = ellipsoid(box, centre, semi, pad=BLEND_MM / 2)
        face[local] = smax((1.0 - rho) * min(semi), face[local], BLEND_MM)
    # The neck only matters at the back of the face.
    neck_front = neck["y_centre"] + max(neck["ay_top"], neck["ay_bot"]) + abs(neck["tilt"]) * 150
    child, local = box.sub(lo, (hi[0], neck_front + BLEND_MM, neck["z_top"]))
    neck_depth = np.full(box.shape, FAR, dtype=np.float32)
    neck_depth[local] = _neck_depth(child, neck)
    head_depth = p.head_depth(box)
    depth = smax(smax(face, neck_depth, BLEND_MM), head_depth, BLEND_MM)
    paint = ((depth > 0) & (depth > head_depth + 1e-3) & (face + BLEND_MM / 4 >= neck_depth)
             & p.outside_skull(box))
    skin, fat = uniform(rng, 1.0, 2.5) * s, uniform(rng, 4.0, 12.0) * s
    tissue = p.soft_tissue(rng, box, depth, skin, fat, uniform(rng, 0.2, 1.0))
    t = p.tis
    # Maxillary sinuses (air with a bony rim) below the eyes.
    for side in (-1.0, 1.0):
        centre = (side * uniform(rng, 21, 27), ye - uniform(rng, 4, 10), ze - uniform(rng, 20, 26))
        local, _, rho = ellipsoid(box, centre, (uniform(rng, 8, 12) * s, uniform(rng, 11, 15) * s,
                                              uniform(rng, 10, 14) * s), pad=3.0)
        tissue[local] = np.where(rho < 1.0, t["air"], np.where(rho < 1.15, t["bone"], tissue[local]))
    # Nasal cavity: air between turbinates, above a bony palate.
    local, _, rho = ellipsoid(box, (0.0, ye - 2.0, ze - 14.0), (uniform(rng, 7, 10) * s, 24 * s, 15 * s))
    turbinates = np.abs(random_field(rng, rho.shape, 5.0)) < 0.35
    tissue[local] = np.where((rho < 1.0) & ~turbinates, t["air"], tissue[local])
    z_palate = ze - 14.0 - 15 * s
    local, _, rho = ellipsoid(box, (0.0, ye - 8.0, z_palate - 2.0), (22 * s, 26 * s, 2.5 * s))
    tissue[local] = np.where(rho < 1.0, np.where(rho < 0.5, t["marrow"], t["bone"]), tissue[local])
    # Tongue under the palate, sometimes with air in the mouth above it.
    local, _, rho = ellipsoid(box, (0.0, ye - 8.0, z_palate - 18 * s), (22 * s, 30 * s, 15 * s))
    tissue[local] = np.where(rho < 1.0, t["tongue"], tissue[local])
    if rng.random() < 0.5:
        local, _, rho = ellipsoid(box, (0.0, ye - 10.0, z_palate - 4.5 * s),
                                   (18 * s, 22 * s, 2.0 * s))
        tissue[local] = np.where(rho < 1.0, t["air"], tissue[local])
    # Mandible: a horseshoe of cortical bone and marrow inside the jaw's outline, open at
    # the back, from the chin's lower border up to the teeth.
    (jx, jy, jz), (sx, sy, sz) = jaw
    child, local = box.sub((jx - sx, jy - 15 * s, jz - sz + 3 * s), (jx + sx, jy + sy, jz + 10 * s))
    ring = (1.0 - np.sqrt((child.x / sx) ** 2 + ((child.y - jy) / sy) ** 2)) * min(sx, sy)
    inner, outer = skin + fat, skin + fat + uniform(rng, 5.0, 8.0) * s
    bone = (ring > inner) & (ring < outer)
    marrow = np.abs(ring - (inner + outer) / 2) < (outer - inner) / 4
    tissue[local] = np.where(bone, np.where(marrow, t["marrow"], t["bone"]), tissue[local])
    sub = p.head[box.sl]
    sub[paint] = tissue[paint]
    return {"midface_centre": [0.0, float(yc), float(zc)], "jaw_centre": list(jaw[0]),
            "nose_centre": list(nose[0])}


def paint_ears(p: Painter, rng: np.random.Generator, scale: float) -> dict:
    """Ears: plates of cartilage under skin, rooted on the side of the head, leaning back."""
    s = 1.0 / scale
    y_root, z_c = uniform(rng, -26, -14), uniform(rng, -34, -22)
    half_z, reach = uniform(rng, 24, 31) * s, uniform(rng, 10, 18) * s
    thick, lean = uniform(rng, 3.0, 5.0) * s, uniform(rng, 1.0, 2.0)  # lean: mm back per mm out
    for side in (-1.0, 1.0):
        lo_x, hi_x = (20.0, 112.0) if side > 0 else (-112.0, -20.0)
        box = Box((lo_x, y_root - reach * lean - thick - 1, z_c - half_z),
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


def paint_eyes(p: Painter, eyes: dict) -> None:
    r = eyes["radius"]
    for side in (-1.0, 1.0):
        xe, ye, ze = side * eyes["x"], eyes["y"], eyes["z"]
        orbit_c = (xe + side * 2.0, ye - 10.0, ze)
        orbit_s = (r + 6.0, r + 16.0, r + 5.0)
        box = Box(np.subtract(orbit_c, orbit_s) - 3, np.add(orbit_c, orbit_s) + 3)
        sub = p.head[box.sl]
        outside = p.outside_skull(box, "orbit_roof")
        orbit = radius(box, orbit_c, orbit_s)
        globe = radius(box, (xe, ye, ze), (r, r, r))
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
        lens = radius(box, (xe, ye + r - 3.5, ze), (4.5, 2.0, 4.5)) < 1.0
        sub[ball] = np.where(lens, p.tis["lens"],
                             np.where(globe > 1.0 - 1.0 / r, p.tis["sclera"], p.tis["vitreous"]))[ball]


def deface(p: Painter, rng: np.random.Generator, eyes: dict) -> dict:
    """Set an anterior-inferior wedge to NaN (zeros in the final image), sparing the skull."""
    y0, z0 = eyes["y"] - uniform(rng, 0, 20), eyes["z"] + uniform(rng, 10, 25)
    phi = np.radians(uniform(rng, 25, 60))
    box = Box((-120.0, y0 - 40.0, -170.0), (120.0, 130.0, z0 + uniform(rng, 0, 15)))
    plane = (np.cos(phi) * (box.y - y0) - np.sin(phi) * (box.z - z0)) > 0
    cut = plane & (p.q[box.sl] > LUT_PER_MM * (p.shell["skull_out"] + 2.0))
    p.head[box.sl][cut] = np.nan
    return {"plane_point_mm": [0.0, y0, z0], "plane_angle_deg": float(np.degrees(phi))}
