"""People's ratings of a run's scans: ``OUT/volseg_ratings.tsv``, one row per rating.

A rating says whether a scan's brain mask is usable (``good`` / ``fix`` / ``reject``) and what
its anomaly map shows (``true finding`` / ``false alarm`` / ``missed finding`` / ``no finding``),
with a free comment and the rater's name. Several raters may rate the same scan, and a rater may
rate it again: every rating is kept (an audit trail), and a rater's *latest* rating of a scan is
the one that counts (:func:`latest`).

Rows are appended atomically: the whole line is checked first (:func:`make_rating` raises
:class:`RatingError` with a clear message, and nothing is written), then written with one
``write`` under an exclusive ``flock`` of the file, so concurrent raters and processes never
interleave or leave half a line. The table is plain BIDS-style TSV (``n/a`` for empty fields; tabs
and line breaks in comments become spaces).

What the ratings feed back (:func:`healthy_controls`, :func:`good_masks`, :func:`rejected`):
scans whose raters all say ``good`` mask and ``no finding`` are healthy controls for
``volseg calibrate --from-ratings`` and ``volseg train ae --from-ratings``; scans whose masks all
raters call ``good`` are training pairs for ``volseg train strip --from-ratings``; scans that any
rater rejects are listed by ``volseg gather``.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from pathlib import Path

RATINGS = "volseg_ratings.tsv"
COLUMNS = ("scan", "rater", "time", "mask", "anomaly", "comment")
MASK_VALUES = ("good", "fix", "reject")
ANOMALY_VALUES = ("true finding", "false alarm", "missed finding", "no finding")
MAX_COMMENT = 2000
MAX_RATER = 100
_SCAN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")


class RatingError(ValueError):
    """A rating that cannot be saved; the message says which field and why."""


def _text(value, name: str, limit: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RatingError(f"'{name}' must be text, got {type(value).__name__}")
    text = " ".join(value.replace("\t", " ").replace("\r", " ").replace("\n", " ").split())
    if len(text) > limit:
        raise RatingError(f"'{name}' is longer than {limit} characters")
    return text


def make_rating(data, scans=None, now: datetime | None = None) -> dict:
    """A checked rating row from a JSON object ``data`` (fields of :data:`COLUMNS`; ``time`` is
    set here). ``scans``: the scan names that may be rated (others are refused). At least one of
    ``mask`` and ``anomaly`` must be given; ``rater`` is required."""
    if not isinstance(data, dict):
        raise RatingError("a rating must be a JSON object")
    unknown = sorted(set(data) - set(COLUMNS) - {"token"})
    if unknown:
        raise RatingError(f"unknown field(s): {', '.join(unknown)} (allowed: {', '.join(c for c in COLUMNS if c != 'time')})")
    scan = data.get("scan")
    if not isinstance(scan, str) or not _SCAN.match(scan):
        raise RatingError("'scan' must be a scan name of this run")
    if scans is not None and scan not in scans:
        raise RatingError(f"scan '{scan}' is not in this run")
    rater = _text(data.get("rater"), "rater", MAX_RATER)
    if not rater:
        raise RatingError("'rater' is required (your name or initials)")
    mask = _text(data.get("mask"), "mask", 20)
    if mask and mask not in MASK_VALUES:
        raise RatingError(f"'mask' must be one of {', '.join(MASK_VALUES)}, got '{mask}'")
    anomaly = _text(data.get("anomaly"), "anomaly", 20)
    if anomaly and anomaly not in ANOMALY_VALUES:
        raise RatingError(f"'anomaly' must be one of {', '.join(ANOMALY_VALUES)}, got '{anomaly}'")
    if not mask and not anomaly:
        raise RatingError("rate the mask, the anomaly map, or both")
    when = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return {"scan": scan, "rater": rater, "time": when.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "mask": mask, "anomaly": anomaly, "comment": _text(data.get("comment"), "comment", MAX_COMMENT)}


def _cell(value: str) -> str:
    return value if value else "n/a"


def append_rating(out, row: dict) -> Path:
    """Append one checked row (from :func:`make_rating`) to ``OUT/volseg_ratings.tsv``, writing the
    header first when the file is new; one ``write`` under an exclusive lock."""
    import fcntl

    path = Path(out) / RATINGS
    line = "\t".join(_cell(row.get(c, "")) for c in COLUMNS) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_size == 0:
            line = "\t".join(COLUMNS) + "\n" + line
        data = line.encode("utf-8")
        written = os.write(fd, data)
        if written != len(data):  # a full disk: take the partial line back out
            os.ftruncate(fd, os.fstat(fd).st_size - written)
            raise OSError(f"{path}: could not write the rating (disk full?)")
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock
    return path


def read_ratings(out) -> list[dict]:
    """Every rating in ``OUT/volseg_ratings.tsv`` in the order written ([] when there is none).
    Lines that are not complete rows (a hand-edited file) are skipped."""
    from volseg.cohort.tables import read_tsv

    try:
        table = read_tsv(Path(out) / RATINGS)
    except FileNotFoundError:
        return []
    rows = [{c: "" if r.get(c, "n/a") == "n/a" else r[c] for c in COLUMNS} for r in table]
    return [r for r in rows if r["scan"] and r["rater"]]


def latest(ratings: list[dict]) -> dict[str, list[dict]]:
    """Per scan, each rater's current verdict, raters in the order they first rated: field by
    field (``mask``, ``anomaly``, ``comment``), the latest non-empty value that rater gave (the
    order of the file decides), so a later rating of the mask alone does not take back the same
    rater's verdict on the map; ``time`` is that rater's latest rating."""
    per: dict[str, dict[str, dict]] = {}
    for r in ratings:
        cur = per.setdefault(r["scan"], {}).setdefault(r["rater"], {c: "" for c in COLUMNS})
        cur.update({k: v for k, v in r.items() if k in COLUMNS and (v or k in ("scan", "rater", "time"))})
    return {scan: list(by.values()) for scan, by in per.items()}


def healthy_controls(ratings: list[dict]) -> list[str]:
    """Scans that every rater (latest rating each) calls a ``good`` mask with ``no finding``."""
    return sorted(s for s, rs in latest(ratings).items()
                  if rs and all(r["mask"] == "good" and r["anomaly"] == "no finding" for r in rs))


def good_masks(ratings: list[dict]) -> list[str]:
    """Scans whose mask every rater (latest rating each, among those who rated the mask) calls
    ``good``."""
    out = []
    for s, rs in latest(ratings).items():
        masks = [r["mask"] for r in rs if r["mask"]]
        if masks and all(m == "good" for m in masks):
            out.append(s)
    return sorted(out)


def rejected(ratings: list[dict]) -> dict[str, list[dict]]:
    """Scans whose mask a rater (latest rating) rejects, with those ratings."""
    out: dict[str, list[dict]] = {}
    for s, rs in latest(ratings).items():
        bad = [r for r in rs if r["mask"] == "reject"]
        if bad:
            out[s] = bad
    return dict(sorted(out.items()))


__all__ = ["RATINGS", "COLUMNS", "MASK_VALUES", "ANOMALY_VALUES", "RatingError", "make_rating", "append_rating",
           "read_ratings", "latest", "healthy_controls", "good_masks", "rejected"]
