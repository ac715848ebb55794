"""Synthetic heads: determinism, plausible anatomy and masks, overrides, lesions, writing."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from volseg.io import obliquity_deg
from volseg.synth import SynthSubject, generate_cohort, synth_head, write_subject


def _zooms(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)


def _volume_ml(mask: np.ndarray, affine: np.ndarray) -> float:
    return float(mask.sum() * np.prod(_zooms(affine)) / 1000.0)


@pytest.fixture(scope="module")
def heads() -> dict[int, SynthSubject]:
    """Random draws (orientation, voxel size, field of view, contrast) for a few seeds."""
    return {seed: synth_head(seed) for seed in (11, 12, 13)}


@pytest.fixture(scope="module")
def lesion_head() -> SynthSubject:
    return synth_head(21, lesions=True, voxel_size=(1.2, 1.2, 1.2), oblique=True)


def test_same_seed_same_head_and_different_seeds_differ(heads):
    again = synth_head(11)
    first = heads[11]
    assert np.array_equal(again.image, first.image)
    assert np.array_equal(again.brain_mask, first.brain_mask)
    assert np.array_equal(again.affine, first.affine)
    assert again.params == first.params
    other = heads[12]
    assert (other.image.shape != first.image.shape
            or not np.array_equal(other.image, first.image))
    assert other.params["anatomy"] != first.params["anatomy"]


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_head_is_plausible(heads, seed):
    subj = heads[seed]
    img, mask = subj.image, subj.brain_mask
    assert img.ndim == 3 and img.dtype == np.float32 and np.isfinite(img).all()
    assert mask.shape == img.shape and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1}
    assert 900 <= _volume_ml(mask, subj.affine) <= 1900
    # The brain is much brighter than the background (a large part of any field of view).
    brain = mask.astype(bool)
    assert img[brain].mean() > 3 * np.percentile(img, 10)
    # Scalp, skull, face and neck around the brain: the head is well beyond the brain mask.
    smooth = ndi.gaussian_filter(img, 1.5)
    head = ndi.binary_fill_holes(smooth > 0.25 * np.median(img[brain]))
    assert head.sum() >= 1.5 * brain.sum()
    # One brain (sampling may leave a stray voxel at a thin tip such as the medulla).
    parts, _ = ndi.label(mask)
    assert np.bincount(parts.ravel())[1:].max() >= 0.999 * mask.sum()


def test_params_are_json_and_describe_the_grid(heads):
    subj = heads[13]
    params = json.loads(json.dumps(subj.params))
    assert params["seed"] == 13
    assert params["shape"] == list(subj.image.shape)
    assert np.allclose(params["voxel_size"], _zooms(subj.affine), atol=1e-3)
    assert params["orientation"] == "".join(nib.aff2axcodes(subj.affine))


@pytest.mark.parametrize("voxel_size,axcodes", [((1, 1, 1), "LPS"), ((0.9, 0.9, 5.0), "RAS"),
                                               ((3.0, 1.0, 1.0), "PIL")])
def test_overrides_set_grid_and_orientation_but_keep_the_anatomy(heads, voxel_size, axcodes):
    subj = synth_head(11, voxel_size=voxel_size, axcodes=axcodes, oblique=False)
    assert np.allclose(_zooms(subj.affine), voxel_size, atol=1e-6)
    assert "".join(nib.aff2axcodes(subj.affine)) == axcodes
    assert obliquity_deg(subj.affine) < 1e-6
    assert subj.params["voxel_size"] == pytest.approx(list(voxel_size))
    if max(voxel_size) > 2:
        assert subj.params["points_per_slice"] > 1  # thick slices are averaged, not sampled
    assert subj.params["anatomy"] == heads[11].params["anatomy"]
    assert subj.params["pose"] == heads[11].params["pose"]
    assert 900 <= _volume_ml(subj.brain_mask, subj.affine) <= 1900


def test_oblique_override_tilts_the_grid(lesion_head):
    assert 1.0 < obliquity_deg(lesion_head.affine) <= 16.0


def test_bad_overrides_are_refused():
    with pytest.raises(ValueError, match="axcodes"):
        synth_head(1, axcodes="RAX")
    with pytest.raises(ValueError, match="seed"):
        synth_head(-1)


def test_lesions_lie_inside_the_brain(lesion_head, heads):
    les = lesion_head.lesion_mask
    assert les is not None and les.dtype == np.uint8 and les.shape == lesion_head.image.shape
    assert les.sum() > 0
    assert not (les.astype(bool) & ~lesion_head.brain_mask.astype(bool)).any()
    assert 1 <= lesion_head.params["lesion_count"] <= 4
    assert heads[11].lesion_mask is None


def test_write_subject_round_trip(tmp_path, lesion_head):
    paths = write_subject(lesion_head, tmp_path / "out", "sub-x")
    assert paths["image"].name == "sub-x_T1w.nii.gz"
    assert paths["brain_mask"].name == "sub-x_desc-brain_mask.nii.gz"
    assert paths["lesion_mask"].name == "sub-x_label-lesion_mask.nii.gz"
    for key, dtype, data in (("image", np.float32, lesion_head.image),
                             ("brain_mask", np.uint8, lesion_head.brain_mask),
                             ("lesion_mask", np.uint8, lesion_head.lesion_mask)):
        img = nib.load(paths[key])
        assert img.get_data_dtype() == dtype
        assert np.allclose(img.affine, lesion_head.affine, atol=1e-4)
        assert np.array_equal(np.asarray(img.dataobj), data)
        assert img.header.get_sform(coded=True)[1] == 1
    assert json.loads(paths["params"].read_text())["seed"] == 21
    leftovers = [p.name for p in (tmp_path / "out").iterdir() if ".tmp" in p.name]
    assert leftovers == []


def test_write_subject_without_lesions_has_no_lesion_file(tmp_path, heads):
    paths = write_subject(heads[12], tmp_path, "sub-y")
    assert paths["lesion_mask"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "sub-y_T1w.json", "sub-y_T1w.nii.gz", "sub-y_desc-brain_mask.nii.gz"]


def test_generate_cohort_writes_subjects_and_table(tmp_path):
    written = generate_cohort(tmp_path, 2, lesions=True, seed=3)
    assert [p["image"].name for p in written] == ["sub-synth001_T1w.nii.gz", "sub-synth002_T1w.nii.gz"]
    for paths in written:
        assert all(p.is_file() for p in paths.values())
    rows = (tmp_path / "synth_cohort.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    assert header[:5] == ["name", "seed", "voxel_size", "orientation", "oblique"]
    first = dict(zip(header, rows[1].split("\t")))
    assert first["name"] == "sub-synth001" and first["seed"] == str(3 * 100003)
    assert len(rows) == 3 and int(first["lesion_count"]) >= 1
    with pytest.raises(ValueError, match="at least 1"):
        generate_cohort(tmp_path, 0)
