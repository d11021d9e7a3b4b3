"""Scheduler names, aliases and the set whose state the engine hands over exactly."""

from __future__ import annotations

import inspect
from typing import Any

import diffusers
import torch
from diffusers import SchedulerMixin

from hybrid_sd.scheduler_names import EXACT_HANDOFF_SCHEDULERS, REFUSAL_REASONS, SCHEDULER_ALIASES


def resolve_scheduler(name: str | None, default_class: str) -> tuple[type[SchedulerMixin], dict[str, Any]]:
    """Map a request's scheduler name (alias, class name, or None for the model's own) to a class
    and config overrides; raise ``ValueError`` naming the field for unknown or refused ones."""
    class_name, overrides = SCHEDULER_ALIASES.get(name, (name or default_class, {}))
    if class_name not in EXACT_HANDOFF_SCHEDULERS:
        supported = ", ".join(sorted(SCHEDULER_ALIASES) + sorted(EXACT_HANDOFF_SCHEDULERS))
        reason = REFUSAL_REASONS.get(class_name)
        if reason is None and not isinstance(getattr(diffusers, class_name, None), type):
            raise ValueError(f"scheduler {class_name!r} is unknown; supported: {supported}")
        raise ValueError(
            f"scheduler {class_name!r} cannot be handed over exactly"
            f" ({reason or 'not verified for an exact handoff'}); supported: {supported}"
        )
    return getattr(diffusers, class_name), overrides


def make_scheduler(name: str | None, model_scheduler: SchedulerMixin) -> SchedulerMixin:
    """A scheduler of the requested kind on the model's own noise schedule, as
    ``Cls.from_config(pipe.scheduler.config)`` does in diffusers' docs."""
    scheduler_class, overrides = resolve_scheduler(name, type(model_scheduler).__name__)
    return scheduler_class.from_config({**model_scheduler.config, **overrides})


def scheduler_from_config(config: dict[str, Any]) -> SchedulerMixin:
    """Rebuild a scheduler from its full config (as carried in a handoff)."""
    scheduler_class, _ = resolve_scheduler(config.get("_class_name"), "")
    return scheduler_class.from_config(config)


def step_kwargs(scheduler: SchedulerMixin, generator: torch.Generator) -> dict[str, Any]:
    """Extra ``step`` arguments, passed only where the signature takes them, as
    ``StableDiffusionPipeline.prepare_extra_step_kwargs`` does (with ``eta=0``)."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs


def power_timesteps(num_inference_steps: int, power: float, num_train_timesteps: int = 1000) -> list[int]:
    """Timesteps ``t_i = (T - 1)(1 - i/N)^p``, i < N, rounded: p > 1 spends fewer steps at high noise (the layout)
    and more at low noise; p = 1 is close to ``"trailing"`` spacing. Where rounding would repeat a timestep (the
    low-noise end of many steps) the earlier ones are lifted, so they stay strictly decreasing."""
    last = num_train_timesteps - 1
    timesteps = [round(last * (1 - i / num_inference_steps) ** power) for i in range(num_inference_steps)]
    for i in reversed(range(num_inference_steps - 1)):
        timesteps[i] = max(timesteps[i], timesteps[i + 1] + 1)
    return timesteps


def pipeline_timesteps(scheduler: SchedulerMixin, num_inference_steps: int, timestep_power: float | None) -> dict:
    """The ``timesteps=`` argument of a diffusers pipeline call on ``scheduler``'s schedule that samples as
    :func:`set_timesteps` does; empty for the scheduler's own spacing."""
    if timestep_power is None:
        return {}
    train_steps = scheduler.config.num_train_timesteps
    return {"timesteps": power_timesteps(num_inference_steps, timestep_power, train_steps)}


def takes_custom_timesteps(scheduler_class: type[SchedulerMixin]) -> bool:
    """Whether ``set_timesteps`` takes ``timesteps=`` (DDPM, DPM-Solver++, Euler, LCM; not DDIM, PLMS, UniPC)."""
    return "timesteps" in inspect.signature(scheduler_class.set_timesteps).parameters


def set_timesteps(
    scheduler: SchedulerMixin,
    num_inference_steps: int,
    timestep_power: float | None = None,
    device: torch.device | str | None = None,
) -> None:
    """``scheduler.set_timesteps`` for a request: its own spacing, or with ``timestep_power`` the custom
    timesteps of :func:`power_timesteps` (as diffusers' pipelines pass ``timesteps=``). Raise ``ValueError``
    naming ``timestep_power`` where the scheduler takes no custom timesteps or they repeat one."""
    if timestep_power is None:
        scheduler.set_timesteps(num_inference_steps, device=device)
        return
    name = type(scheduler).__name__
    if not takes_custom_timesteps(type(scheduler)):
        raise ValueError(f"timestep_power needs a scheduler that takes custom timesteps; {name} does not")
    train_steps = scheduler.config.num_train_timesteps
    timesteps = power_timesteps(num_inference_steps, timestep_power, train_steps)
    if timesteps[0] >= train_steps:
        raise ValueError(
            f"timestep_power {timestep_power} over {num_inference_steps} steps needs more distinct timesteps than"
            f" {name}'s {train_steps}: choose fewer steps"
        )
    scheduler.set_timesteps(timesteps=timesteps, device=device)


def uses_generator(scheduler: SchedulerMixin) -> bool:
    return "generator" in inspect.signature(scheduler.step).parameters


def loop_index(switch_step: int, num_inference_steps: int, loop_length: int) -> int:
    """Loop iteration at which denoising step ``switch_step`` begins.

    Most schedules have one UNet evaluation per step; PLMS (``PNDMScheduler``) has one warm-up
    evaluation more at the start, so step k >= 1 ends after k + 1 evaluations.
    """
    if switch_step == 0:
        return 0
    return switch_step + (loop_length - num_inference_steps)
