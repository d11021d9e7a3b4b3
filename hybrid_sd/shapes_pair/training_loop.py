"""The optimisation loop that every training stage shares (the shapes pair's and ``hybrid-sd compress``'s):
random batches, AdamW with warm-up and cosine decay, EMA, progress, and stage checkpoints to resume from."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from functools import lru_cache

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from hybrid_sd.shapes_pair.checkpoints import StageCheckpoint


def batches(count: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """`steps` batches of random indices into `count` items, each epoch a fresh permutation."""
    order = torch.randperm(count, generator=generator)
    position = 0
    for _ in range(steps):
        if position + batch_size > count:
            order, position = torch.randperm(count, generator=generator), 0
        yield order[position : position + batch_size]
        position += batch_size


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random numbers of one step of a stage seeded ``seed``: a function of the step alone, so that a
    resumed run draws what an uninterrupted one would (on the CPU, whichever device trains)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def batch_at(count: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The indices of step ``step``'s batch: epochs of whole batches, each a fresh permutation of ``count``."""
    per_epoch = count // batch_size
    epoch, position = divmod(step, per_epoch)
    start = position * batch_size
    return _permutation(count, seed, epoch)[start : start + batch_size]


@lru_cache(maxsize=2)
def _permutation(count: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed * 7_919 + epoch))


def optimizer_with_schedule(
    parameters: list[torch.nn.Parameter], lr: float, steps: int, warmup: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with linear warm-up and cosine decay to a tenth of `lr`."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run_steps(
    name: str,
    steps: int,
    loss_fn: Callable[[int], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    ema: EMAModel | None = None,
    parameters: list[torch.nn.Parameter] | None = None,
    trained: torch.nn.Module | None = None,
    checkpoint: StageCheckpoint | None = None,
) -> dict:
    """Optimise ``loss_fn(step)`` for ``steps`` steps; with ``ema``, its weights are copied into ``parameters``
    at the end. With a ``checkpoint`` (of the ``trained`` module's weights, the optimiser, schedule and EMA),
    a stage that a stopped run began continues from its last checkpoint, and a finished one is loaded, not
    rerun. Returns the stage's steps, seconds (over every run of it) and last losses."""
    start, seconds_before, recent = 0, 0.0, []
    state = checkpoint.load(next(trained.parameters()).device) if checkpoint else None
    if state is not None:
        trained.load_state_dict(state["trained"])
        if state["step"] == steps:
            return state["stats"]
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start, seconds_before, recent = state["step"], state["seconds"], state["recent"]

    def saved(step: int, stats: dict | None = None) -> dict:
        return {
            "step": step,
            "trained": trained.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "ema": None if ema is None else ema.state_dict(),
            "seconds": seconds_before + time.monotonic() - started,
            "recent": recent,
            "stats": stats,
        }

    started = time.monotonic()
    progress = tqdm(range(start, steps), desc=name, initial=start, total=steps)
    for step in progress:
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if ema is not None:
            ema.step(parameters)
        recent = (recent + [loss.item()])[-100:]
        if step % 25 == 0:
            progress.set_postfix(loss=f"{np.mean(recent):.4f}")
        if checkpoint is not None and step + 1 < steps and checkpoint.due():
            checkpoint.save(saved(step + 1))
    if ema is not None:
        ema.copy_to(parameters)
    stats = {
        "steps": steps,
        "seconds": round(seconds_before + time.monotonic() - started, 1),
        "final_loss": float(np.mean(recent)) if recent else None,
    }
    if checkpoint is not None:
        checkpoint.save(saved(steps, stats))
    return stats
