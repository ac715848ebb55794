"""Masked passes of the anomaly reconstruction (volseg.anomaly.recon, maps.masked_*): every brain
voxel is hidden in exactly one phase and reconstructed from that pass; off, nothing changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from volseg.anomaly.config import AEConfig, MapConfig
from volseg.anomaly.maps import brain_bbox
from volseg.anomaly.recon import (BLUR_SIGMA_VOX, phase_index, recon_options, reconstruct,
                                  reconstruct_batch)


class Identity(torch.nn.Module):
    """A network that returns its input, and records the brain voxels each call hid (those
    holding the marker fill value)."""

    def __init__(self, marker: float | None = None):
        super().__init__()
        self.marker, self.hidden = marker, []

    def forward(self, x):
        if self.marker is not None:
            self.hidden.append((x == self.marker).cpu().numpy()[:, 0])
        return x.clone()


def _brain(shape=(40, 44, 36), seed=0):
    """A smooth image in (0.2, 0.95) (never exactly 1.0) inside an ellipsoid brain mask."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    mask = (zz / 0.8) ** 2 + (yy / 0.85) ** 2 + (xx / 0.75) ** 2 < 1
    img = ndi.gaussian_filter(rng.random(shape), 2).astype(np.float32)
    img = 0.2 + 0.75 * (img - img.min()) / (img.max() - img.min())
    return np.where(mask, img, 0).astype(np.float32), mask


@pytest.mark.parametrize("block,phases", [(4, 2), (4, 8), (6, 2), (3, 8)])
def test_identity_net_returns_the_fill_and_each_brain_voxel_is_hidden_once(block, phases):
    img, mask = _brain()
    net = Identity(marker=1.0)
    recon = reconstruct(net, img, mask, "cpu", masked=block, masked_phases=phases, masked_fill="wm")
    # the identity network gives back the fill value in every hidden voxel: the whole brain
    assert np.array_equal(recon[mask], np.ones(int(mask.sum()), np.float32))
    box = brain_bbox(mask, margin=4, multiple=16, shape=img.shape)
    assert np.array_equal(recon[box][~mask[box]], img[box][~mask[box]])  # outside the brain: the input
    # one network call per phase, and each brain voxel hidden in exactly one of them
    assert len(net.hidden) == phases
    count = np.sum([h[0] for h in net.hidden], axis=0)
    assert np.array_equal(count, mask[box].astype(count.dtype))
    # the phases are the cube checkerboard / 2x2x2 interleave of the box
    ph = phase_index(count.shape, block, phases)
    for p, h in enumerate(net.hidden):
        assert np.array_equal(h[0], mask[box] & (ph == p))
    assert set(np.unique(ph)) == set(range(phases))
    assert ph[0, 0, 0] != ph[block, 0, 0] and ph[0, 0, 0] != ph[0, block, 0]
    if phases == 8:  # every neighbour of a hidden cube, corners included, is visible
        assert ph[0, 0, 0] != ph[block, block, block] and ph[0, 0, 0] != ph[block, block, 0]


def test_median_and_blur_fills_are_reproduced_exactly():
    img, mask = _brain(seed=1)
    x = torch.from_numpy(img)
    med = reconstruct(Identity(), img, mask, "cpu", masked=4, masked_fill="median")
    box = brain_bbox(mask, margin=4, multiple=16, shape=img.shape)
    assert np.array_equal(med[mask], np.full(int(mask.sum()), x[torch.from_numpy(mask)].median().item(), np.float32))
    blur = reconstruct(Identity(), img, mask, "cpu", masked=4, masked_phases=8, masked_fill="blur")
    xb, mb = img[box] * mask[box], mask[box].astype(np.float32)
    want = ndi.gaussian_filter(xb, BLUR_SIGMA_VOX, mode="constant") / np.maximum(
        ndi.gaussian_filter(mb, BLUR_SIGMA_VOX, mode="constant"), 1e-3)
    assert np.array_equal(blur[box][mask[box]], want.astype(np.float32)[mask[box]])
    with pytest.raises(ValueError, match="fill"):
        reconstruct(Identity(), img, mask, "cpu", masked=4, masked_fill="zero")


