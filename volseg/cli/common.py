"""What every ``volseg`` command shares: the one error handler and its exit codes, the parser
class, logging, and the helpers of the per-scan commands.

Every error a command reports is ONE line on stderr, ``volseg <command>: error: <message>``,
naming the problem (the file, the option, the key), never a traceback. Exit codes:

* 0 (:data:`EXIT_OK`): everything asked for was done.
* 1 (:data:`EXIT_FAILED`): volseg refused or failed: an input, output, model or config problem
  (:class:`volseg.errors.VolsegError`, a missing or unreadable file), or at least one scan of a
  batch failed (the batch then ends with a summary and one ``FAILED`` line per scan).
* 2 (:data:`EXIT_USAGE`): the command line is wrong: an unknown option or value, a missing
  argument, options that do not go together (:class:`UsageError`, argparse errors).
* 3 (:data:`EXIT_INTERNAL`): an unexpected error, i.e. a bug in volseg; ``-vv`` shows where.
* 130 (:data:`EXIT_INTERRUPTED`): interrupted (Ctrl-C).

Only the standard library is imported here at module level, so that ``volseg --help`` answers
at once; command modules import this module and library modules, never each other.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from volseg.errors import VolsegError

log = logging.getLogger("volseg")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

EXIT_CODES_HELP = ("exit codes: 0 done; 1 failed (a bad input, output, model or config, or a failed "
                   "scan); 2 usage error; 3 unexpected error (a bug: -vv shows where); 130 interrupted")


class UsageError(VolsegError):
    """Options that are missing or do not go together (exit code 2)."""


def one_line(message: object) -> str:
    """``message`` on one line: its lines joined with '; '."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return "; ".join(lines) or "(no message)"


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (and exit code 2), like the others."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} (see '{self.prog} --help')\n")


def set_command(p: argparse.ArgumentParser, func) -> None:
    """Make ``func(args) -> int`` the command of subparser ``p`` (named by ``p.prog`` in errors)."""
    p.set_defaults(func=func, cli_prog=p.prog)


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="volseg %(levelname)s: %(message)s", stream=sys.stderr)


def run_command(args) -> int:
    """Run ``args.func(args)``; turn every error into one line on stderr and an exit code."""
    prog = getattr(args, "cli_prog", "volseg")

    def fail(message: object, code: int) -> int:
        print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
        return code

    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        return fail(exc, EXIT_USAGE)
    except VolsegError as exc:
        return fail(exc, EXIT_FAILED)
    except OSError as exc:  # a missing or unreadable file, a full disk, ...
        where = f"{exc.filename}: " if exc.filename else ""
        return fail(f"{where}{exc.strerror or exc}", EXIT_FAILED)
    except MemoryError:
        return fail("out of memory", EXIT_FAILED)
    except KeyboardInterrupt:
        print("volseg: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: one line, the traceback with -vv
        log.debug("traceback", exc_info=True)
        return fail(f"unexpected {type(exc).__name__}: {exc} (a bug in volseg; -vv shows the traceback)",
                    EXIT_INTERNAL)


# ------------------------------------------------------------------------- shared options


def device_name(value: str) -> str:
    """argparse ``type`` of ``--device``: auto, cpu, cuda or cuda:N (checked without importing torch)."""
    from volseg.device import DeviceError, check_device_name

    try:
        return check_device_name(value)
    except DeviceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def set_threads(n: int) -> None:
    """``--threads N`` (0: leave torch's default)."""
    if n:
        import torch

        torch.set_num_threads(n)


def add_control_args(p) -> None:
    """How healthy controls are chosen and read (``calibrate`` and ``train ae --init``)."""
    p.add_argument("--participant-label", nargs="+", default=None, metavar="LABEL",
                   help="BIDS participants to use as controls")
    p.add_argument("--heads", action="store_true", help="the controls are whole heads: skull-strip them first")
    p.add_argument("--strip-model", type=Path, default=None, help="skull-strip model for --heads (default: shipped)")


# ----------------------------------------------------------------- per-scan batch commands


def unique_ids(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Inputs whose scan ids are unique, and (input, error) for the later duplicates."""
    from volseg.io import scan_id

    seen: dict[str, str] = {}
    keep, dup = [], []
    for p in inputs:
        sid = scan_id(p)
        if sid in seen:
            dup.append((p, f"{p}: scan id '{sid}' is already used by {seen[sid]}; rename one"))
        else:
            seen[sid] = p
            keep.append(p)
    return keep, dup


def run_inputs(inputs: list[str], func, desc: str):
    """``func(input)`` over the inputs: ``(BatchResult, duplicate failures)`` for :func:`finish`.

    One input: its error is the command's error (raised, so it is one line). Several: each
    failure is isolated and logged, the others go on, and :func:`finish` lists them.
    """
    from volseg.runner import BatchResult, run_batch

    if len(inputs) == 1:
        return BatchResult(done=[(inputs[0], func(inputs[0]))]), []
    keep, dup = unique_ids(inputs)
    return run_batch(keep, func, desc=desc), dup


def finish(result, extra_failures=(), what: str = "scans") -> int:
    """Print the batch summary (stderr) and the failed inputs; the exit code."""
    failures = list(extra_failures) + list(result.failed)
    for _, msg in extra_failures:
        log.error("%s", msg)
    print(f"volseg: {len(result.done)} {what} done, {len(failures)} failed", file=sys.stderr)
    for _, msg in failures:
        print(f"  FAILED {msg}", file=sys.stderr)
    return EXIT_FAILED if failures else EXIT_OK
