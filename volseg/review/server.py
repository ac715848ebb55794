"""``volseg review OUT``: a local web server over a run's derivatives folder.

Pages (static HTML and JavaScript shipped in ``volseg/review/static``, no network needed):

- ``/``: the cohort table from ``volseg_summary.tsv`` (sortable, filterable by flag, QC ``check``,
  failures and rating status);
- ``/scan/<scan>``: NiiVue (``static/niivue.umd.js``, the ``@niivue/niivue`` npm build, BSD-2)
  with the N4-corrected image, the brain mask and the anomaly map as overlays, the scan's numbers
  and QC reasons, and the rating form (keyboard shortcuts);
- ``/scan/<scan>/report``: a printable per-scan report (pictures, numbers, ratings).

JSON API: ``GET /api/scans``, ``GET /api/scans/<scan>``, ``GET /api/ratings[?scan=S]`` and
``POST /api/ratings`` (:mod:`volseg.review.ratings`; 201 with the saved row, 400 with a message
for a malformed rating, nothing written then). Files of the run: ``GET /files/<path under OUT>``.

Safety: the server binds to 127.0.0.1 unless told otherwise; it serves only regular files under
OUT (``..``, absolute paths, hidden folders such as ``.volseg`` and links leading outside are
refused with 404/403); every write needs the per-session token printed with the URL (header
``X-Volseg-Token``, 403 without it); while bound to the loopback address, requests whose
``Host`` is not a loopback name are refused (DNS rebinding); bodies are limited to 64 kB.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import secrets
import threading
from functools import lru_cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from volseg.cohort.tables import SUMMARY, read_tsv
from volseg.io.derivatives import sidecar_path
from volseg.review import ratings as R

log = logging.getLogger("volseg")

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY = 64 * 1024
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}
_STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".html": "text/html; charset=utf-8", ".png": "image/png", ".txt": "text/plain; charset=utf-8"}


class ReviewError(Exception):
    """A request the app refuses: HTTP status and a message for the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ReviewApp:
    """What the server shows and stores for one derivatives folder ``out``."""

    def __init__(self, out, token: str | None = None):
        self.out = Path(out).resolve()
        if not self.out.is_dir():
            from volseg.errors import InputError

            raise InputError(out, "folder not found (give the folder of a 'volseg run -o')")
        if not (self.out / SUMMARY).is_file():
            from volseg.errors import InputError

            raise InputError(out, f"no {SUMMARY} here (give the folder of a 'volseg run -o'; for a sharded run, "
                                  "run 'volseg gather' first)")
        self.token = token or secrets.token_urlsafe(18)
        self._lock = threading.Lock()

    # -- the run's contents -------------------------------------------------------------------
    def summary(self) -> list[dict]:
        return read_tsv(self.out / SUMMARY)

    def record(self, scan: str) -> dict:
        from volseg.cohort.export import STATE_DIR

        p = self.out / STATE_DIR / "scans" / f"{scan}.json"
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return {}

    def scan_names(self) -> list[str]:
        return [r["scan"] for r in self.summary() if r.get("scan")]

    def scans(self) -> dict:
        """The cohort table with each scan's latest ratings."""
        latest = R.latest(R.read_ratings(self.out))
        rows = []
        for r in self.summary():
            rated = latest.get(r.get("scan", ""), [])
            rows.append(dict(r, ratings=rated, rating_status=rating_status(rated)))
        return {"folder": self.out.name, "scans": rows}

    def scan(self, name: str) -> dict:
        rows = self.summary()
        names = [r.get("scan") for r in rows]
        if name not in names:
            raise ReviewError(HTTPStatus.NOT_FOUND, f"no scan '{name}' in this run")
        i = names.index(name)
        rec = self.record(name)
        outputs = {k: f"/files/{Path(v).as_posix()}" for k, v in (rec.get("outputs") or {}).items()
                   if (self.out / v).is_file()}
        figures = {k: f"/files/{Path(v).as_posix()}" for k, v in (rec.get("figures") or {}).items()
                   if (self.out / v).is_file()}
        anomaly = {}
        amap = (rec.get("outputs") or {}).get("anomaly_map")
        if amap:
            side = sidecar_path(self.out / amap)
            try:
                a = json.loads(side.read_text()).get("Anomaly", {})
                anomaly = {"voxel_threshold": a.get("VoxelThreshold"), "scan_threshold": a.get("ScanThreshold")}
            except (OSError, ValueError):
                pass
            if "anomaly_map" in outputs:
                anomaly["peak_mm"] = map_peak(self.out / amap)
        ratings = self.ratings(name)
        return {"scan": name, "summary": rows[i], "outputs": outputs, "figures": figures,
                "measures": rec.get("measures", {}), "source": rec.get("source", rows[i].get("source", "")),
                "anomaly": anomaly, "ratings": ratings,
                "previous": names[i - 1] if i > 0 else None, "next": names[i + 1] if i + 1 < len(names) else None}

    # -- ratings ------------------------------------------------------------------------------
    def add_rating(self, data) -> dict:
        row = R.make_rating(data, scans=set(self.scan_names()))
        with self._lock:
            R.append_rating(self.out, row)
        return row

    def ratings(self, scan: str | None = None) -> list[dict]:
        rows = R.read_ratings(self.out)
        return [r for r in rows if r["scan"] == scan] if scan else rows

    # -- files --------------------------------------------------------------------------------
    def file(self, rel: str) -> Path:
        """The file ``rel`` under OUT, or :class:`ReviewError`: no ``..``, no absolute or hidden
        parts, nothing that resolves outside OUT, only regular files."""
        parts = [p for p in rel.split("/") if p]
        if not parts or any(p in (".", "..") or p.startswith(".") or "\\" in p or "\0" in p for p in parts):
            raise ReviewError(HTTPStatus.FORBIDDEN, "only files of the run are served")
        path = (self.out / "/".join(parts)).resolve()
        if not path.is_relative_to(self.out):
            raise ReviewError(HTTPStatus.FORBIDDEN, "only files of the run are served")
        if not path.is_file():
            raise ReviewError(HTTPStatus.NOT_FOUND, "no such file")
        return path

    def report(self, name: str) -> str:
        from volseg.review.printable import render_scan_report

        return render_scan_report(self.scan(name), self.out.name)


