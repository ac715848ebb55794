"""Training of the skull-stripping U-Net: Dice+focal loss, Adam with one-cycle schedule.

``volseg train strip --config configs/strip.yaml [--resume CKPT]`` calls :func:`train`.
Each epoch ends with validation on held-out real scans (Dice, IoU, 95% Hausdorff on the
working grid); the best epoch by Dice is exported as safetensors + JSON, every epoch is
checkpointed (``last.pt``, loadable with ``weights_only=True``), logged to ``log.csv`` and
drawn in ``learning_curve.png``. The loop is :func:`volseg.training.train_loop`; this module
holds what is the U-Net's own (:class:`StripHooks`).

Under ``torchrun`` (e.g. ``torchrun --nproc_per_node=4 -m volseg train strip -c ...``) the
network is wrapped in DistributedDataParallel (NCCL on GPUs, gloo on CPUs), each rank trains
on its own share of the sample sequence (rank ``r`` of ``W`` takes samples ``r, r+W, ...``, so
a step sees ``W * batch_size`` samples) and only rank 0 validates, checkpoints and writes.
One process behaves exactly as without torchrun.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from volseg.config import expand_path
from volseg.nets import build_unet
from volseg.strip.augment import seeded, train_augmentation
from volseg.strip.config import StripConfig
from volseg.strip.data import cached_real, cached_synth, find_pairs, load_cached
from volseg.training import TrainHooks, train_loop

log = logging.getLogger(__name__)


class MixedGridDataset(Dataset):
    """Index ``i`` draws a synthetic sample with probability ``synth_ratio``, else a real one,
    then augments it; everything is a function of ``(seed, i)`` so a resumed run continues
    the same sequence."""

    def __init__(self, real: list[Path], synth: list[Path], cfg: StripConfig, length: int, start: int = 0):
        if not real and not synth:
            raise ValueError("no training data: give data.real pairs or data.synth_count > 0")
        self.real, self.synth, self.cfg = real, synth, cfg
        self.length, self.start = length, start
        self.aug = train_augmentation(cfg.augment, cfg.preprocess.grid.spacing_mm)
        self._cache: dict[Path, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.length

    def _load(self, path: Path):
        if path not in self._cache:
            if len(self._cache) > 400:
                self._cache.clear()
            self._cache[path] = load_cached(path, with_valid=True)
        return self._cache[path]

    def __getitem__(self, i: int):
        i = i + self.start
        rng = np.random.default_rng([self.cfg.train.seed, i])
        use_synth = self.synth and (not self.real or rng.random() < self.cfg.data.synth_ratio)
        pool = self.synth if use_synth else self.real
        img, mask, valid = self._load(pool[int(rng.integers(len(pool)))])
        # an untrusted region (valid = 0) rides along as a second label channel, so every spatial
        # augmentation moves it with the mask
        label = mask[None] if valid is None else np.stack([mask, valid])
        d = {"image": torch.from_numpy(img[None].copy()), "label": torch.from_numpy(label.copy())}
        d = seeded(self.aug, int(rng.integers(2**31)))(d)
        lab = torch.as_tensor(d["label"]).float()
        weight = (lab[1:2] > 0.5).float() if valid is not None else torch.ones_like(lab[:1])
        return torch.as_tensor(d["image"]).float(), (lab[:1] > 0.5).float(), weight


def mask_metrics(pred: np.ndarray, ref: np.ndarray, spacing) -> dict:
    """Dice, IoU (MONAI's ``compute_dice`` / ``compute_iou``) and the 95% Hausdorff distance in
    mm of two binary masks (non-zero = inside). Both masks empty: Dice = IoU = 1 (they agree);
    an empty reference with a non-empty prediction: 0."""
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou

    p = torch.as_tensor(np.asarray(pred) > 0)[None, None]
    r = torch.as_tensor(np.asarray(ref) > 0)[None, None]
    hd = compute_hausdorff_distance(p, r, percentile=95, spacing=spacing)
    return {"dice": float(compute_dice(p, r, ignore_empty=False).item()),
            "iou": float(compute_iou(p, r, ignore_empty=False).item()), "hd95_mm": float(hd.item())}


@torch.no_grad()
def validate(net, val: list[Path], device, spacing: float) -> dict:
    net.eval()
    per = {}
    for path in val:
        img, mask = load_cached(path)
        logits = net(torch.from_numpy(img)[None, None].to(device))
        per[path.name.split("-")[1]] = mask_metrics(logits[0, 0].float().cpu().numpy() > 0, mask > 0.5, spacing)
    net.train()
    if not per:
        return {"dice": float("nan"), "iou": float("nan"), "hd95_mm": float("nan"), "per_scan": {}}
    mean = {k: float(np.mean([m[k] for m in per.values()])) for k in ("dice", "iou", "hd95_mm")}
    return dict(mean, per_scan=per)


class StripHooks(TrainHooks):
    """The skull-stripping U-Net in :func:`volseg.training.train_loop`: real and synthetic heads,
    Dice+focal loss, the best epoch by validation Dice."""

    name, metric, columns = "strip", "dice", ("dice", "iou", "hd95_mm")
    curve = {"losses": {"train_loss": "train loss"}, "metric_label": "val Dice (grid)",
             "loss_label": "Dice+focal loss", "ylim": (0.5, 1.0)}

    def __init__(self, cfg: StripConfig, init: Path | None = None):
        from monai.losses import DiceFocalLoss

        super().__init__(cfg, init)
        self.loss_fn = DiceFocalLoss(sigmoid=True, lambda_dice=cfg.train.lambda_dice,
                                     lambda_focal=cfg.train.lambda_focal)

    def prepare(self, ctx) -> None:
        cfg = self.cfg
        cache = Path(expand_path(cfg.data.cache_dir))
        pairs = [p for spec in cfg.data.real for p in find_pairs(expand_path(spec))]
        val_pairs = [p for spec in cfg.data.validation for p in find_pairs(expand_path(spec))]
        val_set = {str(a) for a, _ in val_pairs}
        pairs = [p for p in pairs if str(p[0]) not in val_set]  # never train on a validation scan
        log.info("%d real training pairs, %d validation pairs", len(pairs), len(val_pairs))
        self.real = cached_real(pairs, cfg.preprocess, cache)
        self.val = cached_real(val_pairs, cfg.preprocess, cache)
        self.synth = cached_synth(cfg.data.synth_count, cfg.data.synth_seed, cfg.preprocess, cache,
                                  workers=max(1, cfg.train.threads), contrasts=cfg.data.synth_contrasts,
                                  weights=cfg.data.synth_contrast_weights) if cfg.data.synth_count else []

    def build_net(self):
        return self.load_init(build_unet(self.cfg.net), "strip")

    def export_extra(self) -> dict:
        return {"init": self.init_ref} if self.init_ref else {}

    def dataset(self, length: int, start: int):
        return MixedGridDataset(self.real, self.synth, self.cfg, length=length, start=start)

    def loss(self, model, batch, cast):
        x, y, w = batch
        with cast():
            # left-out voxels (w = 0): a sure 'outside' on both sides, no gradient; w = 1 elsewhere
            logits = torch.where(w > 0, model(x), torch.tensor(-30.0, device=x.device))
            return self.loss_fn(logits, y * w)

    def validate(self, net, device) -> dict:
        return validate(net, self.val, device, self.cfg.preprocess.grid.spacing_mm)


def train(cfg: StripConfig, resume: Path | None = None,
          max_steps: int | None = None, progress: bool = True, stop_after: int | None = None,
          init: Path | None = None) -> dict:
    """Train; returns a summary dict (best validation Dice, steps, wall time, paths).

    ``resume`` continues a checkpoint of the same schedule (same total steps); ``stop_after``
    ends early at that step, as an interruption would (for tests). ``init``: a strip model
    folder whose weights start the training (fine-tuning; not read when resuming). Under
    torchrun every rank calls this; rank 0 writes the outputs (see the module docstring).
    """
    return train_loop(cfg, StripHooks(cfg, init=None if resume else init), resume=resume,
                      max_steps=max_steps, progress=progress, stop_after=stop_after)


__all__ = ["train", "validate", "mask_metrics", "MixedGridDataset", "StripHooks"]
