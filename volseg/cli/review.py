"""``volseg review OUT``: the local web app where people check and rate a run's scans."""

from __future__ import annotations

import sys
from pathlib import Path

from volseg.cli.common import EXIT_OK, set_command


def cmd_review(args) -> int:
    import logging

    from volseg.review.server import LOOPBACK_NAMES, make_server, url_of

    if args.host not in LOOPBACK_NAMES:
        logging.getLogger("volseg").warning(
            "volseg review: serving on %s: other machines on that network can open the pages and read the "
            "scans (writes still need the token)", args.host)
    server, app = make_server(args.output, host=args.host, port=args.port)
    _stop_on_signals()  # before the URL is printed: whoever reads it may stop the server at once
    print(f"volseg review: {app.out} ({len(app.scan_names())} scans); open {url_of(server, app)}", flush=True)
    print("ratings are saved to " + str(app.out / "volseg_ratings.tsv") + "; stop with Ctrl+C", file=sys.stderr,
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return EXIT_OK


def _stop_on_signals() -> None:
    """Ctrl+C (SIGINT) and ``kill`` (SIGTERM) stop the server cleanly, also when it was started
    in the background by a script: a non-interactive shell starts background jobs with SIGINT
    ignored, and Python then never turns SIGINT into KeyboardInterrupt."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop)


def register(sub) -> None:
    p = sub.add_parser("review", help="check and rate a run's scans in a local web app (3D viewer)",
                       description="Serve a folder written by 'volseg run' (or gathered shards) on this machine: "
                                   "the cohort table, one page per scan with a 3D viewer (NiiVue) of the image, "
                                   "brain mask and anomaly map, a rating form and a printable report. Ratings "
                                   "are appended to OUT/volseg_ratings.tsv. Nothing is opened by itself: the "
                                   "URL (with its per-session token) is printed.")
    p.add_argument("output", type=Path, metavar="OUT", help="the folder given to volseg run -o")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1, this machine only; anything else is reachable "
                        "from the network and warns)")
    set_command(p, cmd_review)