def map_peak(path: Path) -> list[float] | None:
    """World (scanner RAS, mm) coordinates of an anomaly map's highest voxel, or None (unreadable,
    empty); cached per file version."""
    try:
        st = path.stat()
    except OSError:
        return None
    return _map_peak(str(path), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=64)
def _map_peak(path: str, mtime_ns: int, size: int) -> list[float] | None:
    import nibabel as nib
    import numpy as np

    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception:  # noqa: BLE001 - a map that cannot be read has no peak to show
        return None
    if data.ndim != 3 or not np.isfinite(data).any() or float(np.nanmax(data)) <= 0:
        return None
    ijk = np.unravel_index(int(np.nanargmax(data)), data.shape)
    return [round(float(v), 2) for v in nib.affines.apply_affine(img.affine, ijk)]


def rating_status(latest: list[dict]) -> str:
    """One word for the cohort table: unrated, rejected (a rater rejects the mask), fix, finding
    (a true or missed finding), or rated."""
    if not latest:
        return "unrated"
    if any(r["mask"] == "reject" for r in latest):
        return "rejected"
    if any(r["mask"] == "fix" for r in latest):
        return "fix"
    if any(r["anomaly"] in ("true finding", "missed finding") for r in latest):
        return "finding"
    return "rated"


def make_handler(app: ReviewApp, allowed_hosts: set[str] | None):
    class Handler(BaseHTTPRequestHandler):
        server_version = "volseg-review"
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # through logging, not stderr
            log.debug("review %s - %s", self.address_string(), fmt % args)

        # -- responses -----------------------------------------------------------------------
        def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, obj) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json; charset=utf-8")

        def _error(self, status: int, message: str) -> None:
            if self.path.startswith("/api/"):
                self._json(status, {"error": message})
            else:
                self._send(status, f"{int(status)} {message}\n".encode(), "text/plain; charset=utf-8")

        def _host_ok(self) -> bool:
            if allowed_hosts is None:
                return True
            host = (self.headers.get("Host") or "").strip().lower()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            return name in allowed_hosts

        # -- routing -------------------------------------------------------------------------
        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            try:
                if not self._host_ok():
                    raise ReviewError(HTTPStatus.FORBIDDEN, "unexpected Host header")
                url = urlsplit(self.path)
                path = unquote(url.path)
                if path == "/favicon.ico":
                    return self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
                if path in ("/", "/index.html"):
                    return self._static("cohort.html")
                if path.startswith("/static/"):
                    return self._static(path[len("/static/"):])
                if path.startswith("/files/"):
                    f = app.file(path[len("/files/"):])
                    ctype = ("application/gzip" if f.name.endswith(".gz")
                             else mimetypes.guess_type(f.name)[0] or "application/octet-stream")
                    return self._send(HTTPStatus.OK, f.read_bytes(), ctype)
                if path.startswith("/scan/"):
                    rest = path[len("/scan/"):]
                    if rest.endswith("/report"):
                        body = app.report(rest[: -len("/report")]).encode()
                        return self._send(HTTPStatus.OK, body, "text/html; charset=utf-8")
                    if rest not in app.scan_names():
                        raise ReviewError(HTTPStatus.NOT_FOUND, f"no scan '{rest}' in this run")
                    return self._static("scan.html")  # its script asks /api/scans/<scan> for the rest
                if path == "/api/scans":
                    return self._json(HTTPStatus.OK, app.scans())
                if path.startswith("/api/scans/"):
                    return self._json(HTTPStatus.OK, app.scan(path[len("/api/scans/"):]))
                if path == "/api/ratings":
                    scan = parse_qs(url.query).get("scan", [None])[0]
                    return self._json(HTTPStatus.OK, {"ratings": app.ratings(scan)})
                raise ReviewError(HTTPStatus.NOT_FOUND, "not found")
            except ReviewError as exc:
                self._error(exc.status, str(exc))
            except (BrokenPipeError, ConnectionResetError):
                pass

        def do_POST(self):
            try:
                if not self._host_ok():
                    raise ReviewError(HTTPStatus.FORBIDDEN, "unexpected Host header")
                if urlsplit(self.path).path != "/api/ratings":
                    raise ReviewError(HTTPStatus.NOT_FOUND, "not found")
                given = self.headers.get("X-Volseg-Token", "")
                if not given or not secrets.compare_digest(given, app.token):
                    raise ReviewError(HTTPStatus.FORBIDDEN, "missing or wrong token: open the URL that "
                                                            "'volseg review' printed (it ends in ?token=...)")
                ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
                if ctype != "application/json":
                    raise ReviewError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the rating as application/json")
                try:
                    length = int(self.headers.get("Content-Length") or -1)
                except ValueError:
                    length = -1
                if length < 0:
                    raise ReviewError(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
                if length > MAX_BODY:
                    raise ReviewError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"a rating is at most {MAX_BODY} bytes")
                raw = self.rfile.read(length)
                try:
                    data = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, ValueError) as exc:
                    raise ReviewError(HTTPStatus.BAD_REQUEST, f"the body is not JSON ({exc})") from None
                try:
                    row = app.add_rating(data)
                except R.RatingError as exc:
                    raise ReviewError(HTTPStatus.BAD_REQUEST, str(exc)) from None
                except OSError as exc:
                    raise ReviewError(HTTPStatus.INTERNAL_SERVER_ERROR, f"could not save the rating: {exc}") from None
                self._json(HTTPStatus.CREATED, {"rating": row})
            except ReviewError as exc:
                self.close_connection = True
                self._error(exc.status, str(exc))
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _static(self, name: str):
            path = (STATIC / name).resolve()
            if not path.is_relative_to(STATIC) or not path.is_file():
                raise ReviewError(HTTPStatus.NOT_FOUND, "not found")
            ctype = _STATIC_TYPES.get(path.suffix, "application/octet-stream")
            extra = {}
            if path.suffix == ".html":
                extra["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data: blob:; "
                                                    "style-src 'self' 'unsafe-inline'; script-src 'self'; "
                                                    "worker-src 'self' blob:; connect-src 'self' data: blob:")
            self._send(HTTPStatus.OK, path.read_bytes(), ctype, extra)

    return Handler


def make_server(out, host: str = "127.0.0.1", port: int = 0, token: str | None = None):
    """The server (not started) and its app; ``port`` 0 picks a free port."""
    app = ReviewApp(out, token)
    allowed = None
    if host in LOOPBACK_NAMES:
        allowed = set(LOOPBACK_NAMES)
    server = ThreadingHTTPServer((host, port), make_handler(app, allowed))
    server.daemon_threads = True
    return server, app


def url_of(server, app) -> str:
    host, port = server.server_address[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}/?token={app.token}"


__all__ = ["ReviewApp", "ReviewError", "make_server", "url_of", "rating_status", "map_peak"]
