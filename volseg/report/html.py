"""``report.html``: the cohort table (flagged and failed scans first) and each scan's pictures.

One self-contained HTML file beside the outputs; pictures are linked by relative paths
(``sub-X/figures/*.png``), so the folder can be moved or served as it is.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from volseg import __version__

CSS = """
body{font-family:sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:90%}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left}
th{background:#eee}
tr.flag td{background:#fde2e2} tr.failed td{background:#f4d6a8} tr.check td{background:#fff5cc}
.scan{margin:1.2em 0;padding-top:.5em;border-top:1px solid #ddd}
.scan img{max-width:100%;display:block;margin:.3em 0}
.err{color:#a00;font-family:monospace}
"""


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


def render_report(records: list[dict], out: Path | str = ".") -> str:
    """The report's HTML text for the scan records of :mod:`volseg.cohort.tables`."""
    recs = sorted(records, key=_order)
    n_ok = sum(r.get("status") == "ok" for r in recs)
    n_flag = sum(bool(r.get("measures", {}).get("anomaly_flag")) for r in recs if r.get("status") == "ok")
    n_check = sum(r.get("measures", {}).get("qc") == "check" for r in recs if r.get("status") == "ok")
    head = ("<tr><th>scan</th><th>status</th><th>brain (mL)</th><th>anomaly score</th>"
            "<th>flagged</th><th>anomalous (mL)</th><th>SNR</th><th>QC</th><th>time (s)</th></tr>")
    rows = []
    for r in recs:
        m, t = r.get("measures", {}), r.get("timings", {})
        sid = escape(r.get("scan", "?"))
        link = f'<a href="#{sid}">{sid}</a>' if r.get("status") == "ok" else sid
        qc = escape("; ".join(m.get("qc_notes", [])) or m.get("qc", "")) if r.get("status") == "ok" \
            else f'<span class="err">{escape(str(r.get("stage", "")))}: {escape(str(r.get("error", "")))}</span>'
        rows.append(
            f'<tr class="{_row_class(r)}"><td>{link}</td><td>{escape(r.get("status", ""))}</td>'
            f'<td>{_fmt(m.get("brain_volume_ml"))}</td><td>{_fmt(m.get("anomaly_score"), 3)}</td>'
            f'<td>{_fmt(m.get("anomaly_flag"))}</td><td>{_fmt(m.get("anomalous_volume_ml"), 2)}</td>'
            f'<td>{_fmt(m.get("snr"))}</td><td>{qc}</td><td>{_fmt(t.get("total_s"))}</td></tr>')
    sections = []
    for r in recs:
        if r.get("status") != "ok":
            continue
        sid = escape(r["scan"])
        imgs = "".join(
            f'<img src="{escape(Path(p).as_posix())}" alt="{sid} {escape(k)} QC picture">'
            for k, p in sorted(r.get("figures", {}).items()))
        outs = ", ".join(f'<a href="{escape(Path(p).as_posix())}">{escape(Path(p).name)}</a>'
                         for p in r.get("outputs", {}).values())
        sections.append(f'<div class="scan" id="{sid}"><h3>{sid}</h3>'
                        f'<p>{escape(r.get("source", ""))}</p>{imgs}<p>{outs}</p></div>')
    when = max((r.get("finished", "") for r in recs if r.get("status") == "ok"), default="")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>volseg QC report: {escape(Path(out).resolve().name)}</title><style>{CSS}</style></head><body>"
        f"<h1>volseg QC report</h1><p>{len(recs)} scans: {n_ok} done, {len(recs) - n_ok} failed, "
        f"{n_flag} flagged as anomalous, {n_check} to check. volseg {escape(__version__)}; last scan finished {escape(when)}.</p>"
        f'<table id="cohort">{head}{"".join(rows)}</table>'
        f'<h2>Scans</h2>{"".join(sections) or "<p>No finished scans.</p>"}'
        "</body></html>\n"
    )
