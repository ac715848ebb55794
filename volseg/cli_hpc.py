"""Subcommands of ``volseg`` for the hpc stage (registered by :func:`register`)."""

from __future__ import annotations


def register(sub) -> None:
    """Add this module's subcommands to the ``volseg`` subparsers ``sub``."""
