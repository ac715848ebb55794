"""The ``volseg`` command: builds the parser from the command modules and runs one command.

One module per command family (``preprocess``, ``synth``, ``strip``, ``train``, ``anomaly`` for
anomaly/calibrate/evaluate, ``cohort`` for run/gather, ``review``, ``slurm``), each with a ``register(sub)``
that adds its subparsers. They import :mod:`volseg.cli.common` (the one error handler and exit
codes, shared options and helpers) and library modules, never each other nor this package.
Heavy imports (torch, MONAI, nibabel) happen inside the commands so that ``volseg --help``
answers at once.
"""

from __future__ import annotations

import argparse
import sys

from volseg import __version__
from volseg.cli import anomaly, cohort, preprocess, review, slurm, strip, synth, train
from volseg.cli.common import (
    EXIT_CODES_HELP,
    EXIT_USAGE,
    Parser,
    run_command,
    setup_logging,
)

COMMAND_MODULES = (preprocess, synth, strip, train, anomaly, cohort, review, slurm)  # the order of --help

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="volseg",
        description="Bias correction, skull stripping and anomaly maps for 3D brain MRI, "
                    "with every output on the scan's own grid.",
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument("--version", action="version", version=f"volseg {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USAGE
    setup_logging(args.verbose)
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