def test_second_round_hides_what_stays_anomalous():
    img, mask = _brain(seed=2)
    net = Identity(marker=1.0)
    recon = reconstruct(net, img, mask, "cpu", masked=4, masked_iter=0.01)
    assert len(net.hidden) == 3  # two phases, then the voxels still anomalous (all: the fill is far off)
    assert np.array_equal(recon[mask], np.ones(int(mask.sum()), np.float32))


def _reconstruct_before(net, images, masks, multiple=16, passes=1):
    """reconstruct_batch as it was before masked passes existed (the reference)."""
    boxes = [brain_bbox(m, margin=4, multiple=multiple, shape=i.shape) for i, m in zip(images, masks)]
    out = []
    for img, m, box in zip(images, masks, boxes):
        x = torch.from_numpy(np.ascontiguousarray(img[box], dtype=np.float32))[None, None]
        inside = torch.from_numpy(np.ascontiguousarray(m[box], dtype=np.float32))[None, None] > 0
        with torch.inference_mode():
            for _ in range(max(1, int(passes))):
                x = torch.where(inside, net(x).float(), x)
        r = np.zeros(img.shape, np.float32)
        r[box] = x.numpy()[0, 0]
        out.append(r)
    return out


@pytest.mark.parametrize("passes", [1, 2])
def test_option_off_is_bit_identical_to_before(passes):
    from volseg.nets.autoencoder import ConvAutoencoder

    torch.manual_seed(0)
    net = ConvAutoencoder(1, (4, 8), 4, residual=True).eval()
    img, mask = _brain(seed=3)
    want = _reconstruct_before(net, [img], [mask], passes=passes)[0]
    assert MapConfig().masked_block == 0 and AEConfig().maps.masked_block == 0
    opts = recon_options(MapConfig(passes=passes))
    assert opts["masked"] == 0
    assert np.array_equal(reconstruct(net, img, mask, "cpu", **opts), want)
    assert np.array_equal(reconstruct_batch(net, [img], [mask], "cpu", passes=passes)[0], want)
    masked = reconstruct(net, img, mask, "cpu", passes=passes, masked=4)
    assert not np.array_equal(masked, want)


def test_shipped_model_config_has_masked_passes_off():
    from volseg.anomaly.infer import load_anomaly_model

    cfg = load_anomaly_model(None).cfg
    assert cfg.maps.masked_block == 0 and recon_options(cfg.maps)["masked"] == 0


def test_training_hides_one_phase_of_cubes_inside_the_brain_only():
    from types import SimpleNamespace

    from volseg.anomaly.recon import phase_index
    from volseg.anomaly.train import hide_cubes

    rng = np.random.default_rng(3)
    clean = rng.uniform(0.3, 1.2, (20, 20, 20)).astype(np.float32)
    mask = np.zeros(clean.shape, bool)
    mask[2:18, 3:17, 4:16] = True
    weight = np.zeros(clean.shape, np.float32)
    weight[5:7, 5:7, 5:7] = 0.4
    ip = SimpleNamespace(blocks=(4,), phases=(2,), fill="wm", weight=1.0)
    out, w = hide_cubes(clean, clean, mask, weight, rng, ip)
    hidden = out != clean
    assert hidden.any() and not (hidden & ~mask).any()  # only brain voxels are hidden
    assert np.all(out[hidden] == 1.0) and np.all(w[hidden] == 1.0)
    frac = hidden.sum() / mask.sum()
    assert 0.3 < frac < 0.7  # one of two checkerboard phases
    assert np.all(w[~hidden] == weight[~hidden])  # other weights kept
    # the hidden set is one phase of a 4-voxel checkerboard: constant phase in every hidden cube
    for off in np.ndindex(4, 4, 4):
        ph = phase_index((24, 24, 24), 4, 2)[off[0]:off[0] + 20, off[1]:off[1] + 20, off[2]:off[2] + 20]
        if any(np.array_equal(hidden, mask & (ph == p)) for p in (0, 1)):
            break
    else:
        raise AssertionError("hidden voxels are not one phase of a shifted 4-voxel checkerboard")
    ip8 = SimpleNamespace(blocks=(3,), phases=(8,), fill="median", weight=0.5)
    out8, w8 = hide_cubes(clean, clean, mask, weight, np.random.default_rng(1), ip8)
    h8 = out8 != clean
    assert 0.05 < h8.sum() / mask.sum() < 0.25  # one of eight phases
    assert np.allclose(out8[h8], np.median(clean[mask])) and np.all(w8[h8] >= 0.5)


