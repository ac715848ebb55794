"""Self-QC: the measures that say which brain masks to distrust, each with its threshold.

:func:`self_qc` takes one scan as arrays (the N4-corrected native image, the brain mask, the
affine; optionally the strip network's working-grid probabilities) and returns its measures
and, for every measure past its threshold, a named reason and a sentence for ``qc_notes``.
:func:`volseg.cohort.qc.qc_measures` calls it for every scan of ``volseg run``. The intensity
measures run on a copy strided to about 2 mm voxels (the 5 mm and larger effects they look for
survive that; a 1 mm head takes about 0.5 s in all, two cores shared with a training job).

The thresholds were set on the good real scans of ``$VOLSEG_SHARED_DATA/wholehead`` (Colin27,
the open_ms patients, tiny_t1, the two unlabelled heads), each stripped by volseg, and checked
against bad versions of them (``scripts/bench_selfqc.py``, whose docstring has the numbers):
0 of 28 good cases flagged, 87 of 89 bad cases flagged with the right reason.

=============  =====================================================  ====================
reason         measure (record key)                                   fires when
=============  =====================================================  ====================
tta            ``qc_tta_dice``: Dice of the masks of the image and    < 0.95
               its left-right mirror image (mirrored back), 2 mm grid
uncertainty    ``qc_boundary_uncertainty``: grid voxels with          > 2.0
               0.1 < p < 0.9 per mask surface voxel
volume         ``brain_volume_ml``                                    outside 700-2200 mL
fov            ``qc_fov_cut_fraction``: the mask's largest section    > 0.10
               within 3 mm of a face of the volume, over its largest
               section across that axis; ``qc_fov_head_cm2``: the     > 100 cm2
               head's section on a face other than the inferior one
               where the mask comes within 3 mm of it
contrast       ``qc_t1_depth_mm``: mean depth (mm from the mask's     < 1.0 mm
               edge) of the brightest 30% of the brain minus that of
               the darkest 30%
bias           ``qc_bias_ratio``: range of a smooth field fitted to   > 1.25
               the log intensity of white-matter-like voxels
noise          ``qc_snr``: the larger of ``snr`` (brain mean over     < 15
               the air's noise) and ``qc_snr_brain`` (brain median
               over the noise measured inside the brain)
orientation    ``qc_orientation_margin``: correlation with the        < -0.03
               MNI152 brain as labelled minus that of the best
               rotation by quarter turns
edge           ``qc_edge_offset_mm``: where the intensity falls from  beyond +-2.5 mm
               brain to the dark CSF/skull, relative to the mask's
               edge (+: the edge sits inside the brain, eroded; -:
               outside it, grown)
=============  =====================================================  ====================

How each measure works, and why:

- **tta**, **uncertainty**: :mod:`volseg.strip.uncertainty`. Both are weak on their own (the
  network was trained on flipped, noisy and upside-down heads and stays confident on most
  of them) and fire on images unlike any head it has seen.
- **volume**: a brain mask (brain and the CSF inside it) of an adult is 1,100-1,800 mL
  (intracranial volume 1,200-1,700 mL, e.g. Buckner et al. 2004, NeuroImage 23:724); the
  range is wide enough for children from about two years and large heads, and catches masks
  that are a fraction of a brain or take in the neck.
- **fov**: a brain cut by the field of view ends in a large flat section on a face of the
  volume. The network often stops its mask a few millimetres short of a cut, so the sections
  within 3 mm of the face count, and where the head itself is cut across more than 100 cm2
  (a plane through the skull, not through the scalp over the vertex, the nose or the neck)
  and the mask reaches within 3 mm of it, the brain is cut too. The inferior face is left to
  the first test: every head is cut at the neck, and the brainstem runs on into it.
- **contrast**: in a T1 the brightest brain tissue is the white matter, deep inside the
  brain, and the darkest is the CSF, in the sulci at its surface (and the ventricles); in a
  T2, PD or FLAIR image, or an inverted one, the brightest tissue is CSF or grey matter
  and lies at the surface. Depth is the distance to the mask's edge.
- **bias**: white matter should be one intensity everywhere. The brightest 40% of the voxels
  at least 8 mm inside the mask (white matter in a T1) are fitted with a quadratic in
  position, four times, each time choosing them again on the corrected image; the measure is
  the ratio of the fitted field's 95th to 5th percentile over those voxels. After N4 the good
  shared scans read 1.02-1.08 (the MNI152 template itself 1.14), except open_ms patient01's
  two slabs at 1.18-1.22: there N4's own head mask is only the scalp (see
  :func:`volseg.transforms.functional.head_mask`'s ``fill_slices``) and N4 leaves a field. A
  field 1.6x across the brain without N4 reads 1.27-1.41.
- **noise**: ``snr`` of :mod:`volseg.cohort.qc` reads the noise in the air, which misleads
  where the air was zero-filled, masked or holds ghosts (Colin27's air gives an SNR of 4).
  ``qc_snr_brain`` reads it inside the brain instead: Immerkaer's (1996) Laplacian-difference
  kernel, in-plane, on the voxels at least 4 mm inside the mask, median absolute response
  (robust to the edges that pass through) over 0.6745 x 6. At coarse voxels the kernel also
  sees anatomy (the 4 mm tiny_t1 reads 6). Each estimate errs towards more noise, so the
  larger SNR is kept.
- **orientation**: the brain (N4 image inside the mask over its median, zero outside) is
  sampled on a 4 mm cube centred on its centroid and scaled to the MNI152 brain's volume, and
  correlated with the MNI152 2009 brain (nilearn) in all 24 orientations that quarter turns
  reach. When a turn fits better than the orientation the header gives, the label is doubtful.
  Left and right cannot be told apart this way (the brain is nearly symmetric); a left-right
  error goes unseen.
- **edge**: the intensity's median over shells of equal distance to the mask's edge (inside
  the brain median, then the dark trough of CSF and skull, then the scalp); the measure is
  where the profile falls half-way from the inside level to the trough. On a good mask that
  is within about 1 mm of the edge; a mask eroded by 5 mm finds it about 5 mm outside, a
  grown one about 5 mm inside. It needs a T1-like contrast and says nothing on others.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

# ---- thresholds (see the module docstring) ------------------------------------------------
TTA_DICE_MIN = 0.95
BOUNDARY_UNCERTAINTY_MAX = 2.0
BRAIN_ML_RANGE = (700.0, 2200.0)
FOV_SLAB_MM = 3.0
FOV_CUT_FRACTION_MAX = 0.10
FOV_HEAD_CM2_MAX = 100.0
T1_DEPTH_MM_MIN = 1.0
BIAS_RATIO_MAX = 1.25
SNR_MIN = 15.0
ORIENTATION_MARGIN_MIN = -0.03
EDGE_OFFSET_MM_MAX = 2.5

# ---- how the measures are taken -------------------------------------------------------------
WORK_MM = 2.0  # the intensity measures run on a copy strided to about this voxel size
CONTRAST_FRACTION = 0.30  # brightest / darkest share of the brain compared by depth
BIAS_MIN_DEPTH_MM = 8.0
BIAS_WM_PERCENTILE = 60.0  # white-matter-like: the brightest 40% (after correction)
BIAS_ITERATIONS = 4
BIAS_MAX_POINTS = 30_000
NOISE_MIN_DEPTH_MM = 4.0
IMMERKAER_MAD = 0.6745 * 6.0  # median |response| of the kernel per unit of noise sigma
ORIENT_CUBE = 48  # voxels per side of the cube the orientation is compared on
ORIENT_VOXEL_MM = 4.0
EDGE_RANGE_MM = 10.0

# The reasons, in the order their notes are listed.
REASONS = ("fov", "orientation", "contrast", "noise", "bias", "edge", "volume", "tta", "uncertainty")


@dataclass
class SelfQC:
    """The measures of one scan and the reasons (codes of :data:`REASONS`) that fired, each with
    its sentence for ``qc_notes``."""

    measures: dict = field(default_factory=dict)
    reasons: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def fire(self, reason: str, note: str) -> None:
        self.reasons.append(reason)
        self.notes.append(note)

    @property
    def qc(self) -> str:
        return "check" if self.reasons else "ok"


def self_qc(image, mask, affine, zooms=None, *, prob=None, prob_flip=None, prediction=None,
            head=None) -> SelfQC:
    """Every self-QC measure of one scan, and the reasons that fire.

    ``image``: the N4-corrected image on the native grid; ``mask``: the brain mask on that
    grid; ``affine``: its voxel-to-world (RAS mm) matrix; ``zooms``: voxel sizes (mm; default
    from the affine). ``prob`` and ``prob_flip``: the strip network's working-grid probability
    of the image and of its mirrored pass mirrored back (for ``tta`` and ``uncertainty``), or
    ``prediction``: those two measures already computed
    (:func:`volseg.strip.uncertainty.prediction_measures`). ``head``: the head (foreground) on
    the native grid, for the field-of-view test (default: the voxels above the image's Otsu
    threshold). A measure that cannot be taken is None and never fires.
    """
    from volseg.strip.uncertainty import prediction_measures

    img = np.asarray(image, dtype=np.float32)
    m = np.asarray(mask) > 0
    affine = np.asarray(affine, dtype=float)
    if zooms is None:
        zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    zooms = tuple(float(z) for z in zooms)
    if img.shape != m.shape:
        raise ValueError(f"self_qc: image {img.shape} and mask {m.shape} are not on one grid")
    out = SelfQC()
    ms = out.measures
    if prediction is None and prob is not None:
        prediction = prediction_measures(prob, prob_flip)
    prediction = prediction or {}
    ms["qc_tta_dice"] = prediction.get("tta_dice")
    ms["qc_boundary_uncertainty"] = prediction.get("boundary_uncertainty")
    vol = float(m.sum()) * float(np.prod(zooms)) / 1000.0
    ms["brain_volume_ml"] = round(vol, 1)
    if not m.any():
        ms["snr"] = None
        _judge(out)
        return out

    ms.update(fov_measures(img, m, affine, zooms, head))
    w = Working(img, m, affine, zooms)
    ms["qc_t1_depth_mm"] = _round(contrast_depth(w.img, w.mask, w.inside))
    ms["qc_bias_ratio"] = _round(bias_ratio(w.img, w.mask, w.zooms, w.inside), 3)
    ms.update(noise_measures(img, m, zooms, w))
    orient = orientation(w.img, w.mask, w.affine)
    ms["qc_orientation_margin"] = None if orient is None else _round(orient[0], 3)
    ms["qc_orientation_best"] = None if orient is None else orient[1]
    ms["qc_edge_offset_mm"] = _round(edge_offset(w.img, w.mask, w.zooms, w.inside, w.outside), 1)
    _judge(out)
    return out


def _judge(out: SelfQC) -> None:
    """Compare every measure with its threshold; add the reasons in :data:`REASONS` order."""
    ms = out.measures
    fired: dict[str, str] = {}
    if ms.get("qc_fov_cut_fraction") is not None and ms["qc_fov_cut_fraction"] > FOV_CUT_FRACTION_MAX:
        fired["fov"] = (f"brain cut by the field of view ({ms['qc_fov_face']} face: a section of "
                        f"{ms['qc_fov_cut_fraction']:.0%} of the brain's largest within {FOV_SLAB_MM:g} mm of it)")
    elif ms.get("qc_fov_head_cm2") is not None and ms["qc_fov_head_cm2"] > FOV_HEAD_CM2_MAX:
        fired["fov"] = (f"brain cut by the field of view ({ms['qc_fov_face']} face: the head is cut "
                        f"across {ms['qc_fov_head_cm2']:.0f} cm2 there and the mask reaches it)")
    margin = ms.get("qc_orientation_margin")
    if margin is not None and margin < ORIENTATION_MARGIN_MIN:
        fired["orientation"] = (f"orientation label doubtful: the brain matches the MNI152 brain "
                                f"better {ms['qc_orientation_best']} (by {-margin:.2f} in correlation)")
    depth = ms.get("qc_t1_depth_mm")
    if depth is not None and depth < T1_DEPTH_MM_MIN:
        fired["contrast"] = (f"intensity profile unlike a T1 (brightest tissue {depth:+.1f} mm deeper than "
                             f"the darkest, a T1 gives >= {T1_DEPTH_MM_MIN:g}): another contrast or inverted?")
    snr_used = ms.get("qc_snr")
    if snr_used is not None and snr_used < SNR_MIN:
        fired["noise"] = f"heavy noise (SNR {snr_used:.1f} < {SNR_MIN:g})"
    bias = ms.get("qc_bias_ratio")
    if bias is not None and bias > BIAS_RATIO_MAX:
        fired["bias"] = (f"strong residual bias field (white matter varies {bias:.2f}x across the brain, "
                         f"> {BIAS_RATIO_MAX:g}x): was N4 run?")
    edge = ms.get("qc_edge_offset_mm")
    if edge is not None and abs(edge) > EDGE_OFFSET_MM_MAX:
        how = "eroded: its edge lies inside the brain" if edge > 0 else "grown: its edge lies outside the brain"
        fired["edge"] = f"mask {how} (brain edge {abs(edge):.1f} mm {'outside' if edge > 0 else 'inside'} it)"
    lo, hi = BRAIN_ML_RANGE
    vol = ms.get("brain_volume_ml")
    if vol is not None and not lo <= vol <= hi:
        fired["volume"] = f"brain volume {vol:.0f} mL outside {lo:.0f}-{hi:.0f} mL"
    tta = ms.get("qc_tta_dice")
    if tta is not None and tta < TTA_DICE_MIN:
        fired["tta"] = f"network unsure: mask and mirrored-image mask disagree (Dice {tta:.3f} < {TTA_DICE_MIN:g})"
    unc = ms.get("qc_boundary_uncertainty")
    if unc is not None and unc > BOUNDARY_UNCERTAINTY_MAX:
        fired["uncertainty"] = (f"network unsure at the mask's edge ({unc:.2f} undecided voxels per edge "
                                f"voxel > {BOUNDARY_UNCERTAINTY_MAX:g})")
    for reason in REASONS:
        if reason in fired:
            out.fire(reason, fired[reason])
    ms["qc_reasons"] = list(out.reasons)


def _round(v, nd: int = 2):
    return None if v is None or not np.isfinite(v) else round(float(v), nd)


class Working:
    """The copy the intensity measures run on: every k-th voxel per axis (k: about
    :data:`WORK_MM` mm), cut to the mask's box plus a margin wider than any distance they look
    at, with the distances (mm) to the mask's edge inside (``inside``) and outside it
    (``outside``). Distances within the margin are those of the whole volume: every mask voxel
    is in the box."""

    def __init__(self, img, m, affine, zooms):
        self.steps = tuple(max(1, round(WORK_MM / z)) for z in zooms)
        self.zooms = tuple(z * s for z, s in zip(zooms, self.steps))
        sl = tuple(slice(None, None, s) for s in self.steps)
        small, sm = img[sl], m[sl]
        idx = np.argwhere(sm)
        margin = [int(np.ceil((EDGE_RANGE_MM + 4.0) / z)) for z in self.zooms]
        lo = np.maximum(idx.min(0) - margin, 0) if idx.size else np.zeros(3, int)
        hi = np.minimum(idx.max(0) + 1 + np.asarray(margin), sm.shape) if idx.size else np.asarray(sm.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        self.img, self.mask, self.lo = small[box], sm[box], lo
        self.affine = np.asarray(affine, float) @ np.diag(list(self.steps) + [1.0])
        self.affine[:3, 3] = np.asarray(affine, float)[:3, :3] @ (lo * np.asarray(self.steps)) + np.asarray(affine, float)[:3, 3]
        self.inside = (_inside_distance(self.mask, self.zooms, idx.min(0) - lo, idx.max(0) - lo) if idx.size
                       else np.zeros(self.mask.shape))
        self.outside = ndi.distance_transform_edt(~self.mask, sampling=self.zooms)

    def native_index(self, idx: np.ndarray) -> np.ndarray:
        """Native-grid indices of working-copy voxel indices (N, 3)."""
        return (np.asarray(idx) + self.lo) * np.asarray(self.steps)


def _inside_distance(sm: np.ndarray, szooms, first=None, last=None) -> np.ndarray:
    """``distance_transform_edt(sm, sampling=szooms)``, the same numbers, computed only on the
    mask's box (``first``/``last``: its first and last index per axis, found when not given)
    plus one voxel where the array allows: the background voxel nearest to a mask voxel always
    lies in it (one further out, moved onto the border of that box, is still background and
    only comes nearer). Saves a third of the working copy's distance computation."""
    out = np.zeros(sm.shape, np.float64)
    if first is None or last is None:
        idx = np.argwhere(sm)
        if idx.size == 0:
            return out
        first, last = idx.min(0), idx.max(0)
    box = tuple(slice(max(a - 1, 0), min(b + 2, n)) for a, b, n in zip(first, last, sm.shape))
    out[box] = ndi.distance_transform_edt(sm[box], sampling=szooms)
    return out


