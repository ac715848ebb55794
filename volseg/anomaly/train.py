"""Training of the anomaly autoencoder on healthy brains (``volseg train ae``).

Each sample is a 64^3 patch of a healthy, white-matter-scaled brain on the working grid,
augmented (affine, elastic, gamma, bias, noise), then corrupted with synthetic anomalies
(:func:`volseg.anomaly.lesions.corrupt_patch`); the network is asked for the *clean* patch
(a denoising autoencoder) with :func:`restoration_loss`: the L1 over the patch plus the L1
over the corrupted voxels alone, so that removing anomalies weighs as much as copying healthy
tissue. Every epoch the
whole-grid anomaly map of held-out brains with inserted lesions is scored by voxel AUPRC;
the best epoch is exported (safetensors + JSON), ``last.pt`` is checkpointed (loadable with
``weights_only=True``), ``log.csv`` and ``learning_curve.png`` are written. The loop is
:func:`volseg.training.train_loop`; this module holds what is the autoencoder's own
(:class:`AEHooks`).

Under ``torchrun`` (``torchrun --nproc_per_node=N -m volseg train ae -c configs/ae.yaml``) the
network is wrapped in DistributedDataParallel (NCCL on GPUs, gloo on CPUs), rank ``r`` of ``W``
takes samples ``r, r+W, ...`` and only rank 0 validates, checkpoints and writes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from volseg.anomaly.config import AEConfig
from volseg.anomaly.data import cached_brains, cached_synth_brains, cached_validation, load_npz
from volseg.anomaly.lesions import corrupt_patch
from volseg.anomaly.maps import residual_map
from volseg.anomaly.recon import recon_options, reconstruct
from volseg.config import expand_path
from volseg.nets.autoencoder import build_autoencoder
from volseg.training import TrainHooks, train_loop

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
        patch = img[box]
        if cfg.augment.tissue_contrast > 0 and rng.random() < cfg.augment.tissue_contrast:
            patch = tissue_contrast(patch, rng, cfg.augment.tissue_level)  # an acquisition's property: first
        sample = {"image": torch.from_numpy(patch[None].copy()),
                  "mask": torch.from_numpy(mask[box][None].astype(np.float32))}
        self.aug.set_random_state(seed=int(rng.integers(2**31)))
        sample = self.aug(sample)
        clean = np.asarray(sample["image"][0], dtype=np.float32)
        m = np.asarray(sample["mask"][0]) > 0.5
        clean = np.where(m, clean, 0).astype(np.float32)
        if rng.random() < cfg.augment.csf_grow:
            clean = grow_csf(clean, m, rng)
        noisy, corrupted = corrupt_patch(clean, m, rng, cfg.corruption, cfg.preprocess.grid.spacing_mm)
        if cfg.augment.thick_slices > 0 and rng.random() < cfg.augment.thick_slices:  # after the lesions: the acquisition blurs them too
            axis = int(rng.integers(3))
            width = rng.uniform(*cfg.augment.slice_mm) / cfg.preprocess.grid.spacing_mm
            noisy, clean, corrupted = (np.where(m, thick_slices(a, axis, width), 0).astype(np.float32)
                                       for a in (noisy, clean, corrupted))
        ip = getattr(cfg, "inpaint", None)
        if ip is not None and ip.prob > 0 and rng.random() < ip.prob:
            noisy, corrupted = hide_cubes(noisy, clean, m, corrupted, rng, ip)
        return noisy, clean, corrupted.astype(np.float32)

    def __getitem__(self, i: int):
        noisy, clean, weight = self.sample(i + self.start)
        return torch.from_numpy(noisy[None]), torch.from_numpy(clean[None]), torch.from_numpy(weight[None])


def hide_cubes(noisy: np.ndarray, clean: np.ndarray, mask: np.ndarray, weight: np.ndarray, rng, ip):
    """The inpainting task of a patch (:class:`~volseg.anomaly.config.InpaintConfig`): one phase of
    a cube lattice (random cube size, kind and offset) is hidden inside the brain by the fill;
    the hidden voxels join the loss's focus with weight ``ip.weight`` (the target stays the clean
    patch). Returns (input, focus weights)."""
    from volseg.anomaly.recon import phase_index

    block = int(rng.choice(np.asarray(ip.blocks)))
    phases = int(rng.choice(np.asarray(ip.phases)))
    off = rng.integers(0, block, size=3)
    big = phase_index(tuple(s + block for s in noisy.shape), block, phases)
    phase = big[off[0]:off[0] + noisy.shape[0], off[1]:off[1] + noisy.shape[1], off[2]:off[2] + noisy.shape[2]]
    hide = mask & (phase == int(rng.integers(phases)))
    if not hide.any():
        return noisy, weight
    fill = 1.0 if ip.fill == "wm" else float(np.median(noisy[mask]))
    out = np.where(hide, np.float32(fill), noisy).astype(np.float32)
    return out, np.maximum(weight, hide.astype(np.float32) * float(ip.weight))


def tissue_contrast(x: np.ndarray, rng, level=(0.6, 0.93)) -> np.ndarray:
    """Another grey/white contrast for a white-matter-scaled patch: values in [0, 1] mapped by the
    monotone piecewise-linear curve through (0, 0), (0.3, a), (0.75, b), (1, 1), with b drawn from
    ``level`` and a from [0.2, min(0.45, b - 0.15)]; white matter (1) and brighter tissue are
    unchanged, so lesion contrasts painted afterwards keep their meaning (multiples of white
    matter). Clinical 2D T1 scans have far less grey/white contrast than 3D T1 (grey matter near
    0.9 instead of 0.75)."""
    b = float(rng.uniform(*level))
    a = float(rng.uniform(0.2, max(0.2, min(0.45, b - 0.15))))
    x = np.asarray(x, np.float32)
    low = np.interp(x, [0.0, 0.3, 0.75, 1.0], [0.0, a, b, 1.0]).astype(np.float32)
    return np.where(x < 1.0, low, x).astype(np.float32)


def thick_slices(x: np.ndarray, axis: int, width: float) -> np.ndarray:
    """``x`` as a thick-slice acquisition would give it on the same grid: averaged over slabs
    ``width`` voxels thick (fractional widths allowed: area resampling) along ``axis`` and
    interpolated back linearly. The through-plane detail is lost, in-plane detail kept."""
    if width <= 1.0:
        return np.asarray(x, np.float32)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    size = list(x.shape)
    low = list(size)
    low[axis] = max(1, int(round(size[axis] / width)))
    down = F.interpolate(t, size=low, mode="area")
    return F.interpolate(down, size=size, mode="trilinear", align_corners=False)[0, 0].numpy()


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


def restoration_loss(pred, clean, corrupted, weight: float = 1.0, noisy=None):
    """L1 over the patch plus ``weight`` times the L1 over the corrupted voxels alone (weighted
    by corruption strength). Balancing the two keeps the rare corrupted voxels from being
    drowned by the healthy ones, where copying the input is already right.

    With ``noisy`` (the corrupted input; ``corruption.relative``) the corrupted-voxel term is the
    unrepaired fraction of each voxel's corruption, ``|pred - clean| / |noisy - clean|`` (at most 2;
    changes under 0.02 count as 0.02): copying the input costs 1 whatever the lesion's contrast."""
    err = (pred - clean).abs()
    dims = tuple(range(1, err.dim()))
    whole = err.mean(dim=dims)
    local = err if noisy is None else (err / (noisy - clean).abs().clamp(min=0.02)).clamp(max=2.0)
    focus = (corrupted * local).sum(dim=dims) / corrupted.sum(dim=dims).clamp(min=1.0)
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
        recon = reconstruct(net, d["image"], d["mask"], device, **recon_options(mc))
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


