"""Run one function over many inputs: a progress bar, failures isolated and reported."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from volseg.errors import VolsegError

log = logging.getLogger("volseg")


@dataclass
class BatchResult:
    done: list[tuple[str, object]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def run_batch(items: Iterable[str], func: Callable[[str], object], desc: str = "scans",
              progress: bool = True) -> BatchResult:
    """Call ``func(item)`` for each item; an error is logged with the file and the others go on."""
    from tqdm import tqdm

    items = list(items)
    result = BatchResult()
    bar = tqdm(items, desc=desc, unit="scan", disable=not progress or len(items) < 2, leave=False)
    for item in bar:
        try:
            result.done.append((item, func(item)))
        except VolsegError as exc:
            log.error("%s", exc)
            result.failed.append((item, str(exc)))
        except MemoryError:
            log.error("%s: out of memory", item)
            result.failed.append((item, f"{item}: out of memory"))
        except Exception as exc:  # a bug or an unforeseen input: keep the others going
            log.exception("%s: unexpected %s: %s", item, type(exc).__name__, exc)
            result.failed.append((item, f"{item}: unexpected {type(exc).__name__}: {exc}"))
    return result
