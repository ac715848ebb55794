"""Healthy brains for the anomaly autoencoder: sources, the working-grid cache, validation cases."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from volseg.io import ImageMeta, load_image
from volseg.config import expand_path

log = logging.getLogger(__name__)

BRAINMASK_SUFFIXES = ("_brainmask", "_brain_mask", "_desc-brain_mask", "_mask")


def _key(*parts) -> str:
    return hashlib.sha1("|".join(str(p) for p in parts).encode()).hexdigest()[:16]


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """Brain mask of a skull-stripped image: non-zero voxels, largest component, holes filled."""
    from volseg.transforms.functional import fill_holes, largest_component

    m = np.abs(data) > 1e-6 * max(float(np.abs(data).max()), 1e-12)
    return fill_holes(largest_component(m))


def find_mask(path: Path) -> Path | None:
    """A brain mask beside a brain image: ``X_brainmask.nii.gz`` etc., or ``brainmask.nii.gz``."""
    name = path.name
    for ext in (".nii.gz", ".nii", ".mgz"):
        if name.endswith(ext):
            stem = name[: -len(ext)]
            for suf in BRAINMASK_SUFFIXES:
                for e2 in (".nii.gz", ".nii", ".mgz"):
                    cand = path.with_name(stem + suf + e2)
                    if cand.exists():
                        return cand
    cand = path.with_name("brainmask.nii.gz")
    return cand if cand.exists() else None


def load_brain(spec: str) -> tuple[np.ndarray, np.ndarray, ImageMeta]:
    """A healthy brain (image, mask, meta): ``"mni152"`` (nilearn's MNI152 2009 brain) or a file."""
    if spec == "mni152":
        from nilearn import datasets

        t = datasets.load_mni152_template(resolution=1)
        m = datasets.load_mni152_brain_mask(resolution=1).get_fdata() > 0.5
        data = (t.get_fdata(dtype=np.float32) * m).astype(np.float32)
        meta = ImageMeta(path="nilearn:MNI152NLin2009cAsym", affine=t.affine, shape=data.shape,
                         zooms=tuple(float(z) for z in t.header.get_zooms()[:3]))
        return data, m, meta
    path = Path(expand_path(spec))
    data, meta = load_image(path)
    mpath = find_mask(path)
    if mpath is not None:
        mask, _ = load_image(mpath)
        mask = mask > 0
    else:
        mask = nonzero_mask(data)
    return data, mask, meta


def _prep_key(cfg) -> tuple:
    """What of ``cfg`` shapes a brain on the working grid (the cache key): the preprocessing, N4, and
    the grey matching when it is on (off leaves the keys of caches made before it as they were)."""
    m = cfg.maps
    extra = ((m.grey_median, m.grey_mode),) if m.grey_median > 0 else ()
    return (cfg.preprocess, m.n4, *extra)


def cached_brains(specs, cfg, cache_dir: Path) -> list[Path]:
    """Each healthy brain on the working grid (``image``, ``mask`` in an .npz), made once."""
    from volseg.anomaly.prep import prepare_brain

    cache_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for spec in specs:
        p = Path(expand_path(spec))
        stamp = (p.stat().st_size, p.stat().st_mtime) if p.exists() else ()
        dest = cache_dir / f"brain-{p.name.split('.')[0]}-{_key(spec, stamp, *_prep_key(cfg))}.npz"
        if not dest.exists():
            data, mask, meta = load_brain(spec)
            prep = prepare_brain(data, mask, meta, cfg)
            _save(dest, image=prep.grid_image[0].numpy(), mask=prep.grid_mask, source=str(spec))
            log.info("cached %s", dest.name)
        out.append(dest)
    return out


def synth_brain(seed: int):
    """A synthetic healthy brain-only image (skull-stripped synthetic head) and its mask."""
    from volseg.synth import synth_head

    subj = synth_head(seed)
    mask = np.asarray(subj.brain_mask) > 0
    data = np.where(mask, subj.image, 0).astype(np.float32)
    zooms = tuple(float(z) for z in np.sqrt((subj.affine[:3, :3] ** 2).sum(0)))
    return data, mask, ImageMeta(path=f"synth:{seed}", affine=subj.affine, shape=data.shape, zooms=zooms)


def cached_synth_brains(count: int, seed: int, cfg, cache_dir: Path) -> list[Path]:
    from volseg.anomaly.prep import prepare_brain
    from volseg.synth.cohort import cohort_seed

    cache_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        s = cohort_seed(seed, i)
        dest = cache_dir / f"synth-{s}-{_key(s, *_prep_key(cfg))}.npz"
        if not dest.exists():
            data, mask, meta = synth_brain(s)
            prep = prepare_brain(data, mask, meta, cfg)
            _save(dest, image=prep.grid_image[0].numpy(), mask=prep.grid_mask, source=meta.path)
            log.info("cached %s", dest.name)
        out.append(dest)
    return out


def cached_validation(specs, cfg, cache_dir: Path, seed: int = 77) -> list[Path]:
    """Validation brains with inserted lesions on the working grid (image, mask, lesion): one
    case per benchmark lesion family (:mod:`volseg.anomaly.families`) in each brain."""
    import torch
    from monai.data import MetaTensor

    from volseg.anomaly.families import FAMILIES, brain_bias_field, insert_family, tissue_sites
    from volseg.anomaly.prep import prepare_brain

    cache_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for j, spec in enumerate(specs):
        p = Path(expand_path(spec))
        stamp = (p.stat().st_size, p.stat().st_mtime) if p.exists() else ()
        sites = field = None
        for k, family in enumerate(FAMILIES):
            # lesions painted into the bias-corrected brain, the field put back (benchmark.synthetic_cases)
            key = _key(spec, stamp, seed, "families", "bias-aware", family, *_prep_key(cfg))
            dest = cache_dir / f"val-{p.name.split('.')[0]}_{family}-{key}.npz"
            if not dest.exists():
                data, mask, meta = load_brain(spec)
                if field is None:
                    field = brain_bias_field(data, mask, meta.zooms)
                    sites = tissue_sites(data / field, mask, meta.zooms)
                rng = np.random.default_rng([seed, j, k])
                img, truth, _ = insert_family(data, mask, meta.zooms, family, rng, sites=sites, field=field)
                prep = prepare_brain(img, mask, meta, cfg)
                t = prep.grid(MetaTensor(torch.as_tensor(truth[None].astype(np.float32)),
                                         affine=torch.as_tensor(meta.affine)),
                              grid_affine=np.asarray(prep.grid_image.affine), mode="bilinear")[0].numpy() > 0.5
                _save(dest, image=prep.grid_image[0].numpy(), mask=prep.grid_mask, lesion=t, source=str(spec))
            out.append(dest)
    return out


def _save(dest: Path, source: str, **arrays) -> None:
    tmp = dest.with_name(dest.name + ".tmp.npz")
    np.savez_compressed(tmp, source=source, **{k: (v.astype(np.float16) if v.dtype.kind == "f" else v.astype(bool))
                                               for k, v in arrays.items()})
    tmp.replace(dest)


def load_npz(path: Path) -> dict:
    with np.load(path) as z:
        return {k: (z[k].astype(np.float32) if z[k].dtype.kind == "f" else z[k]) for k in z.files if k != "source"}


__all__ = ["load_brain", "cached_brains", "cached_synth_brains", "cached_validation", "load_npz",
           "nonzero_mask", "find_mask", "synth_brain"]