def test_inpaint_config_loads_and_checks_its_fill(tmp_path):
    from volseg.anomaly.config import load_ae_config
    from volseg.config import ConfigError

    cfg = load_ae_config("configs/ae_inpaint.yaml")
    assert cfg.inpaint.prob > 0 and cfg.maps.masked_block == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("inpaint:\n  fill: blur\n")
    with pytest.raises(ConfigError, match="inpaint.fill"):
        load_ae_config(bad)


def test_bright_mode_takes_bright_residuals_from_the_masked_pass_and_dark_from_the_plain():
    from volseg.anomaly.recon import hybrid

    x = torch.tensor([1.0, 1.0, 0.5, 1.5, 1.0])
    masked = torch.tensor([1.0, 0.7, 1.0, 1.0, 1.2])   # explains: bright at 1 and 3
    plain = torch.tensor([1.0, 1.0, 0.6, 1.5, 1.1])    # explains: dark at 2 and 4
    got = hybrid(x, masked, plain)
    assert torch.allclose((x - got).abs(), torch.tensor([0.0, 0.3, 0.1, 0.5, 0.1]))
    # on a whole brain: the mode runs and gives the max of the two one-sided residuals
    net = torch.nn.Conv3d(1, 1, 3, padding=1)
    img = np.random.default_rng(0).uniform(0.2, 1.4, (32, 32, 32)).astype(np.float32)
    mask = np.zeros(img.shape, bool)
    mask[4:28, 4:28, 4:28] = True
    r_all = reconstruct(net, img, mask, "cpu", masked=4, masked_mode="all")
    r_plain = reconstruct(net, img, mask, "cpu")
    r_b = reconstruct(net, img, mask, "cpu", masked=4, masked_mode="bright")
    want = np.maximum(np.maximum(img - r_all, r_plain - img), 0)
    assert np.allclose(np.abs(img - r_b)[mask], want[mask], atol=1e-5)
    assert np.array_equal(r_b[~mask], r_plain[~mask])
    with pytest.raises(ValueError, match="masked mode"):
        reconstruct(net, img, mask, "cpu", masked=4, masked_mode="dark")


def test_tta_reconstruction_is_the_mean_with_the_mirrored_pass():
    """maps.tta: the network on the brain and on its left-right mirror image (axis 0 of the grid),
    mirrored back, averaged inside the brain; off, the plain pass is unchanged."""
    from volseg.nets.autoencoder import ConvAutoencoder

    torch.manual_seed(1)
    net = ConvAutoencoder(1, (4, 8), 4, residual=True).eval()
    img, mask = _brain(shape=(32, 32, 32), seed=4)  # centred: the mirrored brain has the mirrored box
    plain = reconstruct(net, img, mask, "cpu")
    mirrored = reconstruct(net, img[::-1].copy(), mask[::-1].copy(), "cpu")[::-1]
    assert not np.allclose(plain[mask], mirrored[mask], atol=1e-4)  # a random net is not symmetric
    opts = recon_options(MapConfig(tta=True))
    assert opts["tta"] is True and recon_options(MapConfig())["tta"] is False
    tta = reconstruct(net, img, mask, "cpu", **opts)
    np.testing.assert_allclose(tta[mask], (plain[mask] + mirrored[mask]) / 2, atol=1e-5)
    np.testing.assert_array_equal(tta[~mask], plain[~mask])  # outside the brain the input is kept
    assert np.array_equal(reconstruct(net, img, mask, "cpu", tta=False), plain)
