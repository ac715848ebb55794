"""Splitting a cohort between jobs: ``--shard K/N`` or a SLURM job array.

Shard ``K`` of ``N`` (``0 <= K < N``) takes ``scans[K::N]`` of the sorted scan list, as
nnU-Net's ``predict_from_raw_data`` does. From a SLURM array the shard is
``(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP`` of
``SLURM_ARRAY_TASK_COUNT``, so ``--array=0-3``, ``--array=1-4`` and ``--array=0-6:2`` all work.
The range is checked in one place, :func:`check_shard`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

from volseg.errors import VolsegError

T = TypeVar("T")


class ShardError(VolsegError):
    """A shard specification that is malformed or out of range."""


def check_shard(k: int, n: int, source: str) -> tuple[int, int]:
    """The one place a shard is validated: ``n >= 1`` and ``0 <= k < n``."""
    if n < 1:
        raise ShardError(f"{source}: the number of shards must be at least 1, got {n}")
    if not 0 <= k < n:
        raise ShardError(f"{source}: shard index {k} is outside 0..{n - 1} "
                         f"(shards are numbered from 0: K/N with 0 <= K < N)")
    return k, n


def parse_shard(text: str | None = None, env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``(K, N)`` from ``"K/N"``, else from the SLURM array variables, else None (no sharding)."""
    env = os.environ if env is None else env
    if text is not None:
        m = re.fullmatch(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*", text)
        if not m:
            raise ShardError(f"--shard {text!r}: expected K/N, e.g. 0/4 (shards numbered from 0)")
        return check_shard(int(m.group(1)), int(m.group(2)), f"--shard {text}")
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        try:
            task = int(env["SLURM_ARRAY_TASK_ID"])
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            step = int(env.get("SLURM_ARRAY_TASK_STEP", "1") or 1)
        except ValueError:
            raise ShardError("SLURM_ARRAY_TASK_ID/COUNT/MIN/STEP are not integers: "
                             + ", ".join(f"{k}={env.get(k)!r}" for k in (
                                 "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT",
                                 "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP"))) from None
        offset = task - first
        if step < 1 or offset % step:
            raise ShardError(f"SLURM array task {task} is not on the array's grid "
                             f"(min {first}, step {step}); use --shard K/N instead")
        return check_shard(offset // step, count,
                           f"SLURM_ARRAY_TASK_ID={task} (min {first}, step {step}), "
                           f"SLURM_ARRAY_TASK_COUNT={count}")
    return None


def select_shard(items: Sequence[T], shard: tuple[int, int] | None) -> list[T]:
    """``items[K::N]`` (all items without a shard)."""
    if shard is None:
        return list(items)
    k, n = check_shard(*shard, source=f"shard {shard[0]}/{shard[1]}")
    return list(items)[k::n]


def shard_name(shard: tuple[int, int] | None) -> str:
    return "" if shard is None else f"shard-{shard[0]}-of-{shard[1]}"
