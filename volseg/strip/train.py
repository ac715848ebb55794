"""Training of the skull-stripping U-Net: Dice+focal loss, Adam with one-cycle schedule.

``volseg train strip --config configs/strip.yaml [--resume CKPT]`` calls :func:`train`.
Each epoch ends with validation on held-out real scans (Dice, IoU, 95% Hausdorff on the
working grid); the best epoch by Dice is exported as safetensors + JSON, every epoch is
checkpointed (``last.pt``, loadable with ``weights_only=True``), logged to ``log.csv`` and
drawn in ``learning_curve.png``.

Under ``torchrun`` (e.g. ``torchrun --nproc_per_node=4 -m volseg train strip -c ...``) the
network is wrapped in DistributedDataParallel (NCCL on GPUs, gloo on CPUs), each rank trains
on its own share of the sample sequence (rank ``r`` of ``W`` takes samples ``r, r+W, ...``, so
a step sees ``W * batch_size`` samples) and only rank 0 validates, checkpoints and writes.
One process behaves exactly as without torchrun.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from volseg.config import config_to_dict
from volseg.device import autocast, grad_scaler, pin_memory
from volseg.hpc import distributed as dist
from volseg.nets import build_unet
from volseg.strip.augment import seeded, train_augmentation
from volseg.strip.config import StripConfig
from volseg.training import (append_row, load_checkpoint, one_cycle, plot_learning_curve, run_training,
                             save_checkpoint)
from volseg.config import expand_path
from volseg.strip.data import cached_real, cached_synth, find_pairs, load_cached

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
            self._cache[path] = load_cached(path)
        return self._cache[path]

    def __getitem__(self, i: int):
        i = i + self.start
        rng = np.random.default_rng([self.cfg.train.seed, i])
        use_synth = self.synth and (not self.real or rng.random() < self.cfg.data.synth_ratio)
        pool = self.synth if use_synth else self.real
        img, mask = self._load(pool[int(rng.integers(len(pool)))])
        d = {"image": torch.from_numpy(img[None].copy()), "label": torch.from_numpy(mask[None].copy())}
        d = seeded(self.aug, int(rng.integers(2**31)))(d)
        return torch.as_tensor(d["image"]).float(), (torch.as_tensor(d["label"]) > 0.5).float()


def _metrics(pred: np.ndarray, ref: np.ndarray, spacing: float) -> dict:
    from monai.metrics import compute_hausdorff_distance

    p, r = pred > 0, ref > 0
    inter = float((p & r).sum())
    dice = 2 * inter / max(float(p.sum() + r.sum()), 1.0)
    iou = inter / max(float((p | r).sum()), 1.0)
    hd = compute_hausdorff_distance(torch.as_tensor(p[None, None]), torch.as_tensor(r[None, None]),
                                    percentile=95, spacing=spacing)
    return {"dice": dice, "iou": iou, "hd95_mm": float(hd.item())}


@torch.no_grad()
def validate(net, val: list[Path], device, spacing: float) -> dict:
    net.eval()
    per = {}
    for path in val:
        img, mask = load_cached(path)
        logits = net(torch.from_numpy(img)[None, None].to(device))
        per[path.name.split("-")[1]] = _metrics(logits[0, 0].float().cpu().numpy() > 0, mask > 0.5, spacing)
    net.train()
    if not per:
        return {"dice": float("nan"), "iou": float("nan"), "hd95_mm": float("nan"), "per_scan": {}}
    mean = {k: float(np.mean([m[k] for m in per.values()])) for k in ("dice", "iou", "hd95_mm")}
    return dict(mean, per_scan=per)


def export_weights(net, cfg: StripConfig, dest_dir: Path, extra: dict) -> Path:
    """Write ``model.safetensors`` and ``model.json`` (net config, sha256, metrics)."""
    from volseg.nets.folder import write_model

    return write_model(net, cfg.net, dest_dir, extra)


def train(cfg: StripConfig, resume: Path | None = None,
          max_steps: int | None = None, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train; returns a summary dict (best validation Dice, steps, wall time, paths).

    ``resume`` continues a checkpoint of the same schedule (same total steps); ``stop_after``
    ends early at that step, as an interruption would (for tests). Under torchrun every rank
    calls this; rank 0 writes the outputs (see the module docstring).
    """
    return run_training(_train, cfg, resume, max_steps, progress, stop_after)


