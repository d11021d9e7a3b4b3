"""Where a served process logs: with ``--verbose`` everything to the terminal; otherwise the stage lines
(``hybrid_sd.stages``) to stdout and the full log to a file under ``--log-dir``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hybrid_sd.stages import StageLines
from hybrid_sd.stages import logger as stages

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def route_logs(args: argparse.Namespace, name: str) -> Path | None:
    """Route this process's logging for ``args`` (``name``: the log file's stem); returns the log file, if any.
    Python warnings (third-party deprecations) go to the log too."""
    if args.verbose:
        stages.setLevel(logging.INFO)  # at the root's INFO already; explicit for a caller that set otherwise
        return None
    args.log_dir.mkdir(parents=True, exist_ok=True)
    path = args.log_dir / f"{name}.log"
    file = logging.FileHandler(path)
    file.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    root.handlers = [file]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    print_stages(also_logged=True)
    return path


def print_stages(also_logged: bool) -> None:
    """Stage lines on stdout; in the log's handlers too if ``also_logged``."""
    lines = StageLines(sys.stdout)
    lines.setFormatter(logging.Formatter("%(message)s"))
    stages.addHandler(lines)
    stages.setLevel(logging.INFO)
    stages.propagate = also_logged
