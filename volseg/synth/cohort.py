"""Writing synthetic subjects and cohorts to disk (NIfTI + JSON sidecar + a cohort table)."""

from __future__ import annotations

import logging
from pathlib import Path

from volseg.synth.heads import SynthSubject, synth_head

log = logging.getLogger("volseg")


# BIDS suffix of each synthetic contrast ("any" has none: it is for training only)
SUFFIX = {"t1": "T1w", "t2": "T2w", "pd": "PDw", "flair": "FLAIR"}


def write_subject(subject: SynthSubject, out_dir, name: str) -> dict[str, Path | None]:
    """Write ``<name>_T1w.nii.gz`` (float32; ``_T2w``, ``_PDw``, ``_FLAIR`` for the subject's
    other contrasts), ``<name>_desc-brain_mask.nii.gz`` (uint8), the lesion mask
    ``<name>_label-lesion_mask.nii.gz`` when there is one, and the draws as a JSON sidecar
    beside the image. Returns the paths by ``'image'``, ``'brain_mask'``, ``'lesion_mask'``
    (None without lesions) and ``'params'``.
    """
    from volseg.io import AtomicWriter

    out_dir = Path(out_dir)
    contrast = subject.params.get("contrast", "t1")
    if contrast not in SUFFIX:
        raise ValueError(f"contrast {contrast!r} has no BIDS suffix; write one of {', '.join(SUFFIX)}")
    suffix = SUFFIX[contrast]
    paths = {
        "image": out_dir / f"{name}_{suffix}.nii.gz",
        "brain_mask": out_dir / f"{name}_desc-brain_mask.nii.gz",
        "lesion_mask": out_dir / f"{name}_label-lesion_mask.nii.gz"
        if subject.lesion_mask is not None else None,
        "params": out_dir / f"{name}_{suffix}.json",
    }
    def meta(path: Path):
        return subject.meta(path, qform_code=1, sform_code=1)

    with AtomicWriter() as w:
        w.save_image(subject.image, meta(paths["image"]), paths["image"], kind="image")
        w.save_image(subject.brain_mask, meta(paths["brain_mask"]), paths["brain_mask"], kind="mask")
        if paths["lesion_mask"] is not None:
            w.save_image(subject.lesion_mask, meta(paths["lesion_mask"]), paths["lesion_mask"],
                         kind="mask")
        w.save_json(subject.params, paths["params"])
    return paths


def cohort_seed(seed: int, index: int) -> int:
    """Seed of subject ``index`` (0-based) of a cohort generated with ``seed``."""
    return int(seed) * 100003 + int(index)


def generate_cohort(out_dir, n: int, lesions: bool = False,
                    seed: int = 0, contrast: str = "t1") -> list[dict[str, Path | None]]:
    """Write ``n`` synthetic subjects ``sub-synth001``... and a ``synth_cohort.tsv`` table.

    Subject ``i`` (0-based) uses seed ``seed * 100003 + i``, so cohorts with different seeds
    do not share subjects; ``contrast`` (t1, t2, pd, flair) paints the same subjects with that
    contrast. Returns :func:`write_subject`'s paths for each subject.
    """
    if contrast not in SUFFIX:
        raise ValueError(f"contrast {contrast!r} is not one of {', '.join(SUFFIX)}")
    from volseg.io import AtomicWriter, check_writable_dir

    if n < 1:
        raise ValueError(f"cohort size n must be at least 1, got {n}")
    out_dir = check_writable_dir(out_dir)
    rows = ["name\tseed\tvoxel_size\torientation\toblique\tshape\tfov_mode\tlesion_count"]
    written = []
    for i in range(n):
        name = f"sub-synth{i + 1:03d}"
        subj_seed = cohort_seed(seed, i)
        subject = synth_head(subj_seed, lesions=lesions, contrast=contrast)
        written.append(write_subject(subject, out_dir, name))
        p = subject.params
        rows.append("\t".join([
            name, str(subj_seed), "x".join(f"{z:g}" for z in p["voxel_size"]), p["orientation"],
            str(p["oblique"]).lower(), "x".join(str(s) for s in p["shape"]),
            p["acquisition"]["fov_mode"], str(p["lesion_count"]),
        ]))
        log.info("synthetic subject %s (seed %d) written", name, subj_seed)
    with AtomicWriter() as w:
        w.save_text("\n".join(rows) + "\n", out_dir / "synth_cohort.tsv")
    return written


__all__ = ["write_subject", "cohort_seed", "generate_cohort"]
