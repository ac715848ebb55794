"""``report.html``: the cohort table (flagged and failed scans first) and each scan's pictures.

One self-contained HTML file beside the outputs; pictures are linked by relative paths
(``sub-X/figures/*.png``), so the folder can be moved or served as it is. The page is the
jinja2 template ``templates/report.html.j2`` (autoescape on); this module orders the records
and formats the values it shows.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from volseg import __version__

TEMPLATE = "report.html.j2"
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


def _order(rec: dict) -> tuple:
    """Flagged scans first (highest score first), then failed, then QC 'check', then the rest."""
    m = rec.get("measures", {})
    score = m.get("anomaly_score")
    if rec.get("status") == "ok" and m.get("anomaly_flag"):
        return (0, -(score or 0.0), rec.get("scan", ""))
    if rec.get("status") != "ok":
        return (1, 0.0, rec.get("scan", ""))
    if m.get("qc") == "check":
        return (2, 0.0, rec.get("scan", ""))
    return (3, 0.0, rec.get("scan", ""))


def _fmt(v, nd: int = 1) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) >= 10 ** -nd or v == 0 else f"{v:.3g}"
    return str(v)


def _row_class(rec: dict) -> str:
    m = rec.get("measures", {})
    if rec.get("status") != "ok":
        return "failed"
    if m.get("anomaly_flag"):
        return "flag"
    return "check" if m.get("qc") == "check" else ""


@lru_cache(maxsize=1)
def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True)
    return env.get_template(TEMPLATE)


def _row(rec: dict) -> dict:
    """One line of the cohort table, every cell as the text it shows."""
    m, t = rec.get("measures", {}), rec.get("timings", {})
    return {"cls": _row_class(rec), "ok": rec.get("status") == "ok", "scan": rec.get("scan", "?"),
            "status": rec.get("status", ""), "brain": _fmt(m.get("brain_volume_ml")),
            "score": _fmt(m.get("anomaly_score"), 3), "flagged": _fmt(m.get("anomaly_flag")),
            "anomalous": _fmt(m.get("anomalous_volume_ml"), 2), "snr": _fmt(m.get("snr")),
            "qc": "; ".join(m.get("qc_notes", [])) or m.get("qc", ""),
            "stage": str(rec.get("stage", "")), "error": str(rec.get("error", "")),
            "time": _fmt(t.get("total_s"))}


def _scan(rec: dict) -> dict:
    """One finished scan's section: its source, pictures and output files."""
    return {"scan": rec["scan"], "source": rec.get("source", ""),
            "figures": [(k, Path(p).as_posix()) for k, p in sorted(rec.get("figures", {}).items())],
            "outputs": [(Path(p).as_posix(), Path(p).name) for p in rec.get("outputs", {}).values()]}


def render_report(records: list[dict], out: Path | str = ".") -> str:
    """The report's HTML text for the scan records of :mod:`volseg.cohort.tables`."""
    recs = sorted(records, key=_order)
    done = [r for r in recs if r.get("status") == "ok"]
    return _template().render(
        folder=Path(out).resolve().name, version=__version__,
        n_scans=len(recs), n_ok=len(done), n_failed=len(recs) - len(done),
        n_flag=sum(bool(r.get("measures", {}).get("anomaly_flag")) for r in done),
        n_check=sum(r.get("measures", {}).get("qc") == "check" for r in done),
        finished=max((r.get("finished", "") for r in done), default=""),
        rows=[_row(r) for r in recs], scans=[_scan(r) for r in done],
    )
