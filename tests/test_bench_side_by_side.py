"""The pure parts of scripts/bench_side_by_side.py: Dice, HD95, grid handling, ``--scans`` parsing.

No anchors (deepbet, HD-BET) and no real scans needed.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_side_by_side.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_side_by_side", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def line(zs, n=10):
    """A 1x1xn array that is 1 at the z indices ``zs``: every voxel of it is a boundary voxel."""
    a = np.zeros((1, 1, n), bool)
    a[0, 0, list(zs)] = True
    return a


def test_dice_by_hand(bench):
    a, b = line(range(2, 6)), line(range(2, 8))  # 4 and 6 voxels, 4 shared
    assert bench.dice(a, b) == pytest.approx(2 * 4 / 10)
    assert bench.dice(a, a) == 1.0
    assert bench.dice(line([1]), line([5])) == 0.0
    assert math.isnan(bench.dice(line([]), line([])))


def test_hd95_by_hand(bench):
    a, b = line(range(2, 6)), line(range(2, 8))
    # a -> b: all 0; b -> a: 0,0,0,0,1,2 -> 95th percentile (linear) = 1 + 0.75 * (2 - 1) = 1.75
    assert bench.hd95(a, b) == pytest.approx(1.75)
    assert bench.hd95(b, a) == pytest.approx(1.75)
    assert bench.hd95(a, b, spacing=(1.0, 1.0, 2.0)) == pytest.approx(3.5)
    assert bench.hd95(line([1]), line([4]), spacing=(1, 1, 2)) == pytest.approx(6.0)
    assert bench.hd95(a, a) == 0.0
    assert math.isnan(bench.hd95(a, line([])))


def test_hd95_cube_shift(bench):
    # a 5^3 cube moved by 2 voxels along x (voxel 1.5 mm): every boundary voxel of the moved face
    # is 2 voxels from the other; the 95th percentile of each direction is 3 mm
    a = np.zeros((12, 9, 9), bool)
    a[2:7, 2:7, 2:7] = True
    b = np.roll(a, 2, axis=0)
    assert bench.dice(a, b) == pytest.approx(2 * 75 / 250)
    assert bench.hd95(a, b, spacing=(1.5, 1.0, 1.0)) == pytest.approx(3.0)


def test_far_outside_counts_only_what_lies_beyond_the_margin(bench):
    # reference: z 10..19 of a 1x1x40 line; a mask that also keeps z 20..34 (a "scalp" 15 voxels
    # long): with 1 mm voxels z 25..34 lie more than 5 mm out (z 20..25 is within 5 mm)
    ref, pred = line(range(10, 20), 40), line(range(10, 35), 40)
    assert bench.far_outside_ml(pred, ref) == pytest.approx(10 / 1000)
    assert bench.far_outside_ml(ref, pred) == 0.0  # nothing of the brain cut away
    # 2 mm voxels along z: z 22..34 lie 6 mm or more out (z 20 and 21: 2 and 4 mm)
    assert bench.far_outside_ml(pred, ref, spacing=(1, 1, 2)) == pytest.approx(13 * 2 / 1000)
    # a mask that cuts the reference's z 10..14 away: those voxels lie 5, 4, 3, 2, 1 mm from the mask
    cut = line(range(15, 20), 40)
    assert bench.far_outside_ml(ref, cut) == 0.0  # the farthest cut voxel (z 10) is exactly 5 mm away
    assert bench.far_outside_ml(ref, cut, mm=3) == pytest.approx(2 / 1000)  # z 10 and 11 (5, 4 mm)
    assert bench.far_outside_ml(pred, ref) == bench.far_outside_ml(pred, ref, spacing=(1.0, 1.0, 1.0))
    assert math.isnan(bench.far_outside_ml(pred, line([], 40)))
    assert bench.far_outside_ml(line([], 40), ref) == 0.0


def test_leak_parts_name_the_largest_leaks_and_where_they_lie(bench):
    ref = np.zeros((40, 40, 40), bool); ref[10:30, 10:30, 10:30] = True  # a 20 mm cube, centre 19.5
    pred = ref.copy()
    pred[10:14, 36:40, 10:14] = True  # 64 voxels 7-10 mm out along +y (anterior in RAS)
    pred[18:20, 18:20, 0:2] = True  # 8 voxels 9-10 mm out along -z (inferior), the smaller part
    affine = np.eye(4)
    assert bench.far_outside_ml(pred, ref) == pytest.approx(72 / 1000)
    txt = bench.leak_parts(pred, ref, affine)
    assert txt == "0.1@(-8,+18,-8) 0.0@(-1,-1,-19)", txt
    assert bench.leak_parts(ref, ref, affine) == ""


def test_reference_grid(bench):
    ref_aff = np.diag([2.0, 2.0, 3.0, 1.0])
    ref_aff[:3, 3] = [-10, 5, 7]
    m = np.zeros((6, 5, 4), np.uint8)
    m[1:3, 2:5, 0:2] = 1
    same, note = bench.to_reference_grid(m, ref_aff, m.shape, ref_aff)
    assert note == "" and np.array_equal(same, m > 0)
    # the same mask stored flipped along x, with the affine that says so
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = m.shape[0] - 1
    back, note = bench.to_reference_grid(m[::-1], ref_aff @ flip, m.shape, ref_aff)
    assert "resampled" in note and np.array_equal(back, m > 0)
    # a trailing singleton 4th dimension is dropped
    same4, note = bench.to_reference_grid(m[..., None], ref_aff, m.shape, ref_aff)
    assert note == "" and np.array_equal(same4, m > 0)


def test_parse_scans(bench, tmp_path):
    img = tmp_path / "sub-01_T1w.nii.gz"
    img.write_bytes(b"x")
    own = tmp_path / "ref.nii.gz"
    own.write_bytes(b"x")
    s = bench.parse_scan_arg(f"{img}:{own}")
    assert (s.image, s.mask, s.label) == (img, own, "sub-01_T1w")
    with pytest.raises(argparse.ArgumentTypeError, match="no mask beside it"):
        bench.parse_scan_arg(str(img))
    beside = tmp_path / "sub-01_T1w_brainmask.nii.gz"
    beside.write_bytes(b"x")
    assert bench.parse_scan_arg(str(img)).mask == beside
    with pytest.raises(argparse.ArgumentTypeError, match="not found"):
        bench.parse_scan_arg(f"{img}:{tmp_path / 'missing.nii.gz'}")
    with pytest.raises(argparse.ArgumentTypeError, match="IMG:MASK"):
        bench.parse_scan_arg(f"{img}:")
    args = bench.build_parser().parse_args(["--scans", f"{img}:{own}", str(img), "--limit", "1", "--hdbet"])
    assert [x.mask for x in args.scans] == [own, beside] and args.limit == 1 and args.hdbet
    assert not args.hdbet_accurate and not args.per_scan_process and args.repeats == 1


def test_work_names(bench):
    assert bench.work_name(3, "open_ms/patient01_study1") == "s03-open-ms-patient01-study1"
    assert bench.work_name(0, "sub-01_T1w.v2") == "s00-sub-01-T1w-v2"  # no dots, no _T1w tail
    order = ["s00-a", "s01-b", "s02-c"]
    assert bench.per_scan_intervals(order, {"s00-a": 5.0, "s02-c": 9.5}) == {"s00-a": 5.0, "s02-c": 4.5}


def test_failure_reason(bench, tmp_path):
    log = tmp_path / "r0.log"
    log.write_text("$ tool -i in\n  0%|          | 0/2 [00:00<?, ?it/s]Warning: Skipped file in/s00-a.nii.gz\r"
                   "100%|##########| 2/2 [00:07<00:00,  3.99s/it]\ndone\n")
    assert bench.failure_reason(log, "s00-a") == "Warning: Skipped file in/s00-a.nii.gz"
    assert bench.failure_reason(log, "s09-z") == "Warning: Skipped file in/s00-a.nii.gz"  # "skipped" matches
    log.write_text("$ tool\nall fine\n")
    assert bench.failure_reason(log, "s00-a") == "all fine"


def test_pseudo_label_consensus_lies_between_two_disagreeing_masks():
    """scripts/pseudo_labels.py: where two tools agree the consensus is their mask; where one
    mask is a larger sphere, the consensus boundary lies between the two boundaries."""
    spec = importlib.util.spec_from_file_location("pseudo_labels", SCRIPT.with_name("pseudo_labels.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    grid = np.indices((48, 48, 48)).astype(float) - 24.0
    r = np.sqrt((grid**2).sum(0))
    small, large = r <= 12.0, r <= 16.0
    assert np.array_equal(mod.consensus(small, small, (1, 1, 1)).astype(bool), small)
    cons = mod.consensus(small, large, (1, 1, 1)).astype(bool)
    assert (cons >= small).all() and (cons <= large).all()
    radius = (cons.sum() * 3 / (4 * np.pi)) ** (1 / 3)
    assert 13.0 < radius < 15.0
    # anisotropic voxels: the smoothing is in mm, the answer the same sphere within a voxel
    cons2 = mod.consensus(small[:, :, ::2], large[:, :, ::2], (1, 1, 2)).astype(bool)
    radius2 = (cons2.sum() * 2 * 3 / (4 * np.pi)) ** (1 / 3)
    assert abs(radius2 - radius) < 1.0
