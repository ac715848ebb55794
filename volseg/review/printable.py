"""The printable per-scan report of ``volseg review`` (``/scan/<scan>/report``): the QC pictures,
the scan's numbers and QC reasons, and every rating, on one page with print CSS (A4, no
controls), so that a person can print it or save it as PDF from the browser."""

from __future__ import annotations

from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from volseg import __version__

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"

# the numbers shown, in order: (summary column, label, unit)
NUMBERS = (("status", "status", ""), ("brain_volume_ml", "brain volume", "mL"), ("snr", "SNR", ""),
           ("anomaly_score", "anomaly score", ""), ("anomaly_flag", "flagged", ""),
           ("anomalous_volume_ml", "anomalous volume", "mL"), ("qc", "QC", ""), ("qc_notes", "QC reasons", ""),
           ("time_total_s", "processing time", "s"))


@lru_cache(maxsize=1)
def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("scan_report.html.j2")


def render_scan_report(detail: dict, folder: str) -> str:
    """HTML of one scan's report from :meth:`volseg.review.server.ReviewApp.scan`'s ``detail``."""
    s = detail["summary"]
    def show(key: str, unit: str) -> str:
        v = s.get(key)
        if v in (None, "", "n/a"):
            return "none" if key == "qc_notes" else "n/a"
        v = {"true": "yes", "false": "no"}.get(v, v)
        return f"{v} {unit}" if unit else v

    numbers = [(label, show(k, unit)) for k, label, unit in NUMBERS if k in s]
    thr = detail.get("anomaly") or {}
    if thr.get("voxel_threshold") is not None:
        numbers.append(("voxel / scan threshold", f"{thr['voxel_threshold']:.4g} / {thr.get('scan_threshold') or 0:.4g}"))
    return _template().render(scan=detail["scan"], folder=folder, source=detail.get("source", ""),
                              numbers=numbers, figures=sorted(detail.get("figures", {}).items()),
                              ratings=detail.get("ratings", []), version=__version__,
                              printed=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


__all__ = ["render_scan_report"]
