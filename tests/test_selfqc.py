"""Self-QC (volseg.cohort.selfqc): each measure fires on the fault it is for, names it, and stays
quiet on a good head; on a real scan, the good scan is ``ok`` and its bad versions ``check``."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from volseg.cohort.selfqc import REASONS, self_qc
from volseg.synth import faults as F

VOXEL_MM = 2.0


@pytest.fixture(scope="module")
def head():
    """A synthetic 2 mm RAS T1 head (image, brain mask, affine), N4-corrected. The synthetic bias
    field varies on a 64 mm scale, finer than N4's default 200 mm spline removes, so the
    spline here is 80 mm; the seed draws a full field of view and low noise (SNR 38)."""
    from volseg.synth import synth_head
    from volseg.transforms.n4 import n4_log_field_numpy

    s = synth_head(12, voxel_size=VOXEL_MM, axcodes="RAS", oblique=False)
    log_field, _ = n4_log_field_numpy(s.image, (VOXEL_MM,) * 3, bspline_spacing_mm=80.0)
    return (s.image / np.exp(log_field)).astype(np.float32), s.brain_mask, s.affine


def _median(img, mask) -> float:
    return float(np.median(img[mask > 0]))


def test_a_good_head_is_ok_and_every_measure_is_taken(head):
    img, mask, affine = head
    q = self_qc(img, mask, affine)
    assert q.qc == "ok" and q.reasons == [] and q.notes == [], q.notes
    m = q.measures
    for key in ("brain_volume_ml", "qc_fov_cut_fraction", "qc_fov_head_cm2", "qc_t1_depth_mm", "qc_bias_ratio",
                "qc_snr", "qc_snr_brain", "qc_orientation_margin", "qc_edge_offset_mm"):
        assert m[key] is not None, key
    assert m["qc_tta_dice"] is None and m["qc_boundary_uncertainty"] is None  # no network probabilities given
    assert m["qc_reasons"] == []


def _fault(name, img, mask, affine):
    """(image, mask, affine) of the head with fault ``name``."""
    zooms = (VOXEL_MM,) * 3
    if name.startswith("fov-"):
        which, top = {"fov-superior": ("z", True), "fov-inferior": ("z", False), "fov-anterior": ("y", True)}[name]
        i2, a2, m2 = F.cut_fov(img, affine, mask, which, 0.3 if which == "z" else 0.2, top)
        return i2, m2, a2
    if name == "noise":
        return F.add_rician_noise(img, 0.15 * _median(img, mask), seed=1), mask, affine
    if name == "bias":
        return F.apply_bias_field(img, affine, 1.6, seed=2, mask=mask), mask, affine
    if name == "inverted":
        return F.invert_contrast(img, brain=mask), mask, affine
    if name in ("flip-z", "flip-y", "swap-yz", "flip-x"):
        i2, m2 = F.mislabel_orientation(img, affine, name, mask)
        return i2, m2, affine
    if name in ("eroded", "grown"):
        return img, F.shift_mask_edge(mask, zooms, -5.0 if name == "eroded" else 5.0), affine
    if name == "small":
        return img, F.shift_mask_edge(mask, zooms, -20.0), affine
    raise ValueError(name)


@pytest.mark.parametrize("fault, reason", [
    ("fov-superior", "fov"), ("fov-inferior", "fov"), ("fov-anterior", "fov"), ("noise", "noise"),
    ("bias", "bias"), ("inverted", "contrast"), ("flip-z", "orientation"), ("flip-y", "orientation"),
    ("swap-yz", "orientation"), ("eroded", "edge"), ("grown", "edge"), ("small", "volume"),
])
def test_each_fault_is_flagged_with_its_reason(head, fault, reason):
    q = self_qc(*_fault(fault, *head))
    assert q.qc == "check" and reason in q.reasons, (q.reasons, q.measures)
    assert len(q.notes) == len(q.reasons) and set(q.reasons) <= set(REASONS)
    assert q.reasons == [r for r in REASONS if r in q.reasons]  # listed in the documented order


def test_the_notes_say_which_way():
    """The edge note tells an eroded from a grown mask, the field-of-view note names the face."""
    m = {"qc_edge_offset_mm": 4.0, "qc_fov_cut_fraction": 0.4, "qc_fov_head_cm2": 0.0, "qc_fov_face": "superior",
         "brain_volume_ml": 1300.0}
    from volseg.cohort.selfqc import SelfQC, _judge

    q = SelfQC(measures=dict(m))
    _judge(q)
    assert q.reasons == ["fov", "edge"]
    assert "superior face" in q.notes[0] and "eroded" in q.notes[1]
    q = SelfQC(measures=dict(m, qc_edge_offset_mm=-4.0, qc_fov_cut_fraction=0.0))
    _judge(q)
    assert q.reasons == ["edge"] and "grown" in q.notes[0]


@pytest.mark.parametrize("harmless, quiet", [
    ("mild-noise", "noise"), ("mild-bias", "bias"), ("flip-x", "orientation"), ("edge-1mm", "edge"),
    ("fov-margin", "fov"),
])
def test_harmless_changes_do_not_fire(head, harmless, quiet):
    """Below each threshold: 2% noise, a 1.1x field, a 1 mm shift of the edge, a field of view
    10 mm from the brain. A left-right flip is invisible to the orientation test (documented)."""
    img, mask, affine = head
    if harmless == "mild-noise":
        img = F.add_rician_noise(img, 0.02 * _median(img, mask), seed=3)
    elif harmless == "mild-bias":
        img = F.apply_bias_field(img, affine, 1.1, seed=4, mask=mask)
    elif harmless == "flip-x":
        img, mask = F.mislabel_orientation(img, affine, "flip-x", mask)
    elif harmless == "edge-1mm":
        mask = F.shift_mask_edge(mask, (VOXEL_MM,) * 3, 1.0)
    else:
        idx = np.argwhere(mask)
        pad = int(10 / VOXEL_MM)
        lo, hi = np.maximum(idx.min(0) - pad, 0), idx.max(0) + 1 + pad
        img, mask = img[tuple(slice(a, b) for a, b in zip(lo, hi))], mask[tuple(slice(a, b) for a, b in zip(lo, hi))]
        affine = affine.copy()
        affine[:3, 3] += affine[:3, :3] @ lo
    q = self_qc(img, mask, affine)
    assert quiet not in q.reasons, (q.notes, q.measures)


def _sphere_prob(shape=(48, 64, 80), centre=(24, 32, 40), radius=16.0, width=0.3):
    zz = np.indices(shape).astype(np.float32)
    r = np.sqrt(sum((zz[i] - centre[i]) ** 2 for i in range(3)))
    return (0.5 * (1.0 - np.tanh((r - radius) / (2.0 * width)))).astype(np.float32)  # a logistic edge


def test_prediction_measures_on_grid_arrays():
    from volseg.strip.uncertainty import prediction_measures

    sharp = _sphere_prob()
    same = prediction_measures(sharp, sharp.copy())
    assert same["tta_dice"] == 1.0 and same["boundary_uncertainty"] < 2.0
    shifted = prediction_measures(sharp, np.roll(sharp, 3, axis=0))
    assert shifted["tta_dice"] < 0.95
    blurred = prediction_measures(_sphere_prob(width=2.5), None)
    assert blurred["tta_dice"] is None and blurred["boundary_uncertainty"] > 2.0
    # passed to self_qc, they fire tta and uncertainty
    img = np.where(sharp > 0.5, 100.0, 10.0).astype(np.float32)
    q = self_qc(img, (sharp > 0.5).astype(np.uint8), np.diag([2.0, 2.0, 2.0, 1.0]),
                prediction={"tta_dice": shifted["tta_dice"], "boundary_uncertainty": blurred["boundary_uncertainty"]})
    assert {"tta", "uncertainty"} <= set(q.reasons)


def test_network_measures_do_not_depend_on_tta_and_probabilities_are_unchanged(head):
    """predict_grid_batch_qc gives predict_grid_batch's probability, with or without --tta, and
    the same self-QC numbers both ways (the plain and the mirrored pass)."""
    import torch

    from volseg.nets.folder import load_model
    from volseg.strip.infer import predict_grid_batch, predict_grid_batch_qc

    net, _ = load_model(kind="strip")
    img, _, _ = head
    crop = img[20:84, 30:94, 20:84]  # a 64 mm cube of the head: the U-Net takes multiples of 32
    g = [torch.as_tensor((crop / np.percentile(img, 99.5))[None].astype(np.float32))]
    first = None
    for tta in (False, True):
        [(prob, measures)] = predict_grid_batch_qc(net, g, "cpu", tta=tta)
        [ref] = predict_grid_batch(net, g, "cpu", tta=tta)
        assert float((prob - ref).abs().max()) < 1e-5
        if tta:
            assert measures == first
        first = measures
    assert 0.0 <= first["tta_dice"] <= 1.0 and first["boundary_uncertainty"] > 0


def test_qc_measures_carries_the_self_qc_into_the_record(head):
    from volseg.cohort.export import qc_sidecar
    from volseg.cohort.qc import qc_measures

    img, mask, affine = head
    meta = SimpleNamespace(zooms=(VOXEL_MM,) * 3, affine=affine, header_warnings=())
    res = SimpleNamespace(meta=meta, prep=SimpleNamespace(native=img), mask=mask, anomaly=None,
                          grid_qc={"tta_dice": 0.9, "boundary_uncertainty": 1.2})
    m = qc_measures(res)
    assert m["qc"] == "check" and m["qc_reasons"] == ["tta"] and m["qc_tta_dice"] == 0.9
    assert len(m["qc_notes"]) == 1 and "mirrored" in m["qc_notes"][0]
    side = qc_sidecar(m)
    assert side["qc"] == "check" and side["reasons"] == ["tta"] and side["measures"]["qc_tta_dice"] == 0.9
    assert "qc_notes" not in side["measures"] and "brain_volume_ml" in side["measures"]
    res.grid_qc = {"tta_dice": 0.99, "boundary_uncertainty": 1.2}
    assert qc_measures(res)["qc"] == "ok"


@pytest.mark.slow
def test_real_scan_good_is_ok_and_bad_versions_are_flagged(shared_data):
    """Colin27 with its reference mask: ``ok``; each fault made from it: ``check`` naming the
    fault's reason (the network's reaction to the faults is ``scripts/bench_selfqc.py``'s)."""
    from volseg.io import load_image

    root = shared_data / "wholehead" / "colin27"
    img, meta = load_image(root / "ch2.nii.gz")
    mask, _ = load_image(root / "ch2_brainmask.nii.gz")
    # every second voxel: the real head at 2 mm, 8x less work (the measures run at 2 mm anyway)
    img, mask = img[::2, ::2, ::2], (mask[::2, ::2, ::2] > 0).astype(np.uint8)
    affine = meta.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    zooms = tuple(2.0 * z for z in meta.zooms)
    good = self_qc(img, mask, affine, zooms)
    assert good.qc == "ok", good.notes
    med = _median(img, mask)
    i2, a2, m2 = F.cut_fov(img, affine, mask, "z", 0.3, True)
    cases = {
        "fov": (i2, m2, a2),
        "noise": (F.add_rician_noise(img, 0.15 * med, seed=5), mask, affine),
        "bias": (F.apply_bias_field(img, affine, 1.6, seed=6, mask=mask), mask, affine),
        "contrast": (F.invert_contrast(img, brain=mask), mask, affine),
        "orientation": (*F.mislabel_orientation(img, affine, "flip-z", mask), affine),
        "edge": (img, F.shift_mask_edge(mask, zooms, -5.0), affine),
    }
    for reason, (i, m, a) in cases.items():
        q = self_qc(i, m, a)
        assert q.qc == "check" and reason in q.reasons, (reason, q.notes)
    grown = self_qc(img, F.shift_mask_edge(mask, zooms, 5.0), affine, zooms)
    assert "edge" in grown.reasons and "grown" in grown.notes[grown.reasons.index("edge")]


