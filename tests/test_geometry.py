"""Round trips: native grid -> 2 mm working grid -> native grid keeps masks and affines."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from volseg.config import Config
from volseg.io import AtomicWriter, ImageMeta, load_image, orientation_affine, random_affine, voxel_to_world
from volseg.transforms import HeadGrid, grid_chain


def _phantom(shape, affine, rng):
    """A head (ellipsoid shell) and brain (inner ellipsoid) defined in world mm, sampled on a grid."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    xyz = voxel_to_world(affine, ijk).reshape(*shape, 3)
    c = rng.uniform(-5, 5, 3)
    r_brain = np.array([65.0, 80.0, 60.0]) * rng.uniform(0.9, 1.1, 3)
    r_head = r_brain + 15
    q_brain = (((xyz - c) / r_brain) ** 2).sum(-1)
    q_head = (((xyz - c) / r_head) ** 2).sum(-1)
    img = np.where(q_head < 1, 300.0, 0.0) + np.where(q_brain < 1, 500.0, 0.0)
    img += rng.normal(0, 5, shape)
    return img.astype(np.float32), (q_brain < 1).astype(np.uint8)


def _dice(a, b):
    a, b = a > 0, b > 0
    return 2 * (a & b).sum() / (a.sum() + b.sum())


CASES = [
    (1, "RAS", (1.0, 1.0, 1.0)),
    (2, "LPS", (0.9, 0.9, 3.0)),
    (3, "LIA", (1.0, 1.2, 1.0)),
    (4, "PSR", (6.0, 0.8, 0.8)),
    (5, "oblique", (1.1, 1.3, 2.5)),
    (6, "oblique", (0.7, 0.7, 5.0)),
    (7, "oblique", (2.0, 2.0, 2.0)),
]


@pytest.mark.parametrize("seed,kind,zooms", CASES)
def test_mask_round_trip_keeps_dice_and_affine(seed, kind, zooms, tmp_path):
    rng = np.random.default_rng(seed)
    shape = tuple(int(round(220 / z)) for z in zooms)
    affine = (random_affine(rng, shape, zooms, max_rotation_deg=25) if kind == "oblique"
              else orientation_affine(kind, shape, zooms))
    affine[:3, 3] += rng.uniform(-20, 20, 3)
    img, mask = _phantom(shape, affine, rng)
    # write and read back through volseg.io, as a scan would come in
    meta0 = ImageMeta(path="phantom", affine=affine, shape=shape, zooms=zooms)
    with AtomicWriter() as w:
        w.save_image(img, meta0, tmp_path / "img.nii.gz", kind="image")
        w.save_image(mask, meta0, tmp_path / "mask.nii.gz", kind="mask")
    data, meta = load_image(tmp_path / "img.nii.gz")
    ref, _ = load_image(tmp_path / "mask.nii.gz")

    chain = grid_chain(Config(), keys=("image",))
    d = chain({"image": MetaTensor(torch.as_tensor(data[None]), affine=torch.as_tensor(meta.affine))})
    assert tuple(d["image"].shape[1:]) == (96, 128, 160)
    grid_affine = np.asarray(d["image"].affine)
    assert np.allclose(grid_affine[:3, :3], np.eye(3) * 2.0)  # RAS, 2 mm, axis-aligned

    # the reference mask, taken onto the grid the image defined, then back through Invertd
    grid = chain.transforms[0].grid
    on_grid = grid(MetaTensor(torch.as_tensor(ref[None]), affine=torch.as_tensor(meta.affine)),
                   grid_affine=grid_affine)
    assert on_grid[0].sum() > 0
    pred = d["image"].clone()
    pred[0] = on_grid[0]
    back = Invertd("pred", transform=chain, orig_keys="image", nearest_interp=False)(
        {"pred": pred, "image": d["image"]})["pred"]
    assert tuple(back.shape[1:]) == tuple(meta.shape)
    assert np.allclose(np.asarray(back.affine), meta.affine, atol=1e-5)
    dice = _dice(back[0].numpy() > 0.5, ref)
    assert dice >= 0.97, f"{kind} {zooms}: round-trip Dice {dice:.4f}"
    # the one fast inverse both networks use gives Invertd's values (only inside the grid's
    # footprint, which is where Invertd's are not zero padding)
    from volseg.transforms.functional import grid_to_native

    fast = grid_to_native(on_grid[0].numpy(), grid_affine, meta.affine, meta.shape)
    np.testing.assert_allclose(fast, back[0].numpy(), atol=1e-4)  # float32 rounding of the box offset
    boxed = grid_to_native(on_grid[0].numpy(), grid_affine, meta.affine, meta.shape,
                           box=(np.argwhere(ref).min(0) - 1, np.argwhere(ref).max(0) + 2))
    inside = ref > 0
    np.testing.assert_allclose(boxed[inside], back[0].numpy()[inside], atol=1e-4)

    # written outputs carry the input's affine and codes exactly
    out_meta = meta
    with AtomicWriter() as w:
        w.save_image(back[0].numpy() > 0.5, out_meta, tmp_path / "back_mask.nii.gz", kind="mask")
    out = nib.load(tmp_path / "back_mask.nii.gz")
    assert out.get_data_dtype() == np.uint8
    assert out.shape == meta.shape
    assert np.allclose(out.affine, nib.load(tmp_path / "img.nii.gz").affine)
    assert int(out.header["qform_code"]) == meta.qform_code
    assert int(out.header["sform_code"]) == meta.sform_code


def test_grid_is_head_centred_and_keeps_the_top_of_a_tall_scan():
    """A head with a long neck: the grid keeps the top of the head, not the middle of the box."""
    zooms = (1.0, 1.0, 1.0)
    shape = (180, 220, 400)  # 400 mm tall: head + neck + shoulders
    affine = orientation_affine("RAS", shape, zooms)
    img = np.random.default_rng(0).normal(5, 2, shape).astype(np.float32)  # background noise
    img[30:150, 20:200, 200:390] = 100.0  # head, top at z index 389
    img[60:120, 80:140, 0:200] = 90.0  # neck and shoulders
    grid = HeadGrid(2.0, (96, 128, 160), top_margin_mm=10.0)
    ga = grid.compute_grid(MetaTensor(torch.as_tensor(img[None]), affine=torch.as_tensor(affine)))
    top_world = voxel_to_world(affine, np.array([[0, 0, 389.5]]))[0, 2]
    grid_top = ga[2, 3] + 2.0 * 159 + 1.0
    assert abs(grid_top - (top_world + 10.0)) < 2.5
    centre_x = ga[0, 3] + 2.0 * 95 / 2
    assert abs(centre_x - voxel_to_world(affine, np.array([[89.5, 0, 0]]))[0, 0]) < 2.5


def test_inverse_of_headgrid_restores_native_shape_for_4mm_scan(tiny_head):
    image_path, _ = tiny_head
    data, meta = load_image(image_path)
    grid = HeadGrid()
    on_grid = grid(MetaTensor(torch.as_tensor(data[None]), affine=torch.as_tensor(meta.affine)))
    back = grid.inverse(on_grid)
    assert tuple(back.shape[1:]) == meta.shape
    assert np.allclose(np.asarray(back.affine), meta.affine)
    inside = data > data.mean()
    # smooth content survives the trip closely
    assert np.corrcoef(back[0].numpy()[inside], data[inside])[0, 1] > 0.9
