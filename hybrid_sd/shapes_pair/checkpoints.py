"""Stage checkpoints of ``hybrid-sd train-shapes``: one file per stage holding its step, modules, optimiser,
learning-rate schedule and EMA, written atomically every few minutes and when the stage ends, so that a
stopped run continues where it was (``--resume``) and reaches the same weights as one that never stopped."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hybrid_sd.shapes_pair.train_config import TrainConfig

RUN_FILE = "run.json"  # the configuration the checkpoints belong to


@dataclass(frozen=True)
class Checkpoints:
    """Where a run keeps its stage checkpoints (None: nowhere) and how often it writes them."""

    folder: Path | None = None
    every_s: float = 300.0

    def start(self, config: TrainConfig, resume: bool) -> None:
        """Claim ``folder`` for a run of ``config``: a new run needs it free of another run's checkpoints;
        ``resume`` needs the same configuration as the checkpoints there."""
        if self.folder is None:
            if resume:
                raise ValueError("--resume: needs --checkpoints, the folder of the run to continue")
            return
        run_file = self.folder / RUN_FILE
        wanted = asdict(config)
        if run_file.exists():
            # A setting added since the run started counts as its default, which that run used.
            found = asdict(TrainConfig()) | json.loads(run_file.read_text())
            if not resume:
                raise ValueError(
                    f"--checkpoints: {self.folder} holds a run already; pass --resume to continue it,"
                    " or choose another folder"
                )
            if found != wanted:
                changed = sorted(name for name in wanted if found.get(name) != wanted[name])
                raise ValueError(f"--resume: the run in {self.folder} was started with other settings: {changed}")
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(wanted, indent=2) + "\n")

    def stage(self, name: str) -> StageCheckpoint:
        return StageCheckpoint(None if self.folder is None else self.folder / f"{name}.pt", self.every_s)


class StageCheckpoint:
    """One stage's checkpoint file: ``load`` what a stopped run left (None: nothing), ``due`` says when the
    next periodic ``save`` is, ``save`` replaces the file atomically."""

    def __init__(self, path: Path | None, every_s: float):
        self.path, self.every_s = path, every_s
        self.saved_at = time.monotonic()

    def load(self, device: torch.device) -> dict | None:
        if self.path is None or not self.path.exists():
            return None
        return torch.load(self.path, map_location=device, weights_only=True)

    def due(self) -> bool:
        return self.path is not None and time.monotonic() - self.saved_at >= self.every_s

    def save(self, state: dict) -> None:
        if self.path is None:
            return
        partial = self.path.with_suffix(".partial")
        torch.save(state, partial)
        os.replace(partial, self.path)  # a run stopped while writing keeps the previous checkpoint
        self.saved_at = time.monotonic()
