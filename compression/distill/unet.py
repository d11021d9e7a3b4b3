"""Knowledge distillation of a pruned UNet from its teacher, as BK-SDM (Kim et al. 2023, arXiv 2305.15798):
output-level and feature-level MSE on the teacher's own sampling inputs."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import UnionType
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from compression.distill.teacher_data import TeacherTrajectories
from compression.prune.calibration import Calibration
from hybrid_sd.shapes_pair.training_loop import batches, optimizer_with_schedule, run_steps

LOSSES = ("loss", "output", "feature")


@dataclass(frozen=True)
class DistillConfig:
    """Optimisation settings; the loss is ``output_weight * output MSE + feature_weight * feature MSE``.

    ``from_step`` trains on the teacher's UNet calls from that loop iteration on: an edge that only ever
    continues handoffs at switch step ``k`` or later serves those steps alone (as SDXL's refiner is trained on
    the low-noise end of the schedule); 0 trains on every step, for an edge that also runs alone.
    """

    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-4
    warmup_steps: int = 50
    feature_weight: float = 1.0
    output_weight: float = 1.0
    from_step: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for field in ("steps", "batch_size"):
            _check(field, getattr(self, field), int, lambda value: value >= 1, "an integer >= 1")
        for field in ("warmup_steps", "from_step"):
            _check(field, getattr(self, field), int, lambda value: value >= 0, "an integer >= 0")
        _check("seed", self.seed, int, lambda value: True, "an integer")
        _check("lr", self.lr, int | float, lambda value: math.isfinite(value) and value > 0, "a positive number")
        for field in ("feature_weight", "output_weight"):
            _check(field, getattr(self, field), int | float, lambda value: math.isfinite(value) and value >= 0, ">= 0")
        if self.feature_weight == self.output_weight == 0:
            raise ValueError("output_weight and feature_weight are both 0: nothing to learn")


def _check(field: str, value: Any, kind: type | UnionType, valid: Callable[[Any], bool], what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or not valid(value):
        raise ValueError(f"{field} must be {what}, got {value!r}")


def feature_blocks(unet: UNet2DConditionModel) -> list[str]:
    """The modules whose outputs BK-SDM matches: every down block, the mid block, every up block."""
    names = [f"down_blocks.{index}" for index in range(len(unet.down_blocks))]
    if unet.mid_block is not None:
        names.append("mid_block")
    return names + [f"up_blocks.{index}" for index in range(len(unet.up_blocks))]


def matching_blocks(teacher: UNet2DConditionModel, student: UNet2DConditionModel, probe: Calibration) -> list[str]:
    """The blocks both UNets have whose outputs have the same shape on ``probe``."""
    names = [name for name in feature_blocks(student) if name in feature_blocks(teacher)]
    with torch.no_grad():
        _, teacher_features = block_outputs(teacher, names, probe)
        _, student_features = block_outputs(student, names, probe)
    return [name for name in names if teacher_features[name].shape == student_features[name].shape]


def block_outputs(
    unet: UNet2DConditionModel, names: list[str], inputs: Calibration
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The UNet's prediction on ``inputs`` (float32) and the hidden states each named block outputs."""
    modules = dict(unet.named_modules())
    features: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_hook(partial(_keep, features, name)) for name in names]
    try:
        parameter = next(unet.parameters())
        added = inputs.added_cond_kwargs
        if added is not None:
            added = {key: value.to(parameter) for key, value in added.items()}
        prediction = unet(
            inputs.sample.to(parameter),
            inputs.timestep.to(parameter.device),
            inputs.encoder_hidden_states.to(parameter),
            added_cond_kwargs=added,
        ).sample
    finally:
        for handle in handles:
            handle.remove()
    return prediction.float(), features


def _keep(features: dict[str, torch.Tensor], name: str, module: torch.nn.Module, args: tuple, output) -> None:
    # Down blocks return (hidden states, skip connections); the others their hidden states.
    features[name] = (output[0] if isinstance(output, tuple) else output).float()


def distillation_losses(
    teacher: UNet2DConditionModel,
    student: UNet2DConditionModel,
    inputs: Calibration,
    blocks: list[str],
    config: DistillConfig,
) -> dict[str, torch.Tensor]:
    """``output``: MSE of the noise predictions; ``feature``: the sum over ``blocks`` of their outputs'
    MSE; ``loss``: the weighted total. Gradients flow into the student only."""
    with torch.no_grad():
        teacher_prediction, teacher_features = block_outputs(teacher, blocks, inputs)
    prediction, features = block_outputs(student, blocks, inputs)
    output = F.mse_loss(prediction, teacher_prediction.to(prediction.device))
    feature = sum(
        (F.mse_loss(features[name], teacher_features[name].to(prediction.device)) for name in blocks),
        torch.zeros((), device=prediction.device),
    )
    return {
        "loss": config.output_weight * output + config.feature_weight * feature,
        "output": output,
        "feature": feature,
    }


def distill_unet(
    teacher: UNet2DConditionModel,
    student: UNet2DConditionModel,
    data: TeacherTrajectories,
    config: DistillConfig,
) -> dict:
    """Fine-tune ``student`` (in place, in float32) to match the frozen ``teacher`` on random batches of
    ``data``; the student is left in eval mode. Returns the steps, seconds, the loss averaged over the
    first and the last tenth of the steps (``first_loss``, ``final_loss``), the final ``output`` and
    ``feature`` losses, and the matched blocks."""
    teacher.eval()
    data = data.from_step(config.from_step)
    blocks = matching_blocks(teacher, student, data.batch([0])) if config.feature_weight > 0 else []
    if config.feature_weight > 0 and not blocks:
        raise ValueError(
            "feature_weight > 0 but no down, mid or up block output of the student has the teacher's shape;"
            " use feature_weight=0 for output distillation alone"
        )
    torch.manual_seed(config.seed)
    student.float().train()
    parameters = [parameter for parameter in student.parameters() if parameter.requires_grad]
    optimizer, schedule = optimizer_with_schedule(parameters, config.lr, config.steps, config.warmup_steps)
    rows = batches(
        len(data), min(config.batch_size, len(data)), config.steps, torch.Generator().manual_seed(config.seed)
    )
    history: dict[str, list[float]] = {name: [] for name in LOSSES}

    def loss_fn(step: int) -> torch.Tensor:
        losses = distillation_losses(teacher, student, data.batch(next(rows)), blocks, config)
        for name in LOSSES:
            history[name].append(losses[name].item())
        return losses["loss"]

    try:
        stats = run_steps("distil UNet", config.steps, loss_fn, optimizer, schedule)
    finally:
        student.eval()
    return {"steps": config.steps, "seconds": stats["seconds"], **loss_summary(history), "blocks": blocks}


def loss_summary(history: dict[str, list[float]]) -> dict[str, float]:
    """``first_loss`` and ``final_loss``: ``history["loss"]`` averaged over its first and last tenth;
    ``final_<name>_loss`` for the other losses."""
    window = max(1, len(history["loss"]) // 10)
    summary = {"first_loss": _mean(history["loss"][:window])}
    for name, values in history.items():
        summary["final_loss" if name == "loss" else f"final_{name}_loss"] = _mean(values[-window:])
    return summary


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