# ---- field of view ---------------------------------------------------------------------------
_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
_FACE_NAMES = {"L": "left", "R": "right", "A": "anterior", "P": "posterior", "S": "superior", "I": "inferior"}


def fov_measures(img, m, affine, zooms, head=None) -> dict:
    """``qc_fov_cut_fraction`` and ``qc_fov_head_cm2`` (module docstring) and the face
    (``qc_fov_face``) where the larger of them relative to its threshold is."""
    import nibabel as nib

    from volseg.transforms.functional import otsu_threshold

    codes = nib.aff2axcodes(affine)
    thr = None  # the image's Otsu threshold, when a face needs it (most masks reach none)
    cut_max, head_max, face_cut, face_head = 0.0, 0.0, None, None
    for ax in range(3):
        others = [a for a in range(3) if a != ax]
        area = zooms[others[0]] * zooms[others[1]]
        sections = m.sum(axis=tuple(others)).astype(float) * area  # mm2 per slice along ax
        largest = float(sections.max())
        n = m.shape[ax]
        k = max(1, int(np.ceil(FOV_SLAB_MM / zooms[ax] - 1e-6)))
        for side, slab, edge_index, label in ((0, slice(0, k), 0, _OPPOSITE[codes[ax]]),
                                               (1, slice(n - k, n), n - 1, codes[ax])):
            frac = float(sections[slab].max()) / largest if largest > 0 else 0.0
            if frac > cut_max:
                cut_max, face_cut = frac, label
            if label != "I" and sections[slab].max() > 0:
                if head is None and thr is None:
                    pos = img[::2, ::2, ::2]
                    pos = pos[pos > pos.min()] if (pos > pos.min()).any() else pos.ravel()
                    thr = otsu_threshold(pos)
                face = np.take(head if head is not None else img, edge_index, axis=ax)
                face = face > 0 if head is not None else face > thr
                cm2 = float(face.sum()) * area / 100.0
                if cm2 > head_max:
                    head_max, face_head = cm2, label
    cut_score, head_score = cut_max / FOV_CUT_FRACTION_MAX, head_max / FOV_HEAD_CM2_MAX
    face = face_cut if cut_score >= head_score else face_head
    return {"qc_fov_cut_fraction": round(cut_max, 3), "qc_fov_head_cm2": round(head_max, 1),
            "qc_fov_face": _FACE_NAMES.get(face) if face else None}


