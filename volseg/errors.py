"""Exceptions that carry the file and the problem, so every failure message names both."""

from __future__ import annotations

import os


class VolsegError(Exception):
    """Base class of every error volseg raises on purpose."""


class InputError(VolsegError):
    """An input file that volseg cannot use: missing, unreadable, not 3D, constant, ..."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class OutputError(VolsegError):
    """An output location that cannot be written."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(VolsegError):
    """A configuration file with an unknown key or a value of the wrong type."""
