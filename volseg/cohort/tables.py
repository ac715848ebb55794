"""The cohort's tables and report, rebuilt from the per-scan records (so shards merge for free).

``volseg_summary.tsv``: one row per scan (ok or failed); ``volseg_failures.tsv``: the failed
scans with their stage and error; ``report.html``: the QC report. A sharded run writes its own
tables to ``logs/shard-K-of-N_*.tsv``; :func:`gather` checks that every shard has finished and
writes the cohort's tables and report, and ``volseg_rejected.tsv``: the scans whose brain mask a
rater rejects in ``volseg_ratings.tsv`` (``volseg review``; that file is only read), so that they
can be left out downstream.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from volseg.io import AtomicWriter

log = logging.getLogger("volseg")

SUMMARY = "volseg_summary.tsv"
FAILURES = "volseg_failures.tsv"
REPORT = "report.html"
SUMMARY_COLUMNS = (
    "scan", "subject", "session", "status", "brain_volume_ml", "anomaly_score", "anomaly_flag",
    "anomalous_volume_ml", "qc", "qc_notes", "snr", "time_load_s", "time_n4_s", "time_strip_s",
    "time_anomaly_s", "time_export_s", "time_total_s", "source",
) + (
    # self-QC (volseg.cohort.selfqc): the reason codes that fired and each measure
    "qc_reasons", "qc_tta_dice", "qc_boundary_uncertainty", "qc_fov_cut_fraction", "qc_fov_head_cm2",
    "qc_t1_depth_mm", "qc_bias_ratio", "qc_snr", "qc_snr_brain", "qc_orientation_margin", "qc_edge_offset_mm",
)
QC_COLUMNS = SUMMARY_COLUMNS[SUMMARY_COLUMNS.index("qc_reasons"):]
FAILURE_COLUMNS = ("scan", "stage", "error", "source")
REJECTED = "volseg_rejected.tsv"
REJECTED_COLUMNS = ("scan", "raters", "comments", "source")
_SHARD_TABLE = re.compile(r"^shard-(\d+)-of-(\d+)_summary\.tsv$")


def load_records(out: Path) -> list[dict]:
    """Every scan record in ``OUT/.volseg/scans``, sorted by scan."""
    from volseg.cohort.export import STATE_DIR

    records = []
    for p in sorted((Path(out) / STATE_DIR / "scans").glob("*.json")):
        if p.name.startswith("."):
            continue
        try:
            records.append(json.loads(p.read_text()))
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable scan record skipped (%s)", p, exc)
    return sorted(records, key=lambda r: r.get("scan", ""))


def _cell(value) -> str:
    if value is None:
        return "n/a"  # BIDS' missing value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        value = "; ".join(map(str, value))
    return str(value).replace("\t", " ").replace("\n", " ")


def summary_row(rec: dict) -> dict:
    m, t = rec.get("measures", {}), rec.get("timings", {})
    row = {k: rec.get(k) for k in ("scan", "subject", "session", "status", "source")}
    row.update({k: m.get(k) for k in ("brain_volume_ml", "anomaly_score", "anomaly_flag",
                                      "anomalous_volume_ml", "qc", "qc_notes", "snr")})
    row.update({f"time_{k}": t.get(k) for k in ("load_s", "n4_s", "strip_s", "anomaly_s",
                                                "export_s", "total_s")})
    row.update({k: m.get(k) for k in QC_COLUMNS})
    return row


def tsv(rows: list[dict], columns) -> str:
    lines = ["\t".join(columns)] + ["\t".join(_cell(r.get(c)) for c in columns) for r in rows]
    return "\n".join(lines) + "\n"


def read_tsv(path: Path) -> list[dict]:
    """The rows of a table written by :func:`tsv` (or by hand), as text (``n/a`` kept as
    written); lines whose number of cells differs from the header's, and blank lines, are
    skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not lines:
        return []
    header = lines[0].split("\t")
    rows = (line.split("\t") for line in lines[1:] if line.strip())
    return [dict(zip(header, cells)) for cells in rows if len(cells) == len(header)]


def save_if_changed(w: AtomicWriter, text: str, path: Path) -> Path:
    """Stage ``text`` for ``path`` unless the file already holds exactly it (a rerun that
    changes nothing rewrites nothing)."""
    try:
        if path.read_text() == text:
            return path
    except (OSError, UnicodeDecodeError):
        pass
    return w.save_text(text, path)