def _train(cfg: StripConfig, ctx: dist.DistContext, resume, max_steps, progress, stop_after, t_start) -> dict:
    from monai.losses import DiceFocalLoss
    from tqdm import tqdm

    tc = cfg.train
    device, main = ctx.device, ctx.is_main
    # relative paths are taken from the current folder; ${VOLSEG_SHARED_DATA} defaults to ../shared/data
    out = Path(expand_path(tc.out_dir))
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(expand_path(cfg.data.cache_dir))

    pairs = [p for spec in cfg.data.real for p in find_pairs(expand_path(spec))]
    val_pairs = [p for spec in cfg.data.validation for p in find_pairs(expand_path(spec))]
    val_set = {str(a) for a, _ in val_pairs}
    pairs = [p for p in pairs if str(p[0]) not in val_set]  # never train on a validation scan
    log.info("%d real training pairs, %d validation pairs", len(pairs), len(val_pairs))
    with dist.main_first():  # rank 0 fills the cache, the other ranks then read it
        real = cached_real(pairs, cfg.preprocess, cache)
        val = cached_real(val_pairs, cfg.preprocess, cache)
        synth = cached_synth(cfg.data.synth_count, cfg.data.synth_seed, cfg.preprocess, cache,
                             workers=max(1, tc.threads)) if cfg.data.synth_count else []

    net = build_unet(cfg.net).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    total = max_steps or tc.steps
    sched = one_cycle(opt, tc.lr, total)
    scaler = grad_scaler(device, tc.amp)
    loss_fn = DiceFocalLoss(sigmoid=True, lambda_dice=tc.lambda_dice, lambda_focal=tc.lambda_focal)
    step, best, history = 0, -1.0, []
    if resume:
        step, best = load_checkpoint(resume, net, opt, sched, total, "best_dice", device)
        log.info("resumed from %s at step %d (best Dice %.4f)", resume, step, best)
    model = dist.wrap_model(net, ctx)  # DDP under torchrun (rank 0's weights broadcast), else net

    per_step = tc.batch_size * ctx.world_size  # samples the ranks take together per step
    ds = MixedGridDataset(real, synth, cfg, length=(total - step) * per_step, start=step * per_step)
    loader = DataLoader(ds, batch_size=tc.batch_size, shuffle=False, num_workers=1,
                        sampler=dist.shard_sampler(ds, ctx), pin_memory=pin_memory(device),
                        persistent_workers=False, worker_init_fn=lambda _: torch.set_num_threads(1))
    log_csv = out / "log.csv"
    if main and (not log_csv.exists() or not resume):
        log_csv.write_text("step,epoch,train_loss,val_dice,val_iou,val_hd95_mm,lr,seconds\n")
    running, n_run = 0.0, 0
    bar = tqdm(loader, total=total - step, desc="train strip", disable=not (progress and main), initial=0)
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, tc.amp):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        step += 1
        running += float(loss.item()); n_run += 1
        bar.set_postfix(loss=f"{running / n_run:.4f}")
        if step % tc.steps_per_epoch == 0 or step == total:
            train_loss = dist.all_reduce_mean(running / n_run)  # the mean over the ranks
            running, n_run = 0.0, 0
            if main:  # validates and writes while the other ranks wait at the barrier
                v = validate(net, val, device, cfg.preprocess.grid.spacing_mm)
                row = [step, step // tc.steps_per_epoch, train_loss, v["dice"], v["iou"], v["hd95_mm"],
                       sched.get_last_lr()[0], round(time.perf_counter() - t_start, 1)]
                append_row(log_csv, row)
                history.append({"step": step, "loss": train_loss, **v})
                log.info("step %d loss %.4f val Dice %.4f %s", step, train_loss, v["dice"],
                         {k: round(m["dice"], 4) for k, m in v["per_scan"].items()})
                if v["dice"] > best or not val:
                    best = v["dice"] if val else best
                    export_weights(net, cfg, out / "best", {"step": step, "validation": v,
                                                            "config": config_to_dict(cfg)})
                save_checkpoint(out, net, opt, sched, step, total, "best_dice", best)
                plot_learning_curve(log_csv, out / "learning_curve.png", {"train_loss": "train loss"}, "val_dice",
                                    "val Dice (grid)", loss_label="Dice+focal loss", ylim=(0.5, 1.0))
            dist.barrier()
        if stop_after is not None and step >= stop_after:
            break
    best = dist.broadcast_object(best)  # only rank 0 validates
    if main and step >= total:  # the end of the schedule: what the shipped model is made from
        export_weights(net, cfg, out / "final", {"step": step, "validation": history[-1] if history else None,
                                                 "config": config_to_dict(cfg)})
    summary = {"steps": step, "best_val_dice": best, "wall_s": round(time.perf_counter() - t_start, 1),
               "out_dir": str(out), "history": history[-1:] if history else []}
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


__all__ = ["train", "validate", "MixedGridDataset"]
