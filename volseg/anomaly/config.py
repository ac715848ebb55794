"""Anomaly-stage settings (``configs/ae.yaml``; unknown keys are errors)."""

from __future__ import annotations

from dataclasses import dataclass, field

from volseg.config import Config, TrainBase
from volseg.nets.autoencoder import AENetConfig


@dataclass(frozen=True)
class AEDataConfig:
    # healthy brain-only T1: NIfTI/MGH files (brain mask = non-zero voxels, or X_brainmask beside)
    # or folders; "mni152" is nilearn's MNI152 2009 brain; ${VOLSEG_SHARED_DATA} is expanded
    healthy: tuple[str, ...] = ("mni152",)
    synth_count: int = 24  # synthetic healthy brains (skull-stripped synthetic heads)
    synth_seed: int = 5000
    synth_ratio: float = 0.5
    # held out: validation brains (lesions inserted with fixed seeds) for per-epoch AUPRC
    validation: tuple[str, ...] = ()
    cache_dir: str = "runs/ae/cache"


@dataclass(frozen=True)
class CorruptionConfig:
    """Synthetic anomalies painted into healthy training patches; the network learns to
    return the healthy image (a denoising autoencoder). Kept broader than any evaluation
    lesion model: sizes, shapes, contrasts and textures all vary."""

    prob: float = 0.9  # chance that a patch gets anomalies
    max_blobs: int = 4
    radius_mm: tuple[float, float] = (2.0, 16.0)
    dark: tuple[float, float] = (0.1, 0.8)  # multiples of the white-matter level
    bright: tuple[float, float] = (1.15, 2.0)
    coarse_noise: float = 0.3  # chance of coarse Gaussian noise (Kascenas et al.) instead of / with blobs
    coarse_noise_std: float = 0.15
    noise_blob: float = 0.0  # chance that an anomaly is an organic thresholded-noise shape
    foreign: float = 0.0  # chance that an anomaly's content is tissue moved from elsewhere
    log_contrast: bool = False  # draw |factor - 1| log-uniformly (subtle as often as strong)
    weight: float = 1.0  # weight of the L1 over corrupted voxels beside the L1 over the whole patch
    # the corrupted-voxel term as the unrepaired fraction of each voxel's corruption
    # (|x̂ - clean| / |noisy - clean|, at most 2) instead of its L1: copying a faint lesion costs as
    # much as copying a strong one
    relative: bool = False


@dataclass(frozen=True)
class InpaintConfig:
    """Masked-cube inpainting during training (for the masked passes of the maps,
    ``maps.masked_block``): after corruption, the brain voxels of one phase of a cube lattice
    (cubes of ``blocks`` voxels, random offset, 2-phase checkerboard or 8-phase interleave) are
    replaced by the ``fill`` and the network must return the clean tissue there from context
    alone, so that at inference a voxel's reconstruction never sees that voxel."""

    prob: float = 0.0  # chance that a training patch gets hidden cubes (0: off)
    blocks: tuple[int, ...] = (4, 6)  # cube sizes in working-grid voxels, drawn uniformly
    phases: tuple[int, ...] = (2, 8)  # lattice kinds, drawn uniformly
    fill: str = "wm"  # what hidden voxels hold: wm (1.0) | median (brain median of the patch)
    weight: float = 1.0  # loss weight of a hidden voxel in the focused L1 (as a fully corrupted voxel)


@dataclass(frozen=True)
class AEAugmentConfig:
    prob: float = 0.5
    rotate_deg: float = 10.0
    scale: float = 0.1
    flip_lr: float = 0.5
    elastic: float = 0.2
    gamma: float = 0.4
    bias: float = 0.3
    noise: float = 0.3
    csf_grow: float = 0.0  # chance of widening the CSF spaces of a clean patch (healthy variation)
    # chance that a patch is seen as a thick-slice (2D clinical) acquisition: clean and corrupted
    # patches alike averaged over slabs of `slice_mm` along a random axis and interpolated back
    thick_slices: float = 0.0
    slice_mm: tuple[float, float] = (3.0, 6.0)
    # chance that a clean patch gets another grey/white contrast: intensities below white matter
    # remapped by a monotone curve through (0.3, a) and (0.75, b), white matter and above unchanged
    # (b drawn from `tissue_level`: 0.75 = as is; clinical 2D T1 brains put grey matter near 0.9)
    tissue_contrast: float = 0.0
    tissue_level: tuple[float, float] = (0.6, 0.93)