def test_edge_stays_at_the_brain_when_bright_marrow_splits_the_dark_band():
    """Brain, a 2 mm dark CSF band, 2 mm of bright marrow, dark bone, then scalp: the edge is the
    first fall (at the mask), not the deeper second trough beyond the marrow (the quick-start
    example's sub-02 was flagged 'eroded' by +4.2 mm before)."""
    from volseg.cohort.selfqc import Working, edge_offset

    r = np.sqrt(sum((g - 60.0) ** 2 for g in np.indices((120, 120, 120), dtype=np.float32)))
    img = np.select([r < 40, r < 42, r < 44, r < 47, r < 52], [1.0, 0.3, 0.9, 0.2, 0.8], 0.0).astype(np.float32)
    mask = r < 40
    w = Working(img, mask, np.eye(4), (1.0, 1.0, 1.0))
    off = edge_offset(w.img, w.mask, w.zooms, w.inside, w.outside)
    assert off is not None and abs(off) < 1.5, off
    # and a truly eroded mask still reads as eroded
    w = Working(img, r < 35, np.eye(4), (1.0, 1.0, 1.0))
    assert edge_offset(w.img, w.mask, w.zooms, w.inside, w.outside) > 2.5


def test_the_faster_steps_give_the_numbers_of_the_plain_ones():
    """The shortcuts that make self-QC cheaper return what the plain computations return: holes
    filled by labelling (scipy grows the outside in from the border), the inside distance on the
    mask's box, the edge shells searched among nearby millimetres, the noise kernel gathered
    through flat offsets (C and Fortran order)."""
    from scipy import ndimage as ndi

    from volseg.cohort.selfqc import (
        IMMERKAER_MAD,
        Working,
        _inside_distance,
        brain_noise_sigma,
        edge_profile,
    )
    from volseg.transforms.functional import _in_plane, fill_holes

    rng = np.random.default_rng(0)
    structures = [None, ndi.generate_binary_structure(3, 2), ndi.generate_binary_structure(3, 3)]
    structures += [_in_plane(ax) for ax in range(3)]
    for i in range(60):
        m = rng.random(tuple(rng.integers(1, 14, size=3))) < rng.uniform(0.2, 0.9)
        if i % 2:
            m = ndi.binary_dilation(m)
        for s in structures:
            assert np.array_equal(fill_holes(m, s), ndi.binary_fill_holes(m, structure=s))
        assert np.array_equal(_inside_distance(m, (2.0, 1.5, 3.0)), ndi.distance_transform_edt(m, sampling=(2.0, 1.5, 3.0)))
    m2 = rng.random((15, 11)) < 0.6
    assert np.array_equal(fill_holes(m2), ndi.binary_fill_holes(m2))

    g = np.indices((70, 64, 60), dtype=np.float32)
    r = np.sqrt(((g[0] - 35) / 1.1) ** 2 + (g[1] - 30) ** 2 + ((g[2] - 28) * 0.9) ** 2)
    img = (np.select([r < 20, r < 23, r < 28], [1.0, 0.3, 0.8], 0.05) + rng.normal(0, 0.05, r.shape)).astype(np.float32)
    for zooms, mask in (((1.0, 1.0, 1.0), r < 20), ((0.9, 0.9, 2.6), r < 24), ((1.0, 1.0, 1.0), (r < 20) | (g[0] < 3))):
        w = Working(img, mask, np.eye(4), zooms)
        assert np.array_equal(w.inside, ndi.distance_transform_edt(w.mask, sampling=w.zooms))
        centres, prof = edge_profile(w.img, w.mask, w.zooms, w.inside, w.outside)
        half = float(np.mean(w.zooms)) / 2.0
        sd = np.where(w.mask, -(w.inside - half), w.outside - half)
        near = np.abs(sd) <= 12.0
        d, v = sd[near], w.img[near] / max(float(np.median(w.img[w.mask])), 1e-6)
        plain = [float(np.median(v[np.abs(d - c) <= max(1.0, half)])) if (np.abs(d - c) <= max(1.0, half)).sum() >= 20
                 else np.nan for c in centres]
        assert np.array_equal(prof, plain, equal_nan=True)
        pts = w.native_index(np.argwhere(w.mask & (w.inside >= 4.0)))
        pts = pts[np.all((pts > 0) & (pts < np.asarray(img.shape) - 1), axis=1)]
        resp = sum(wt * img[pts[:, 0] + da, pts[:, 1] + db, pts[:, 2]].astype(np.float64)
                   for da, db, wt in ((-1, -1, 1), (-1, 0, -2), (-1, 1, 1), (0, -1, -2), (0, 0, 4), (0, 1, -2),
                                      (1, -1, 1), (1, 0, -2), (1, 1, 1)))
        want = float(np.median(np.abs(resp))) / IMMERKAER_MAD  # planes across axis 2 for all three
        assert brain_noise_sigma(img, zooms, pts) == pytest.approx(want, rel=1e-12)
        assert brain_noise_sigma(np.asfortranarray(img), zooms, pts) == brain_noise_sigma(img, zooms, pts)
