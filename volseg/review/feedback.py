"""Rated scans as inputs of the models: healthy controls for calibration and fine-tuning, and
image/mask pairs for skull-stripping training.

A run folder ``OUT`` (``volseg run -o OUT``) holds each scan's record
(``OUT/.volseg/scans/<scan>.json``: status, source image, outputs relative to ``OUT``) and, once
people have rated it (``volseg review``), ``OUT/volseg_ratings.tsv``. From these:

* :func:`rated_controls`: the brain-only images (``_desc-brain_T1w``: the input's own
  intensities inside the brain mask, 0 outside) of the scans that every rater calls a ``good``
  mask with ``no finding`` (:func:`volseg.review.ratings.healthy_controls`). The anomaly code
  takes the non-zero voxels of a brain-only image (largest component, holes filled) as its
  mask, which gives back the run's brain mask (one component without holes; non-zero inside
  unless the input itself is 0 there), and applies its model's own N4 inside it, so these files
  go wherever healthy brain images go (``volseg calibrate``, ``volseg train ae --healthy``).
* :func:`rated_strip_pairs`: a CSV (``image,mask,scan``, the format of
  :func:`volseg.strip.data.find_pairs`) pairing each source image with its ``_desc-brain_mask``,
  for the scans whose mask every rater calls ``good`` (:func:`volseg.review.ratings.good_masks`).

Only scans whose record says ``ok`` and whose files exist are used (a pair also needs its source
image unchanged since the run); the others are named in a warning. When no scan qualifies, or
the folder has no ratings, an :class:`~volseg.errors.InputError` names the folder and says why.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from volseg.errors import InputError
from volseg.review.ratings import (
    RATINGS,
    good_masks,
    healthy_controls,
    latest,
    read_ratings,
)

log = logging.getLogger("volseg")

STRIP_PAIRS = "rated_strip_pairs.csv"
STRIP_PAIR_COLUMNS = ("image", "mask", "scan")


def _ratings(out: Path) -> list[dict]:
    if not out.is_dir():
        raise InputError(out, "folder not found (give the folder of a 'volseg run -o' whose scans were rated)")
    ratings = read_ratings(out)
    if not ratings:
        what = f"{RATINGS} has no ratings" if (out / RATINGS).exists() else f"no ratings ({RATINGS} not found)"
        raise InputError(out, f"{what}: rate its scans first with 'volseg review {out}'")
    return ratings


def _records(out: Path) -> dict[str, dict]:
    from volseg.cohort.tables import load_records

    return {r["scan"]: r for r in load_records(out) if r.get("scan")}


def _output(out: Path, rec: dict, key: str) -> Path | None:
    rel = (rec.get("outputs") or {}).get(key)
    if not rel:
        return None
    path = out / rel
    return path if path.is_file() else None


def _select(out: Path, scans: list[str], need) -> tuple[list, list[str]]:
    """``need(rec) -> (value, None) | (None, reason)`` over the records of ``scans``: the values
    of the usable scans, and ``"scan (reason)"`` for the others (logged when some are usable)."""
    records = _records(out)
    values, skipped = [], []
    for scan in scans:
        rec = records.get(scan)
        if rec is None:
            value, why = None, "no record in this folder"
        elif rec.get("status") != "ok":
            value, why = None, f"status {rec.get('status')}"
        else:
            value, why = need(rec)
        if why:
            skipped.append(f"{scan} ({why})")
        else:
            values.append(value)
    if skipped and values:  # without values the error says it
        log.warning("%s: rated scans left out: %s", out, "; ".join(skipped))
    return values, skipped


def _none_qualify(out: Path, ratings: list[dict], what: str, rule: str, skipped: list[str]) -> InputError:
    n_scans = len(latest(ratings))
    left = f"; rated so but left out: {', '.join(skipped)}" if skipped else ""
    return InputError(out, f"no {what} among the {len(ratings)} ratings of {n_scans} scans in {RATINGS} "
                           f"({rule}, with an ok record and its files in the folder){left}")


def rated_controls(out) -> list[Path]:
    """The brain-only images (``brain`` output, absolute paths, in scan order) of the scans every
    rater calls a ``good`` mask with ``no finding``, among those whose record is ok and whose
    brain image exists. Raises :class:`~volseg.errors.InputError` when ``out`` has no ratings or
    no scan qualifies."""
    out = Path(out).resolve()
    ratings = _ratings(out)

    def need(rec):
        brain = _output(out, rec, "brain")
        return (brain, None) if brain else (None, "no brain image")

    brains, skipped = _select(out, healthy_controls(ratings), need)
    if not brains:
        raise _none_qualify(out, ratings, "healthy controls",
                            "a healthy control is a scan that every rater, latest rating each, calls a good mask "
                            "with no finding", skipped)
    return brains


def add_rated_controls(brains, out) -> tuple[list[Path], int]:
    """``brains`` (healthy control images given otherwise) with :func:`rated_controls` of ``out``
    appended, a brain given twice kept once; and the number of rated controls."""
    rated = rated_controls(out)
    given = {Path(b).resolve() for b in brains}
    return list(brains) + [b for b in rated if Path(b).resolve() not in given], len(rated)


def rated_strip_pairs(out, dest_csv) -> Path:
    """Write ``dest_csv`` (atomically): one row ``image,mask,scan`` per scan whose mask every rater
    calls ``good``, pairing its source image with its ``_desc-brain_mask`` (absolute paths), among
    those whose record is ok, whose mask exists and whose source image is unchanged since the run.
    Returns ``dest_csv``; raises :class:`~volseg.errors.InputError` when ``out`` has no ratings or
    no scan qualifies (nothing is written then)."""
    from volseg.cohort.export import input_stamp
    from volseg.io import AtomicWriter

    out = Path(out).resolve()
    ratings = _ratings(out)

    def need(rec):
        mask = _output(out, rec, "mask")
        if mask is None:
            return None, "no brain mask"
        source = rec.get("source")
        stamp = input_stamp(source) if source else None
        if stamp is None:
            return None, f"source image {source} not found"
        if rec.get("input") and rec["input"] != stamp:
            return None, f"source image {source} changed since the run"
        return (Path(source).resolve(), mask, rec["scan"]), None

    pairs, skipped = _select(out, good_masks(ratings), need)
    if not pairs:
        raise _none_qualify(out, ratings, "good brain masks",
                            "a good mask is one that every rater who rated the mask, latest rating each, calls good",
                            skipped)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(STRIP_PAIR_COLUMNS)
    writer.writerows((str(image), str(mask), scan) for image, mask, scan in pairs)
    dest = Path(dest_csv)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with AtomicWriter() as w:
        w.save_text(buf.getvalue(), dest)
    return dest


__all__ = ["STRIP_PAIRS", "STRIP_PAIR_COLUMNS", "add_rated_controls", "rated_controls", "rated_strip_pairs"]