@dataclass(frozen=True)
class AETrainConfig(TrainBase):
    """The shared training settings (:class:`~volseg.config.TrainBase`) with the anomaly
    defaults, plus the training patch size."""

    steps: int = 2000
    steps_per_epoch: int = 200
    batch_size: int = 4
    lr: float = 1e-3
    out_dir: str = "runs/ae"
    patch: tuple[int, int, int] = (64, 64, 64)  # training patch (voxels of the working grid)


@dataclass(frozen=True)
class MapConfig:
    residual: str = "abs"  # abs | positive (x > reconstruction only) | negative | signed (|median(x - x̂)|)
    # | excess (max(x - 1, 0): the input's own brightness above white matter, no reconstruction)
    erode_mm: float = 4.0  # ignore this rim of the brain mask (partial volume with CSF/skull)
    median_size: int = 5  # 3D median filter width in working-grid voxels (0/1: off)
    # several widths: a multi-scale map, max over the widths of gain * filtered residual, the gains
    # set by `volseg calibrate` (healthy voxel threshold of the first width / that of each width);
    # empty: median_size alone
    median_sizes: tuple[int, ...] = ()
    # the residual kind of each width (abs | positive | negative | signed | excess); empty: `residual` for all
    scale_residuals: tuple[str, ...] = ()
    # per width: 1 = exact median on the working grid; k > 1 = median over blocks of k^3 voxels
    # (the width counts blocks, k times wider, at about 1/k^3 of the cost); empty: 1 for all
    scale_steps: tuple[int, ...] = ()
    min_component_voxels: int = 0  # drop connected components of the native mask below this
    # the same in mm^3, whatever the voxel size (both apply: the larger voxel count wins)
    min_component_mm3: float = 0.0
    n4: bool = True  # N4 inside the brain mask before the grid (off when the image is already corrected)
    # > 0: the brain's median put at this level (white-matter units) before the network, white matter
    # and brighter unchanged (volseg.anomaly.prep.match_grey); grey_mode: both | raise (only a median above it, low-contrast scans)
    grey_median: float = 0.0
    grey_mode: str = "both"
    passes: int = 1  # network passes, each fed the previous reconstruction inside the brain
    tta: bool = False  # each pass the mean of the network on the brain and on its left-right mirror image
    normative: bool = False  # residual in units of the healthy spread at each MNI152 location
    normative_sigma_mm: float = 4.0  # smoothing of the healthy mean and spread maps
    # masked passes (volseg.anomaly.recon): each brain voxel reconstructed by a pass that hid it,
    # in cubes of masked_block working-grid voxels (0: off, one plain pass)
    masked_block: int = 0
    masked_phases: int = 2  # 2 (3D checkerboard of cubes) or 8 (2x2x2 interleave)
    masked_fill: str = "wm"  # what hidden voxels hold: wm (1.0) | median (brain median) | blur (8 mm blur)
    masked_iter: float = 0.0  # > 0: a second round hides the voxels whose residual is still above this
    masked_mode: str = "all"  # all | bright (masked pass for brighter-than-expected, plain pass for darker)


@dataclass(frozen=True)
class CalibrationConfig:
    voxel_fpr: float = 0.001  # healthy false-positive rate that sets the voxel threshold
    scan_percentile: float = 95.0  # scan threshold: this percentile of healthy scan scores
    score_top_percent: float = 1.0  # scan score: mean of the top 1% of map values in the brain


@dataclass(frozen=True)
class AEConfig:
    net: AENetConfig = field(default_factory=AENetConfig)
    data: AEDataConfig = field(default_factory=AEDataConfig)
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)
    inpaint: InpaintConfig = field(default_factory=InpaintConfig)
    augment: AEAugmentConfig = field(default_factory=AEAugmentConfig)
    train: AETrainConfig = field(default_factory=AETrainConfig)
    maps: MapConfig = field(default_factory=MapConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    preprocess: Config = field(default_factory=Config)


def load_ae_config(path=None) -> AEConfig:
    from volseg.config import load_config

    return load_config(path, cls=AEConfig) if path else AEConfig()


__all__ = ["AEConfig", "AENetConfig", "AEDataConfig", "CorruptionConfig", "InpaintConfig", "AEAugmentConfig",
           "AETrainConfig", "MapConfig", "CalibrationConfig", "load_ae_config"]