def write_tables(out: Path, records: list[dict], prefix: str = "") -> tuple[Path, Path]:
    """Write the summary and failures tables (``prefix`` for a shard's own tables)."""
    out = Path(out)
    summary = out / (f"{prefix}_summary.tsv" if prefix else SUMMARY)
    failures = out / (f"{prefix}_failures.tsv" if prefix else FAILURES)
    with AtomicWriter() as w:
        save_if_changed(w, tsv([summary_row(r) for r in records], SUMMARY_COLUMNS), summary)
        save_if_changed(w, tsv([r for r in records if r.get("status") != "ok"], FAILURE_COLUMNS),
                        failures)
    return summary, failures


def write_report(out: Path, records: list[dict]) -> Path:
    from volseg.report.html import render_report

    with AtomicWriter() as w:
        save_if_changed(w, render_report(records, out), Path(out) / REPORT)
    return Path(out) / REPORT


def rejected_rows(out: Path, records: list[dict]) -> list[dict]:
    """The scans whose mask a rater rejects (each rater's latest rating in
    ``OUT/volseg_ratings.tsv``), by scan: ``{"scan", "raters", "comments", "source"}`` with the
    raters and their comments (``"rater: comment"``) as lists; [] without ratings."""
    # pure stdlib, imported here: volseg.cohort never imports volseg.review at module level
    from volseg.review.ratings import read_ratings, rejected

    sources = {r.get("scan"): r.get("source") for r in records}
    return [{"scan": scan, "raters": [r["rater"] for r in rs],
             "comments": [f"{r['rater']}: {r['comment']}" for r in rs if r["comment"]],
             "source": sources.get(scan)}
            for scan, rs in rejected(read_ratings(out)).items()]


def write_rejected(out: Path, rows: list[dict]) -> Path | None:
    """Write ``OUT/volseg_rejected.tsv`` (atomically, only when it changes), or remove it when
    no scan is rejected; the path, or None."""
    path = Path(out) / REJECTED
    if not rows:
        path.unlink(missing_ok=True)
        return None
    rows = [{k: v or None for k, v in r.items()} for r in rows]  # n/a for no comment
    with AtomicWriter() as w:
        save_if_changed(w, tsv(rows, REJECTED_COLUMNS), path)
    return path


@dataclass
class GatherResult:
    n_ok: int = 0
    n_failed: int = 0
    missing_shards: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)  # rows of volseg_rejected.tsv (rejected_rows)

    @property
    def ok(self) -> bool:
        return self.n_failed == 0 and not self.missing_shards


def missing_shards(out: Path) -> list[str]:
    """Shards ``K/N`` that have not written their tables, for every ``N`` seen in ``logs/``."""
    seen: dict[int, set[int]] = {}
    logs = Path(out) / "logs"
    for p in logs.glob("shard-*-of-*_summary.tsv") if logs.is_dir() else []:
        m = _SHARD_TABLE.match(p.name)
        if m:
            seen.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    return [f"{k}/{n}" for n, ks in sorted(seen.items()) for k in range(n) if k not in ks]


def gather(out: Path, report: bool = True, extra=()) -> GatherResult:
    """Merge all scans recorded in ``out`` (every shard's) into the tables and the report, and
    list the scans whose mask a rater rejects (:func:`write_rejected`; the ratings file is only
    read); ``extra``: failure records that have no record file (inputs refused before processing)."""
    out = Path(out)
    records = load_records(out) + list(extra)
    res = GatherResult(n_ok=sum(r.get("status") == "ok" for r in records))
    res.n_failed = len(records) - res.n_ok
    res.missing_shards = missing_shards(out)
    for s in res.missing_shards:
        log.warning("shard %s has not finished (no logs/shard-%s-of-%s_summary.tsv)",
                    s, *s.split("/"))
    res.paths = list(write_tables(out, records))
    res.rejected = rejected_rows(out, records)
    rejected_path = write_rejected(out, res.rejected)
    if rejected_path is not None:
        res.paths.append(rejected_path)
    if report:
        res.paths.append(write_report(out, records))
    return res
