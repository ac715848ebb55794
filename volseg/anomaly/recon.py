"""Reconstruction of whole working-grid brains by the anomaly autoencoder (inference only: no
trainer is imported here)."""

from __future__ import annotations

import numpy as np
import torch

from volseg.anomaly.maps import brain_bbox


def reconstruct(net, image: np.ndarray, mask: np.ndarray, device, multiple: int = 16, passes: int = 1) -> np.ndarray:
    """The network's reconstruction of a whole working-grid brain (on its bounding box)."""
    return reconstruct_batch(net, [image], [mask], device, multiple, passes=passes)[0]


def reconstruct_batch(net, images, masks, device, multiple: int = 16, batch_size: int | None = None,
                      passes: int = 1) -> list:
    """:func:`reconstruct` for several brains.

    Each brain is cut to its own bounding box (margin 4, a multiple of ``multiple``); brains whose
    boxes have the same shape go through the network together, ``batch_size`` at a time (default:
    all of a shape at once). The autoencoder normalises each sample on its own (instance norm), so
    a result does not depend on its batch. ``passes`` > 1 feeds each reconstruction back through
    the network inside the brain, so that what one pass only partly repaired (a lesion partly
    copied through) is repaired further; outside the brain the input is kept."""
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
                for _ in range(max(1, int(passes))):
                    x = torch.where(inside, net(x).float(), x)
                y = x.float().cpu().numpy()
            for k, i in enumerate(part):
                recon = np.zeros(images[i].shape, dtype=np.float32)
                recon[boxes[i]] = y[k, 0]
                out[i] = recon
    return out


__all__ = ["reconstruct", "reconstruct_batch"]
