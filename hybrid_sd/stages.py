"""The stages of a server's start and stop, as log records of one logger: ``serve`` prints them as one line
each without ``--verbose`` (``loading the edge model ... ready in 4.1 s``), the rest of the log going to a
file."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger("hybrid_sd.stages")
OPENS = "stage_opens"  # a record's attribute: the line goes on with the stage's end


@contextmanager
def stage(what: str, done: str = "ready") -> Iterator[None]:
    """Log ``what...`` and, once the block is done, ``done`` and how long it took."""
    started = time.perf_counter()
    logger.info("%s...", what, extra={OPENS: True})
    yield
    logger.info("%s in %.1f s", done, time.perf_counter() - started)


class StageLines(logging.StreamHandler):
    """Stage records as lines: a stage's start and its end on one."""

    def emit(self, record: logging.LogRecord) -> None:
        self.terminator = " " if getattr(record, OPENS, False) else "\n"
        super().emit(record)
