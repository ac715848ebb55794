"""N4 bias-field correction recovers a known multiplicative field."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from volseg.transforms import N4BiasField, N4BiasFieldd
from volseg.transforms import functional as F


@pytest.fixture(scope="module")
def mni_2mm():
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=2)
    data = np.asarray(img.get_fdata(), dtype=np.float32) * 1000.0
    return data, np.asarray(img.affine, dtype=float)


def _smooth_log_field(shape, rng, amplitude=0.25):
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    c = rng.normal(0, 1, 6)
    field = c[0] * x + c[1] * y + c[2] * z + c[3] * x * y + c[4] * (z**2 - 0.3) + c[5] * y * z
    return (amplitude * field / np.abs(field).max()).astype(np.float32)


@pytest.mark.parametrize("name,seed", [("colin27/ch2.nii.gz", 0), ("open_ms/patient04_study1_T1W.nii.gz", 7)])
def test_n4_recovers_known_field_on_real_heads(shared_data, name, seed):
    """Default settings (the numpy backend, its own head mask); the recovered field is the
    difference of the estimates with and without the applied field (what N4 attributes to the
    field we added)."""
    from volseg.io import load_image
    from volseg.transforms.n4 import n4_log_field_numpy

    data, meta = load_image(shared_data / "wholehead" / name)
    applied = _smooth_log_field(data.shape, np.random.default_rng(seed))
    mask = F.head_mask(data)
    clean_est, _ = n4_log_field_numpy(data, meta.zooms)
    biased_est, _ = n4_log_field_numpy(data * np.exp(applied), meta.zooms)
    r = np.corrcoef((biased_est - clean_est)[mask], applied[mask])[0, 1]
    assert r >= 0.95, f"{name}: correlation {r:.3f}"


@pytest.mark.parametrize("name", ["colin27/ch2.nii.gz", "open_ms/patient04_study1_T1W.nii.gz"])
def test_numpy_n4_matches_simpleitk_on_real_heads(shared_data, name):
    """The NumPy port against SimpleITK's N4BiasFieldCorrectionImageFilter (the backend it
    replaced as the default), same head mask and settings: the fields correlate >= 0.98, and
    with a known field applied both recover it equally well."""
    from volseg.io import load_image
    from volseg.transforms.n4 import n4_log_field_numpy

    data, meta = load_image(shared_data / "wholehead" / name)
    mask = F.head_mask(data)
    applied = _smooth_log_field(data.shape, np.random.default_rng(11))
    biased = data * np.exp(applied)
    ours, info = n4_log_field_numpy(biased, meta.zooms, mask=mask)
    theirs, _ = F.n4_log_field(biased, meta.zooms, mask=mask)
    r = np.corrcoef(ours[mask], theirs[mask])[0, 1]
    assert r >= 0.98, f"{name}: numpy vs SimpleITK field correlation {r:.4f}"
    assert info["backend"] == "numpy" and len(info["iterations_run"]) == 4
    ours_clean, _ = n4_log_field_numpy(data, meta.zooms, mask=mask)
    theirs_clean, _ = F.n4_log_field(data, meta.zooms, mask=mask)
    r_ours = np.corrcoef((ours - ours_clean)[mask], applied[mask])[0, 1]
    r_theirs = np.corrcoef((theirs - theirs_clean)[mask], applied[mask])[0, 1]
    assert r_ours >= r_theirs - 0.01, f"{name}: known field recovered {r_ours:.4f} vs SimpleITK {r_theirs:.4f}"


def test_bspline_pieces():
    """Rows of the basis sum to one (partition of unity), and refining a lattice keeps the spline."""
    from volseg.transforms.n4 import _apply, _refine_matrix, basis_matrix

    u = np.linspace(0, 3, 40)
    b = basis_matrix(u, 3)
    assert b.shape == (40, 6) and np.allclose(b.sum(axis=1), 1.0)
    rng = np.random.default_rng(0)
    lattice = rng.normal(size=(4, 5, 6))                       # spans 1, 2, 3
    spans = (1, 2, 3)
    pos = [np.linspace(0, s, 17) for s in spans]
    coarse = _apply([basis_matrix(p, s) for p, s in zip(pos, spans)], lattice)
    fine_lattice = _apply([_refine_matrix(s) for s in spans], lattice)
    fine = _apply([basis_matrix(2 * p, 2 * s) for p, s in zip(pos, spans)], fine_lattice)
    assert fine_lattice.shape == (5, 7, 9)
    assert np.allclose(coarse, fine, atol=1e-9)


def test_numpy_n4_needs_cubic_splines():
    with pytest.raises(ValueError, match="cubic"):
        N4BiasField(backend="numpy", bspline_order=2)


def test_shrink_follows_voxel_size():
    assert F.shrink_factors((1.0, 1.0, 1.0)) == (4, 4, 4)
    assert F.shrink_factors((0.9, 0.9, 3.0)) == (4, 4, 1)
    assert F.shrink_factors((0.5, 0.5, 6.0)) == (8, 8, 1)
    assert F.shrink_factors((1.0, 1.0, 1.0), target_mm=6.0) == (6, 6, 6)


def test_n4_transform_divides_by_the_field_without_rescaling(mni_2mm):
    data, affine = mni_2mm
    t = N4BiasField(iterations=(20, 20))
    out = t(MetaTensor(torch.as_tensor(data[None]), affine=torch.as_tensor(affine)))
    expected = data / np.exp(t.last_log_field)
    assert np.allclose(out[0].numpy(), expected, rtol=1e-4, atol=1e-3)
    assert np.allclose(np.asarray(out.affine), affine)
    assert out.meta["volseg_n4"]["iterations"] == [20, 20]
    d = N4BiasFieldd("image", backend="none")({"image": MetaTensor(torch.as_tensor(data[None]),
                                                                   affine=torch.as_tensor(affine))})
    assert np.array_equal(d["image"][0].numpy(), data)


def test_bad_n4_parameters_are_refused():
    with pytest.raises(ValueError, match="backend"):
        N4BiasField(backend="fsl")
    with pytest.raises(ValueError, match="shrink"):
        N4BiasField(shrink=(0, 1, 1))
    with pytest.raises(ValueError, match="iterations"):
        N4BiasField(iterations=())


@pytest.mark.skipif(not F.ants_available(), reason="ANTs N4BiasFieldCorrection not on PATH")
def test_ants_backend_recovers_known_field(mni_2mm):
    data, affine = mni_2mm
    zooms = tuple(np.linalg.norm(affine[:3, :3], axis=0))
    applied = _smooth_log_field(data.shape, np.random.default_rng(3))
    mask = F.head_mask(data)
    clean_est, _ = F.n4_log_field_ants(data, affine, zooms, mask=mask)
    biased_est, info = F.n4_log_field_ants(data * np.exp(applied), affine, zooms, mask=mask)
    r = np.corrcoef((biased_est - clean_est)[mask], applied[mask])[0, 1]
    assert info["backend"] == "ants"
    assert r >= 0.9
