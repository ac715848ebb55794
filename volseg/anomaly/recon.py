"""Reconstruction of whole working-grid brains by the anomaly autoencoder (inference only: no
trainer is imported here).

Masked passes (``masked`` > 0, IterMask / masked-autoencoder style, no retraining): the brain's
bounding box is cut into cubes of ``masked`` voxels laid on a 3D checkerboard of 2 phases (cube
parities i+j+k even / odd) or 8 phases (a 2x2x2 interleave: every hidden cube has only visible
neighbours). For each phase the brain voxels of its cubes are replaced by a fill value the network
has learned to repair (``"wm"``: the white-matter level 1.0; ``"median"``: the median brain
intensity; ``"blur"``: a heavily blurred copy of the input), the network reconstructs, and its
output is kept only in those hidden voxels. Every brain voxel is hidden in exactly one phase, so
the reconstruction of each voxel comes from a pass that could not see it: a lesion cannot be
copied through. ``masked_iter`` > 0 adds one IterMask-style round: the brain voxels whose residual
|x - x̂| (3^3 mean) is still above ``masked_iter`` (grown by one voxel) are hidden all at once and
reconstructed from the rest.

``masked_mode="bright"`` (a hybrid): the masked reconstruction x̂_m explains only tissue brighter
than expected and a plain pass x̂_p only tissue darker than expected: the residual is
max(x - x̂_m, x̂_p - x, 0), returned as the reconstruction x - (x - x̂_m) where the first term wins
and x + (x̂_p - x) where the second does (x itself where neither is positive). A network trained to
inpaint hidden cubes repairs bright anomalies it cannot see but also misses fine dark anatomy
(sulci, ventricles) it cannot see; the plain pass keeps that anatomy."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from volseg.anomaly.maps import brain_bbox

MASKED_FILLS = ("wm", "median", "blur")
MASKED_MODES = ("all", "bright")
BLUR_SIGMA_VOX = 4.0  # the "blur" fill: Gaussian sigma in working-grid voxels (8 mm at 2 mm)


def reconstruct(net, image: np.ndarray, mask: np.ndarray, device, multiple: int = 16, passes: int = 1,
                **masked) -> np.ndarray:
    """The network's reconstruction of a whole working-grid brain (on its bounding box);
    ``masked``: the masked-pass options of :func:`reconstruct_batch`."""
    return reconstruct_batch(net, [image], [mask], device, multiple, passes=passes, **masked)[0]


def recon_options(maps) -> dict:
    """The keyword arguments of :func:`reconstruct` / :func:`reconstruct_batch` that a maps
    config (:class:`~volseg.anomaly.config.MapConfig`) sets."""
    return {"passes": maps.passes, "tta": bool(getattr(maps, "tta", False)), "masked": getattr(maps, "masked_block", 0),
            "masked_phases": getattr(maps, "masked_phases", 2), "masked_fill": getattr(maps, "masked_fill", "wm"),
            "masked_iter": getattr(maps, "masked_iter", 0.0), "masked_mode": getattr(maps, "masked_mode", "all")}


def phase_index(shape, block: int, phases: int = 2) -> np.ndarray:
    """The masked-pass phase (0 .. ``phases`` - 1) of every voxel of a box of ``shape``: cubes of
    ``block`` voxels from the box's corner, on a 2-phase 3D checkerboard or a 2x2x2 (8-phase)
    interleave."""
    if block < 1:
        raise ValueError(f"masked block must be >= 1 voxel, got {block}")
    if phases not in (2, 8):
        raise ValueError(f"masked phases must be 2 or 8, got {phases}")
    c = np.meshgrid(*[(np.arange(s) // int(block)) % 2 for s in shape], indexing="ij")
    if phases == 2:
        return ((c[0] + c[1] + c[2]) % 2).astype(np.int64)
    return (c[0] + 2 * c[1] + 4 * c[2]).astype(np.int64)


def _fill(x: torch.Tensor, inside: torch.Tensor, kind: str) -> torch.Tensor:
    """The fill value of hidden voxels, per sample, broadcastable to ``x`` (N, 1, D, H, W)."""
    if kind == "wm":
        return torch.ones((), dtype=x.dtype, device=x.device)
    if kind == "median":
        return torch.stack([x[i][inside[i]].median() if inside[i].any() else x.new_tensor(1.0)
                            for i in range(x.shape[0])]).view(-1, 1, 1, 1, 1)
    if kind == "blur":
        from scipy import ndimage as ndi

        xs, ms = x.float().cpu().numpy(), inside.float().cpu().numpy()
        out = np.empty_like(xs)
        for i in range(xs.shape[0]):
            num = ndi.gaussian_filter(xs[i, 0] * ms[i, 0], BLUR_SIGMA_VOX, mode="constant")
            den = ndi.gaussian_filter(ms[i, 0], BLUR_SIGMA_VOX, mode="constant")
            out[i, 0] = num / np.maximum(den, 1e-3)
        return torch.from_numpy(out).to(x.device, x.dtype)
    raise ValueError(f"masked fill must be one of {MASKED_FILLS}, got {kind!r}")


def masked_pass(net, x: torch.Tensor, inside: torch.Tensor, block: int, phases: int = 2, fill: str = "wm",
                iterate: float = 0.0) -> torch.Tensor:
    """The masked reconstruction of a batch (N, 1, D, H, W): inside the brain each voxel from the
    pass of the phase that hid it, outside the input (see the module notes)."""
    phase = torch.from_numpy(phase_index(x.shape[2:], block, phases)).to(x.device)[None, None]
    value = _fill(x, inside, fill)
    out = x.clone()
    for p in range(phases):
        hide = inside & (phase == p)
        if not hide.any():
            continue
        out = torch.where(hide, net(torch.where(hide, value, x)).float(), out)
    if iterate and iterate > 0:
        r = F.avg_pool3d((x - out).abs(), 3, stride=1, padding=1, count_include_pad=False)
        hide = (F.max_pool3d((r > iterate).float(), 3, stride=1, padding=1) > 0) & inside
        if hide.any():
            out = torch.where(hide, net(torch.where(hide, value, x)).float(), out)
    return out


def hybrid(x: torch.Tensor, masked: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
    """The ``masked_mode="bright"`` reconstruction (module notes): |x - result| equals
    max(x - masked, plain - x, 0) voxel by voxel."""
    pos = (x - masked).clamp(min=0)
    neg = (plain - x).clamp(min=0)
    return torch.where(pos >= neg, x - pos, x + neg)


def reconstruct_batch(net, images, masks, device, multiple: int = 16, batch_size: int | None = None,
                      passes: int = 1, masked: int = 0, masked_phases: int = 2, masked_fill: str = "wm",
                      masked_iter: float = 0.0, masked_mode: str = "all", tta: bool = False) -> list:
    """:func:`reconstruct` for several brains.

    Each brain is cut to its own bounding box (margin 4, a multiple of ``multiple``); brains whose
    boxes have the same shape go through the network together, ``batch_size`` at a time (default:
    all of a shape at once). The autoencoder normalises each sample on its own (instance norm), so
    a result does not depend on its batch. ``passes`` > 1 feeds each reconstruction back through
    the network inside the brain, so that what one pass only partly repaired (a lesion partly
    copied through) is repaired further; outside the brain the input is kept. ``masked`` > 0 (cube
    size in voxels) makes the first pass a masked one (:func:`masked_pass`, with
    ``masked_phases``, ``masked_fill`` and ``masked_iter``); 0 is the plain pass. ``tta``: each
    plain pass is the mean of the network on the brain and on its left-right mirror image (the
    working grid is RAS: axis 2 of (B, C, X, Y, Z)), mirrored back: one more network pass."""
    if masked and masked_fill not in MASKED_FILLS:
        raise ValueError(f"masked fill must be one of {MASKED_FILLS}, got {masked_fill!r}")
    if masked and masked_mode not in MASKED_MODES:
        raise ValueError(f"masked mode must be one of {MASKED_MODES}, got {masked_mode!r}")
    boxes = [brain_bbox(m, margin=4, multiple=multiple, shape=img.shape) for img, m in zip(images, masks)]
    groups: dict[tuple, list[int]] = {}
    for i, box in enumerate(boxes):
        groups.setdefault(tuple(sl.stop - sl.start for sl in box), []).append(i)
    out: list = [None] * len(images)
    for idx in groups.values():
        step = max(1, batch_size or len(idx))
        for start in range(0, len(idx), step):
            part = idx[start:start + step]
            x = torch.stack([torch.from_numpy(np.ascontiguousarray(images[i][boxes[i]], dtype=np.float32))[None]
                             for i in part]).to(device)
            inside = torch.stack([torch.from_numpy(np.ascontiguousarray(masks[i][boxes[i]], dtype=np.float32))[None]
                                  for i in part]).to(device) > 0
            with torch.inference_mode():
                x0 = x
                for k in range(max(1, int(passes))):
                    if k == 0 and masked:
                        x = masked_pass(net, x, inside, int(masked), int(masked_phases), masked_fill,
                                        float(masked_iter))
                    else:
                        y = net(x).float()
                        if tta:
                            y = (y + net(x.flip(2)).float().flip(2)) / 2
                        x = torch.where(inside, y, x)
                if masked and masked_mode == "bright":
                    x = hybrid(x0, x, torch.where(inside, net(x0).float(), x0))
                y = x.float().cpu().numpy()
            for k, i in enumerate(part):
                recon = np.zeros(images[i].shape, dtype=np.float32)
                recon[boxes[i]] = y[k, 0]
                out[i] = recon
    return out


__all__ = ["reconstruct", "reconstruct_batch", "recon_options", "phase_index", "masked_pass", "hybrid", "MASKED_FILLS", "MASKED_MODES"]
