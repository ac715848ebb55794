"""Training of the anomaly autoencoder on healthy brains (``volseg train ae``).

Each sample is a 64^3 patch of a healthy, white-matter-scaled brain on the working grid,
augmented (affine, elastic, gamma, bias, noise), then corrupted with synthetic anomalies
(:func:`volseg.anomaly.lesions.corrupt_patch`); the network is asked for the *clean* patch
(a denoising autoencoder) with :func:`restoration_loss`: the L1 over the patch plus the L1
over the corrupted voxels alone, so that removing anomalies weighs as much as copying healthy
tissue. Every epoch the
whole-grid anomaly map of held-out brains with inserted lesions is scored by voxel AUPRC;
the best epoch is exported (safetensors + JSON), ``last.pt`` is checkpointed (loadable with
``weights_only=True``), ``log.csv`` and ``learning_curve.png`` are written.

Under ``torchrun`` (``torchrun --nproc_per_node=N -m volseg train ae -c configs/ae.yaml``) the
network is wrapped in DistributedDataParallel (NCCL on GPUs, gloo on CPUs), rank ``r`` of ``W``
takes samples ``r, r+W, ...`` and only rank 0 validates, checkpoints and writes.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from volseg.anomaly.config import AEConfig
from volseg.anomaly.data import cached_brains, cached_synth_brains, cached_validation, load_npz
from volseg.anomaly.lesions import corrupt_patch
from volseg.anomaly.maps import residual_map
from volseg.anomaly.recon import reconstruct
from volseg.config import config_to_dict
from volseg.device import autocast, grad_scaler, pin_memory
from volseg.hpc import distributed as dist
from volseg.nets.autoencoder import build_autoencoder
from volseg.config import expand_path
from volseg.training import (append_row, load_checkpoint, one_cycle, plot_learning_curve, run_training,
                             save_checkpoint)

log = logging.getLogger(__name__)


def patch_augmentation(aug, spacing_mm: float = 2.0):
    import math

    from monai.transforms import (
        Compose,
        Rand3DElasticd,
        RandAdjustContrastd,
        RandAffined,
        RandBiasFieldd,
        RandFlipd,
        RandGaussianNoised,
    )

    rot = math.radians(aug.rotate_deg)
    keys = ("image", "mask")
    return Compose([
        RandAffined(keys, prob=aug.prob, rotate_range=(rot,) * 3, scale_range=(aug.scale,) * 3,
                    mode=("bilinear", "nearest"), padding_mode="zeros", cache_grid=False),
        Rand3DElasticd(keys, prob=aug.elastic, sigma_range=(4, 6), magnitude_range=(20, 60),
                       mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandFlipd(keys, prob=aug.flip_lr, spatial_axis=0),
        RandAdjustContrastd("image", prob=aug.gamma, gamma=(0.7, 1.5)),
        RandBiasFieldd("image", prob=aug.bias, coeff_range=(0.0, 0.2)),
        RandGaussianNoised("image", prob=aug.noise, std=0.03),
    ])


class PatchDataset(Dataset):
    """Index ``i`` -> (corrupted patch, clean patch, corruption strength in [0, 1]); a function
    of (seed, i)."""

    def __init__(self, real: list[Path], synth: list[Path], cfg: AEConfig, length: int, start: int = 0):
        if not real and not synth:
            raise ValueError("no training data: give data.healthy brains or data.synth_count > 0")
        self.real, self.synth, self.cfg = real, synth, cfg
        self.length, self.start = length, start
        self.aug = patch_augmentation(cfg.augment, cfg.preprocess.grid.spacing_mm)
        self._cache: dict[Path, dict] = {}

    def __len__(self) -> int:
        return self.length

    def _load(self, path: Path) -> dict:
        if path not in self._cache:
            if len(self._cache) > 200:
                self._cache.clear()
            self._cache[path] = load_npz(path)
        return self._cache[path]

    def sample(self, i: int):
        cfg = self.cfg
        rng = np.random.default_rng([cfg.train.seed, i])
        use_synth = self.synth and (not self.real or rng.random() < cfg.data.synth_ratio)
        pool = self.synth if use_synth else self.real
        d = self._load(pool[int(rng.integers(len(pool)))])
        img, mask = d["image"], d["mask"]
        ps = np.asarray(cfg.train.patch)
        cand = np.argwhere(mask[::4, ::4, ::4]) * 4
        c = cand[int(rng.integers(len(cand)))] if len(cand) else np.asarray(img.shape) // 2
        lo = np.clip(c - ps // 2, 0, np.asarray(img.shape) - ps)
        box = tuple(slice(int(a), int(a + s)) for a, s in zip(lo, ps))
        sample = {"image": torch.from_numpy(img[box][None].copy()),
                  "mask": torch.from_numpy(mask[box][None].astype(np.float32))}
        self.aug.set_random_state(seed=int(rng.integers(2**31)))
        sample = self.aug(sample)
        clean = np.asarray(sample["image"][0], dtype=np.float32)
        m = np.asarray(sample["mask"][0]) > 0.5
        clean = np.where(m, clean, 0).astype(np.float32)
        if rng.random() < cfg.augment.csf_grow:
            clean = grow_csf(clean, m, rng)
        noisy, corrupted = corrupt_patch(clean, m, rng, cfg.corruption, cfg.preprocess.grid.spacing_mm)
        return noisy, clean, corrupted.astype(np.float32)

    def __getitem__(self, i: int):
        noisy, clean, weight = self.sample(i + self.start)
        return torch.from_numpy(noisy[None]), torch.from_numpy(clean[None]), torch.from_numpy(weight[None])


def grow_csf(x: np.ndarray, mask: np.ndarray, rng, level: float = 0.35) -> np.ndarray:
    """Healthy variation of CSF spaces (ventricles and sulci widen with age): the CSF (below
    ``level`` x white matter, deeper than 6 voxels inside the brain: the ventricles) grown by 1-2 voxels, the new rim taking the CSF's
    own intensity with a soft edge. A *clean* augmentation: the network must learn that wide
    ventricles are normal, not fill them in."""
    from scipy import ndimage as ndi

    csf = mask & (x < level) & (x > 0) & (ndi.distance_transform_edt(mask) > 6)  # deep: the ventricles
    if csf.sum() < 20:
        return x
    grown = ndi.binary_dilation(csf, iterations=int(rng.integers(1, 3))) & mask
    rim = grown & ~csf
    soft = ndi.gaussian_filter(grown.astype(np.float32), 0.7)
    target = float(np.median(x[csf]))
    out = np.where(rim | (soft > 0.5) & ~csf, x * (1 - soft) + target * soft, x)
    return np.where(mask, out, 0.0).astype(np.float32)


def restoration_loss(pred, clean, corrupted, weight: float = 1.0):
    """L1 over the patch plus ``weight`` times the L1 over the corrupted voxels alone (weighted
    by corruption strength). Balancing the two keeps the rare corrupted voxels from being
    drowned by the healthy ones, where copying the input is already right."""
    err = (pred - clean).abs()
    dims = tuple(range(1, err.dim()))
    whole = err.mean(dim=dims)
    focus = (corrupted * err).sum(dim=dims) / corrupted.sum(dim=dims).clamp(min=1.0)
    return (whole + weight * focus).mean()


def _auprc(score: np.ndarray, truth: np.ndarray) -> float:
    from sklearn.metrics import average_precision_score

    if truth.sum() == 0 or truth.all():
        return float("nan")
    return float(average_precision_score(truth.astype(np.uint8), score))


@torch.no_grad()
def validate(net, val: list[Path], cfg: AEConfig, device) -> dict:
    net.eval()
    per = {}
    mc = cfg.maps
    erode = int(round(mc.erode_mm / cfg.preprocess.grid.spacing_mm))
    for path in val:
        d = load_npz(path)
        recon = reconstruct(net, d["image"], d["mask"], device, passes=mc.passes)
        amap = residual_map(d["image"], recon, d["mask"], mc.residual, erode, mc.median_size)
        inside = d["mask"] > 0
        raw = np.abs(d["image"] - 1.0)  # the no-model baseline: distance from the white-matter level
        per[path.name.split("-")[1]] = {"auprc": _auprc(amap[inside], d["lesion"][inside]),
                                        "auprc_raw": _auprc(raw[inside], d["lesion"][inside]),
                                        "l1": float(np.abs(recon - d["image"])[inside & ~d["lesion"]].mean())}
    net.train()
    if not per:
        return {"auprc": float("nan"), "l1": float("nan"), "per_scan": {}}
    return {"auprc": float(np.nanmean([m["auprc"] for m in per.values()])),
            "l1": float(np.mean([m["l1"] for m in per.values()])), "per_scan": per}


def export_weights(net, cfg: AEConfig, dest_dir: Path, extra: dict) -> Path:
    from volseg.nets.folder import write_model

    return write_model(net, cfg.net, dest_dir, dict(extra, kind="ae"))


def train(cfg: AEConfig, resume: Path | None = None, max_steps: int | None = None, progress: bool = True,
          stop_after: int | None = None, init: Path | None = None) -> dict:
    """Train; returns a summary (best validation AUPRC, steps, wall time, paths).

    ``init``: a model folder whose weights start the training (fine-tuning); its network
    settings must equal ``cfg.net``.
    """
    return run_training(_train, cfg, resume, max_steps, progress, stop_after, init)


def init_weights(net, init: Path, cfg: AEConfig) -> dict:
    """Load a model folder's checked weights into ``net`` (same architecture); returns its info."""
    from volseg.config import config_from_dict
    from volseg.anomaly.config import AENetConfig
    from volseg.nets.folder import WeightsError, load_model

    src, info = load_model(init, kind="ae", device="cpu")
    theirs = config_from_dict(info.get("net") or {}, AENetConfig, source=str(Path(init) / "model.json"))
    if theirs != cfg.net:
        raise WeightsError(f"{init}: its network ({theirs}) differs from the config's ({cfg.net}); "
                           "fine-tuning keeps the architecture")
    net.load_state_dict(src.state_dict())
    return info