class AEHooks(TrainHooks):
    """The anomaly autoencoder in :func:`volseg.training.train_loop`: corrupted healthy patches,
    :func:`restoration_loss`, the best epoch by validation AUPRC; ``init``: a model folder whose
    weights start the training (not read when resuming)."""

    name, metric, columns, model_kind = "ae", "auprc", ("auprc", "l1"), "ae"
    curve = {"losses": {"train_loss": "train loss", "val_l1": "val L1 (healthy voxels)"},
             "metric_label": "val voxel AUPRC (grid)", "loss_label": "L1"}

    def __init__(self, cfg: AEConfig, init: Path | None = None):
        super().__init__(cfg, init)

    def prepare(self, ctx) -> None:
        cfg = self.cfg
        cache = Path(expand_path(cfg.data.cache_dir))
        val_specs = set(cfg.data.validation)
        self.real = cached_brains([s for s in cfg.data.healthy if s not in val_specs], cfg, cache)
        self.synth = (cached_synth_brains(cfg.data.synth_count, cfg.data.synth_seed, cfg, cache)
                      if cfg.data.synth_count else [])
        self.val = cached_validation(cfg.data.validation, cfg, cache)
        log.info("%d real and %d synthetic healthy brains, %d validation brains",
                 len(self.real), len(self.synth), len(self.val))

    def build_net(self):
        return self.load_init(build_autoencoder(self.cfg.net), "ae")

    def dataset(self, length: int, start: int):
        return PatchDataset(self.real, self.synth, self.cfg, length=length, start=start)

    def loss(self, model, batch, cast):
        x, y, w = batch
        with cast():
            pred = model(x)
        return restoration_loss(pred.float(), y, w, self.cfg.corruption.weight,
                                noisy=x.float() if self.cfg.corruption.relative else None)

    def validate(self, net, device) -> dict:
        return validate(net, self.val, self.cfg, device)

    def export_extra(self) -> dict:
        return {"init": self.init_ref}

    def per_scan(self, v: dict) -> dict:
        return {k: (round(m["auprc"], 4), round(m["auprc_raw"], 4)) for k, m in v["per_scan"].items()}


def train(cfg: AEConfig, resume: Path | None = None, max_steps: int | None = None, progress: bool = True,
          stop_after: int | None = None, init: Path | None = None) -> dict:
    """Train; returns a summary (best validation AUPRC, steps, wall time, paths).

    ``init``: a model folder whose weights start the training (fine-tuning); its network
    settings must equal ``cfg.net``.
    """
    hooks = AEHooks(cfg, init=None if resume else init)
    return train_loop(cfg, hooks, resume=resume, max_steps=max_steps, progress=progress, stop_after=stop_after)


__all__ = ["train", "validate", "PatchDataset", "restoration_loss", "hide_cubes", "patch_augmentation", "AEHooks"]