# ---- contrast ---------------------------------------------------------------------------------
def contrast_depth(small, sm, depth) -> float | None:
    """Mean depth (mm) of the brightest :data:`CONTRAST_FRACTION` of the brain minus that of the
    darkest (``depth``: distance to the mask's edge, on the strided grid)."""
    v, d = small[sm], depth[sm]
    if v.size < 100:
        return None
    lo, hi = np.percentile(v, [100 * CONTRAST_FRACTION, 100 * (1 - CONTRAST_FRACTION)])
    if hi <= lo:
        return None
    return float(d[v >= hi].mean() - d[v <= lo].mean())


# ---- bias ------------------------------------------------------------------------------------
def bias_ratio(small, sm, szooms, depth) -> float | None:
    """The range (95th over 5th percentile) of a quadratic field fitted to the log intensity of
    the white-matter-like voxels (module docstring)."""
    deep = sm & (depth >= BIAS_MIN_DEPTH_MM) & (small > 0)
    if deep.sum() < 500:
        return None
    xyz = np.argwhere(deep) * np.asarray(szooms)
    logv = np.log(small[deep].astype(np.float64))
    keep = slice(None, None, max(1, len(xyz) // BIAS_MAX_POINTS))  # a field this smooth needs few points
    xyz, logv = xyz[keep], logv[keep]
    xyz = (xyz - xyz.mean(0)) / 80.0  # about unit size over a brain: a well-conditioned fit
    cols = [np.ones(len(xyz))] + [xyz[:, i] for i in range(3)]
    cols += [xyz[:, i] * xyz[:, j] for i in range(3) for j in range(i, 3)]
    design = np.column_stack(cols)
    fit = np.zeros_like(logv)
    wm = np.ones(len(logv), bool)
    for _ in range(BIAS_ITERATIONS):
        corrected = logv - fit
        wm = corrected >= np.percentile(corrected, BIAS_WM_PERCENTILE)
        a = design[wm]
        coef = np.linalg.lstsq(a.T @ a, a.T @ logv[wm], rcond=None)[0]  # normal equations: 10 x 10
        fit = design @ coef
    lo, hi = np.percentile(fit[wm], [5, 95])
    return float(np.exp(hi - lo))


# ---- noise -----------------------------------------------------------------------------------
def brain_noise_sigma(img, zooms, points: np.ndarray) -> float | None:
    """Noise sigma inside the brain (Immerkaer 1996, module docstring): the in-plane
    Laplacian-difference kernel's median absolute response at native-grid ``points`` (N, 3;
    away from the volume's faces), planes across the thickest axis (axis 2 when isotropic)."""
    if len(points) < 500:
        return None
    ax = int(np.argmax(zooms)) if max(zooms) > 1.2 * min(zooms) else 2
    a, b = [i for i in range(3) if i != ax]
    x = np.asarray(img)
    if not (x.flags.c_contiguous or x.flags.f_contiguous):
        x = np.ascontiguousarray(x)
    pts = np.asarray(points)
    ok = np.all((pts > 0) & (pts < np.asarray(x.shape) - 1), axis=1)
    pts = pts[ok]
    # gather through flat offsets into the array's memory (C or Fortran order alike)
    flat = x.ravel(order="K")
    strides = np.asarray(x.strides) // x.itemsize
    at = pts @ strides
    resp = np.zeros(len(pts), np.float64)
    for da, db, w in ((-1, -1, 1), (-1, 0, -2), (-1, 1, 1), (0, -1, -2), (0, 0, 4), (0, 1, -2),
                      (1, -1, 1), (1, 0, -2), (1, 1, 1)):
        resp += w * flat.take(at + (da * strides[a] + db * strides[b]))
    return float(np.median(np.abs(resp))) / IMMERKAER_MAD if len(resp) >= 500 else None


def noise_measures(img, m, zooms, work: Working | None = None) -> dict:
    """``snr`` (air, :mod:`volseg.cohort.qc`), ``qc_snr_brain`` and ``qc_snr`` (the larger)."""
    from volseg.cohort.qc import air_noise_sigma, air_values, snr

    work = work or Working(img, m, np.eye(4), zooms)
    values = img[m]
    air = snr(values, air_noise_sigma(air_values(img, m)))
    deep = np.argwhere(work.mask & (work.inside >= NOISE_MIN_DEPTH_MM))
    sigma = brain_noise_sigma(img, zooms, work.native_index(deep))
    brain = None if not sigma else float(np.median(values)) / sigma
    known = [v for v in (air, brain) if v is not None]
    return {"snr": _round(air), "qc_snr_brain": _round(brain), "qc_snr": _round(max(known)) if known else None}


# ---- orientation -----------------------------------------------------------------------------
def _rotations() -> list[np.ndarray]:
    """The 24 proper rotations of a cube (signed permutation matrices of determinant +1)."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            r = np.zeros((3, 3))
            for row, (col, s) in enumerate(zip(perm, signs)):
                r[row, col] = s
            if np.linalg.det(r) > 0:
                out.append(r)
    return out


def _rotate_cube(a: np.ndarray, r: np.ndarray) -> np.ndarray:
    """``a`` (a cube around its centre) turned by the signed permutation ``r``:
    ``out[r @ u] = a[u]`` for offsets ``u`` from the centre."""
    cols = [int(np.flatnonzero(r[:, j])[0]) for j in range(3)]  # axis j goes to axis cols[j]
    b = np.transpose(a, np.argsort(cols))
    for j, i in enumerate(cols):
        if r[i, j] < 0:
            b = np.flip(b, i)
    return b


def _cube(img, m, affine, scale: float = 1.0) -> np.ndarray:
    """The brain (image over its median inside the mask, zero outside) on a RAS cube of
    :data:`ORIENT_CUBE` voxels of ``ORIENT_VOXEL_MM * scale`` mm centred on its centroid."""
    centre = affine[:3, :3] @ np.argwhere(m).mean(0) + affine[:3, 3]
    u = (np.arange(ORIENT_CUBE) - (ORIENT_CUBE - 1) / 2) * ORIENT_VOXEL_MM * scale
    world = np.stack(np.meshgrid(u, u, u, indexing="ij"), -1).reshape(-1, 3) + centre
    ijk = np.linalg.solve(affine[:3, :3], (world - affine[:3, 3]).T)
    brain = np.where(m, img / max(float(np.median(img[m])), 1e-6), 0).astype(np.float32)
    return ndi.map_coordinates(brain, ijk, order=1, mode="constant", cval=0.0).reshape((ORIENT_CUBE,) * 3)


@functools.lru_cache(maxsize=1)
def _mni_brain():
    """The MNI152 2009 brain (nilearn, shipped with it) on the orientation cube, and its volume
    (mL); None when nilearn's template cannot be loaded."""
    try:
        from nilearn import datasets

        t1 = datasets.load_mni152_template(resolution=1)
        brain = datasets.load_mni152_brain_mask(resolution=1)
    except (ImportError, OSError, ValueError):  # no nilearn or no template: no orientation measure
        return None
    m = np.asarray(brain.get_fdata()) > 0.5
    aff = np.asarray(t1.affine, float)
    cube = _cube(np.asarray(t1.get_fdata(dtype=np.float32)), m, aff)
    return cube, float(m.sum()) * abs(float(np.linalg.det(aff[:3, :3]))) / 1000.0


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else 0.0


def _describe(r: np.ndarray) -> str:
    """Words for a turn of the brain (left-right left out: it cannot be told)."""
    if np.allclose(np.abs(r), np.eye(3)):
        parts = [w for i, w in ((1, "front-back"), (2, "head-foot")) if r[i, i] < 0]
        return "turned " + (" and ".join(parts) + " reversed" if parts else "left-right")
    axes = "xyz"
    moves = [f"{axes[j]}->{'-' if r[i, j] < 0 else '+'}{axes[i]}" for j in range(3)
             for i in range(3) if r[i, j] != 0 and i != j]
    return "with its axes exchanged (" + ", ".join(moves) + ")"


def orientation(img, m, affine) -> tuple[float, str] | None:
    """``(margin, description)``: the brain's correlation with the MNI152 brain as labelled
    minus the best of the other 23 quarter-turn orientations, and words for that one; None
    without the template."""
    ref = _mni_brain()
    if ref is None:
        return None
    cube_ref, ref_ml = ref
    vol = float(m.sum()) * abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    sub = _cube(img, m, affine, scale=(vol / ref_ml) ** (1.0 / 3.0))
    scores = [(_corr(_rotate_cube(sub, r), cube_ref), r) for r in _rotations()]
    as_labelled = next(s for s, r in scores if np.allclose(r, np.eye(3)))
    best, r_best = max(((s, r) for s, r in scores if not np.allclose(r, np.eye(3))), key=lambda t: t[0])
    return as_labelled - best, _describe(r_best)


# ---- edge --------------------------------------------------------------------------------------
def edge_profile(small, sm, szooms, inside=None, outside=None):
    """``(centres_mm, profile)``: the median intensity (over the brain median) in shells of
    signed distance to the mask's edge (negative inside), 1 mm apart; ``inside``/``outside``:
    the distance maps of :class:`Working`, computed when not given."""
    half = float(np.mean(szooms)) / 2.0
    inside = ndi.distance_transform_edt(sm, sampling=szooms) if inside is None else inside
    outside = ndi.distance_transform_edt(~sm, sampling=szooms) if outside is None else outside
    sd = np.where(sm, -(inside - half), outside - half)  # voxel centres; the edge between them at 0
    near = np.abs(sd) <= EDGE_RANGE_MM + 2
    d, v = sd[near], small[near] / max(float(np.median(small[sm])), 1e-6)
    width = max(1.0, half)
    centres = np.arange(-EDGE_RANGE_MM, EDGE_RANGE_MM + 0.5, 1.0)
    prof = np.full(len(centres), np.nan)
    # the voxels in order of their whole millimetres of distance: each shell's test then runs
    # on the few millimetres around it (a superset of the shell) instead of on every voxel
    mm = np.floor(d).astype(np.int16)  # |d| <= EDGE_RANGE_MM + 2
    order = np.argsort(mm, kind="stable")
    d, v, mm = d[order], v[order], mm[order]
    for i, c in enumerate(centres):
        a = int(np.searchsorted(mm, np.floor(c - width) - 1, side="left"))
        b = int(np.searchsorted(mm, np.floor(c + width) + 1, side="right"))
        sel = np.abs(d[a:b] - c) <= width
        if sel.sum() >= 20:
            prof[i] = float(np.median(v[a:b][sel]))
    return centres, prof


def edge_offset(small, sm, szooms, inside=None, outside=None) -> float | None:
    """Where the profile of :func:`edge_profile` first falls half-way from the inside level
    (shells 6-10 mm inside) to the dark trough (its minimum within 8 mm of the edge), walking
    outwards from 6 mm inside; mm, positive outside the mask."""
    centres, prof = edge_profile(small, sm, szooms, inside, outside)
    ok = np.isfinite(prof)
    if ok.sum() < 8:
        return None
    centres, prof = centres[ok], prof[ok]
    inner = prof[centres <= -6]
    window = np.abs(centres) <= 8
    if inner.size == 0 or not window.any():
        return None
    level_in = float(np.median(inner))
    k_min = int(np.flatnonzero(window)[np.argmin(prof[window])])
    trough = float(prof[k_min])
    if level_in - trough < 0.1:  # no drop from brain to CSF: not a T1-like edge
        return None
    half_level = (level_in + trough) / 2
    # the first fall below half-way, walking outwards from the inside shells to the trough: a
    # skull whose bright marrow splits the dark band into two troughs must not move the edge
    # out to the second one
    start = int(np.flatnonzero(centres > -6)[0]) if (centres > -6).any() else 1
    for k in range(max(start, 1), k_min + 1):
        if prof[k - 1] >= half_level > prof[k]:  # crossing between k-1 and k
            a, b = prof[k - 1], prof[k]
            t = (a - half_level) / (a - b) if a != b else 0.0
            return float(centres[k - 1] + t * (centres[k] - centres[k - 1]))
    return None


__all__ = [
    "REASONS",
    "SelfQC",
    "bias_ratio",
    "brain_noise_sigma",
    "contrast_depth",
    "edge_offset",
    "edge_profile",
    "fov_measures",
    "noise_measures",
    "orientation",
    "self_qc",
]