def _train(cfg: AEConfig, ctx, resume, max_steps, progress, stop_after, init, t_start) -> dict:
    from tqdm import tqdm

    tc = cfg.train
    device, main = ctx.device, ctx.is_main
    out = Path(expand_path(tc.out_dir))
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(expand_path(cfg.data.cache_dir))
    val_specs = set(cfg.data.validation)
    with dist.main_first():  # rank 0 fills the cache, the other ranks then read it
        real = cached_brains([s for s in cfg.data.healthy if s not in val_specs], cfg, cache)
        synth = cached_synth_brains(cfg.data.synth_count, cfg.data.synth_seed, cfg, cache) if cfg.data.synth_count else []
        val = cached_validation(cfg.data.validation, cfg, cache)
    log.info("%d real and %d synthetic healthy brains, %d validation brains", len(real), len(synth), len(val))

    net = build_autoencoder(cfg.net)
    init_info = None
    if init is not None and not resume:
        init_info = init_weights(net, Path(init), cfg)
        log.info("weights from %s (sha256 %s...)", init, str(init_info.get("sha256"))[:12])
    net = net.to(device)
    opt = torch.optim.Adam(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    total = max_steps or tc.steps
    sched = one_cycle(opt, tc.lr, total)
    scaler = grad_scaler(device, tc.amp)
    step, best, history = 0, -1.0, []
    if resume:
        step, best = load_checkpoint(resume, net, opt, sched, total, "best_auprc", device)
        log.info("resumed from %s at step %d (best AUPRC %.4f)", resume, step, best)
    init_ref = {"model_dir": str(init), "sha256": init_info.get("sha256")} if init_info else None
    model = dist.wrap_model(net, ctx)  # DDP under torchrun, else net

    per_step = tc.batch_size * ctx.world_size
    ds = PatchDataset(real, synth, cfg, length=(total - step) * per_step, start=step * per_step)
    loader = DataLoader(ds, batch_size=tc.batch_size, shuffle=False, num_workers=1,
                        sampler=dist.shard_sampler(ds, ctx), pin_memory=pin_memory(device),
                        worker_init_fn=lambda _: torch.set_num_threads(1))
    log_csv = out / "log.csv"
    if main and (not log_csv.exists() or not resume):
        log_csv.write_text("step,epoch,train_loss,val_auprc,val_l1,lr,seconds\n")
    running, n_run = 0.0, 0
    bar = tqdm(loader, total=total - step, desc="train ae", disable=not (progress and main))
    for x, y, w in bar:
        x, y, w = (t.to(device, non_blocking=True) for t in (x, y, w))
        with autocast(device, tc.amp):
            pred = model(x)
        loss = restoration_loss(pred.float(), y, w, cfg.corruption.weight)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        step += 1
        running += float(loss.item()); n_run += 1
        bar.set_postfix(loss=f"{running / n_run:.4f}")
        if step % tc.steps_per_epoch == 0 or step == total:
            train_loss = dist.all_reduce_mean(running / n_run)
            running, n_run = 0.0, 0
            if main:  # validates and writes while the other ranks wait at the barrier
                v = validate(net, val, cfg, device)
                row = [step, step // tc.steps_per_epoch, train_loss, v["auprc"], v["l1"],
                       sched.get_last_lr()[0], round(time.perf_counter() - t_start, 1)]
                append_row(log_csv, row)
                history.append({"step": step, "loss": train_loss, **v})
                log.info("step %d loss %.4f val AUPRC %.4f %s", step, train_loss, v["auprc"],
                         {k: (round(m["auprc"], 4), round(m["auprc_raw"], 4)) for k, m in v["per_scan"].items()})
                if not val or v["auprc"] > best:
                    best = v["auprc"] if val else best
                    export_weights(net, cfg, out / "best", {"step": step, "validation": v, "init": init_ref,
                                                            "config": config_to_dict(cfg)})
                save_checkpoint(out, net, opt, sched, step, total, "best_auprc", best)
                plot_learning_curve(log_csv, out / "learning_curve.png",
                                    {"train_loss": "train loss", "val_l1": "val L1 (healthy voxels)"},
                                    "val_auprc", "val voxel AUPRC (grid)", loss_label="L1")
            dist.barrier()
        if stop_after is not None and step >= stop_after:
            break
    best = dist.broadcast_object(best)
    if main and step >= total:
        export_weights(net, cfg, out / "final", {"step": step, "validation": history[-1] if history else None,
                                                 "init": init_ref, "config": config_to_dict(cfg)})
    summary = {"steps": step, "best_val_auprc": best, "wall_s": round(time.perf_counter() - t_start, 1),
               "out_dir": str(out), "history": history[-1:] if history else []}
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


__all__ = ["train", "validate", "PatchDataset", "restoration_loss", "patch_augmentation"]
