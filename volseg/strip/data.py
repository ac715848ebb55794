"""Training data for skull stripping: real image/mask pairs and synthetic heads on the grid.

Every pair goes through the same chain as at inference (:func:`volseg.preprocess.prepare`), and
its mask is taken onto the same working grid; the results are cached as ``.npz`` files so a
resumed or repeated training does not redo them.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from pathlib import Path

import numpy as np

from volseg.config import Config
from volseg.io import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

MASK_TAGS = ("_brainmask", "_desc-brain_mask", "_brain_mask", "_mask")


def _strip_ext(name: str) -> tuple[str, str]:
    for ext in IMAGE_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)], name[-len(ext):]
    return name, ""


def find_pairs(spec: str | Path, base: Path | None = None) -> list[tuple]:
    """Image/mask pairs from a CSV (columns ``image,mask``), a folder or one image file.

    In a folder (searched recursively) every ``X_brainmask.nii.gz`` (or ``_desc-brain_mask``,
    ``_brain_mask``, ``_mask``) pairs with ``X.nii.gz`` (or ``X_T1w.nii.gz``) beside it.
    A CSV may add a column ``ignore``: a mask of voxels left out of the loss (where the mask is
    not trusted, e.g. where two tools' pseudo-labels disagree, ``scripts/pseudo_labels.py``);
    such rows are ``(image, mask, ignore)`` triples.
    """
    p = Path(spec)
    if base is not None and not p.is_absolute():
        p = base / p
    if not p.exists():
        raise FileNotFoundError(f"training data {p} not found")
    if p.suffix.lower() == ".csv":
        with open(p, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if rows and not {"image", "mask"} <= set(rows[0]):
            raise ValueError(f"{p}: CSV needs columns 'image' and 'mask', got {list(rows[0])}")
        return [((p.parent / r["image"]).resolve(), (p.parent / r["mask"]).resolve())
                + (((p.parent / r["ignore"]).resolve(),) if r.get("ignore") else ()) for r in rows]
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if _strip_ext(f.name)[1])
    pairs = []
    for f in files:
        stem, ext = _strip_ext(f.name)
        for tag in MASK_TAGS:
            if stem.endswith(tag):
                break
        else:
            continue
        img_stem = stem[: -len(tag)]
        for cand in (img_stem + ext, img_stem + "_T1w" + ext):
            if (f.parent / cand).exists():
                pairs.append(((f.parent / cand).resolve(), f.resolve()))
                break
    if p.is_file():  # an image file: look for its mask beside it
        stem, ext = _strip_ext(p.name)
        pairs = [(p.resolve(), (p.parent / f"{stem}{tag}{ext}").resolve()) for tag in MASK_TAGS
                 if (p.parent / f"{stem}{tag}{ext}").exists()][:1]
    return pairs


def grid_pair(image, mask: np.ndarray | None, meta, cfg: Config, n4: bool = True):
    """Image and mask on the working grid: (image float32 (X,Y,Z), mask float32 in [0,1], prep)."""
    import dataclasses

    from volseg.preprocess import prepare

    if not n4:
        cfg = dataclasses.replace(cfg, n4=dataclasses.replace(cfg.n4, backend="none"))
    prep = prepare(image, meta, cfg)
    out_mask = None if mask is None else mask_to_grid(mask, meta, prep)
    return prep.grid_image[0].numpy().astype(np.float32), out_mask, prep


def mask_to_grid(mask: np.ndarray, meta, prep) -> np.ndarray:
    """A mask of the scan ``meta`` on the working grid that :func:`grid_pair` placed it on (``prep``,
    its third value): float32 in [0, 1], interpolated as the image was."""
    import torch
    from monai.data import MetaTensor

    mt = MetaTensor(torch.as_tensor(np.asarray(mask)[None].astype(np.float32)), affine=torch.as_tensor(meta.affine))
    return prep.grid(mt, grid_affine=np.asarray(prep.grid_image.affine))[0].numpy()


def _key(*parts) -> str:
    return hashlib.sha1("|".join(str(p) for p in parts).encode()).hexdigest()[:16]


def cached_real(pairs, cfg: Config, cache_dir: Path) -> list[Path]:
    """Cache every real pair (or ``(image, mask, ignore)`` triple) on the grid (N4 as at inference);
    returns the .npz paths. An ignore mask is stored as ``valid`` (1: in the loss)."""
    from volseg.io import load_image

    cache_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for pair in pairs:
        img_path, mask_path = pair[:2]
        ignore_path = pair[2] if len(pair) > 2 else None
        st = Path(img_path).stat()
        extra = ()
        if ignore_path is not None:
            ist, mst = Path(ignore_path).stat(), Path(mask_path).stat()
            extra = (ignore_path, ist.st_size, ist.st_mtime, mask_path, mst.st_size, mst.st_mtime)
        dest = cache_dir / (f"real-{Path(img_path).name.split('.')[0]}-"
                            f"{_key(img_path, st.st_size, st.st_mtime, cfg, *extra)}.npz")
        if not dest.exists():
            data, meta = load_image(img_path)
            mask, _ = load_image(mask_path)
            if mask.shape != data.shape:
                raise ValueError(f"{mask_path}: mask shape {mask.shape} differs from image {data.shape}")
            img, m, prep = grid_pair(data, (mask > 0).astype(np.float32), meta, cfg)
            valid = None
            if ignore_path is not None:
                ignore, _ = load_image(ignore_path)
                if ignore.shape != data.shape:
                    raise ValueError(f"{ignore_path}: ignore mask shape {ignore.shape} differs from image {data.shape}")
                # on the image's own grid placement (no second preprocessing)
                valid = mask_to_grid(ignore > 0, meta, prep) < 0.25  # a grid voxel touched by it is left out too
            _save(dest, img, m, source=str(img_path), valid=valid)
            log.info("cached %s", dest.name)
        out.append(dest)
    return out


def synth_contrast(seed: int, contrasts=("t1",), weights=()) -> str:
    """The contrast of the synthetic head ``seed`` in a pool of ``contrasts`` with ``weights``
    (empty: equal): a draw fixed by the seed, so a head keeps its contrast in any pool size."""
    from volseg.synth.anatomy import CONTRASTS

    contrasts = tuple(contrasts)
    bad = [c for c in contrasts if c not in CONTRASTS]
    if not contrasts or bad:
        raise ValueError(f"data.synth_contrasts: {bad[0] if bad else 'empty'!r} is not one of "
                         f"{', '.join(CONTRASTS)}")
    w = np.ones(len(contrasts)) if not weights else np.asarray(weights, dtype=float)
    if w.shape != (len(contrasts),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"data.synth_contrast_weights {list(weights)} must be {len(contrasts)} "
                         "non-negative numbers, one per contrast, not all zero")
    if len(contrasts) == 1:
        return contrasts[0]
    u = np.random.default_rng([int(seed), 0x5C0]).random()
    return contrasts[min(int(np.searchsorted(np.cumsum(w / w.sum()), u, side="right")), len(w) - 1)]


def synth_sample(seed: int, cfg: Config, contrast: str = "t1"):
    """One synthetic head on the grid (no N4: its bias field is left as augmentation)."""
    from volseg.synth import synth_head

    subj = synth_head(seed, contrast=contrast)
    meta = subj.meta(f"<synth {seed}>")
    img, m, _ = grid_pair(subj.image.astype(np.float32), subj.brain_mask.astype(np.float32), meta, cfg,
                          n4=False)
    return img, m


def cached_synth(count: int, seed: int, cfg: Config, cache_dir: Path, workers: int = 1,
                 contrasts=("t1",), weights=()) -> list[Path]:
    """A pool of ``count`` synthetic heads on the grid, generated once and cached; each head's
    contrast is :func:`synth_contrast` of its seed."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    todo, out = [], []
    for i in range(count):
        contrast = synth_contrast(seed + i, contrasts, weights)
        # keyed by what shapes a synthetic sample (no N4 is applied to them)
        key = _key(seed + i, cfg.grid, cfg.intensity, contrast)
        dest = cache_dir / f"synth-{contrast}-{seed + i:06d}-{key}.npz"
        out.append(dest)
        if not dest.exists():
            todo.append((seed + i, dest, contrast))
    if todo:
        from tqdm import tqdm

        args = [(s, d, cfg, c) for s, d, c in todo]
        if workers > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers) as pool:
                list(tqdm(pool.imap_unordered(_make_synth, args), total=len(args), desc="synthetic heads"))
        else:
            for a in tqdm(args, desc="synthetic heads"):
                _make_synth(a)
    return out


def _make_synth(args):
    import torch

    torch.set_num_threads(1)
    seed, dest, cfg, contrast = args
    img, m = synth_sample(seed, cfg, contrast)
    _save(dest, img, m, source=f"synth:{contrast}:{seed}")
    return dest


def _save(dest: Path, img: np.ndarray, mask: np.ndarray, source: str, valid: np.ndarray | None = None) -> None:
    tmp = dest.with_name(f".{dest.stem}.tmp.npz")
    extra = {} if valid is None else {"valid": np.asarray(valid).astype(np.uint8)}
    np.savez_compressed(tmp, image=img.astype(np.float16), mask=(mask > 0.5).astype(np.uint8),
                        source=np.array(source), **extra)
    tmp.replace(dest)


def load_cached(path: Path, with_valid: bool = False):
    """(image, mask) of a cached sample, float32; ``with_valid``: also its ``valid`` map (1 where the
    loss counts; None when the whole volume counts)."""
    with np.load(path) as z:
        img, mask = z["image"].astype(np.float32), z["mask"].astype(np.float32)
        if not with_valid:
            return img, mask
        return img, mask, (z["valid"].astype(np.float32) if "valid" in z.files else None)
