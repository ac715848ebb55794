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


# --- contrasts painted from the label map (issue 15: T2/PD/FLAIR-like heads for skull stripping)

@pytest.fixture(scope="module")
def contrast_heads() -> dict[str, SynthSubject]:
    return {c: synth_head(31, voxel_size=2.0, contrast=c) for c in ("t1", "t2", "pd", "flair", "any")}


def test_contrast_heads_are_deterministic_and_share_anatomy_and_grid(contrast_heads):
    again = synth_head(31, voxel_size=2.0, contrast="t2")
    assert np.array_equal(again.image, contrast_heads["t2"].image)
    assert again.params == contrast_heads["t2"].params
    t1 = contrast_heads["t1"]
    for c, subj in contrast_heads.items():
        # the label (brain mask) and the image share one grid, and the anatomy, pose and
        # acquisition are those of the seed in every contrast
        assert subj.image.shape == t1.image.shape == subj.brain_mask.shape
        assert np.array_equal(subj.affine, t1.affine)
        assert np.array_equal(subj.brain_mask, t1.brain_mask), c
        assert subj.params["contrast"] == c
        assert subj.params["anatomy"]["contrast"]["sequence"] == c
        assert subj.params["anatomy"]["layers"] == t1.params["anatomy"]["layers"]
        assert np.isfinite(subj.image).all() and subj.image.max() > 0


def test_t1_contrast_is_the_default_and_unchanged():
    assert np.array_equal(synth_head(31, voxel_size=3.0).image,
                          synth_head(31, voxel_size=3.0, contrast="t1").image)


def test_contrast_actually_changes_tissue_order(contrast_heads):
    brain = ndi.binary_erosion(contrast_heads["t1"].brain_mask.astype(bool), iterations=2)

    def detail(c):  # log image minus its smooth part: the shared bias field cancels
        log_im = np.log(np.maximum(contrast_heads[c].image, 1e-3))
        return (log_im - ndi.gaussian_filter(log_im, 4.0))[brain]

    def corr(a, b):
        return float(np.corrcoef(detail(a), detail(b))[0, 1])

    # same anatomy, same bias and noise draws: T2 inverts T1's CSF < GM < WM order inside the
    # brain (anti-correlated detail); FLAIR keeps CSF dark like T1 (correlated)
    assert corr("t1", "t2") < 0.0
    assert corr("t1", "flair") > 0.4
    assert corr("t1", "t2") < corr("t1", "flair") - 0.4
    tis = {c: s.params["anatomy"]["tissues"] for c, s in contrast_heads.items()}
    assert tis["t1"]["csf"] < tis["t1"]["gm"] < tis["t1"]["wm"]
    assert tis["t2"]["csf"] > tis["t2"]["gm"] > tis["t2"]["wm"]
    assert tis["flair"]["csf"] < tis["flair"]["wm"] < tis["flair"]["gm"]
    assert tis["pd"]["gm"] > tis["pd"]["wm"]
    # "any": independent random levels, so the order of tissues differs between draws
    keys = ("csf", "gm", "wm", "fat", "muscle")
    levels = [synth_head(s, voxel_size=4.0, contrast="any").params["anatomy"]["tissues"] for s in (1, 2, 3, 4)]
    orders = {tuple(np.argsort([t[k] for k in keys])) for t in levels}
    assert len(orders) > 1


def test_unknown_contrast_is_refused():
    with pytest.raises(ValueError, match="contrast 'T2w' is not one of"):
        synth_head(1, contrast="T2w")
