"""The teacher's own generations: every UNet input of its sampling runs, the data distillation trains on."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from compression.prune.calibration import Calibration
from hybrid_sd.schedulers import pipeline_timesteps


@dataclass
class TeacherTrajectories:
    """The UNet inputs of a teacher's sampling runs, one row per latent per UNet call, in call order.

    With classifier-free guidance each call has the unconditional rows first, then the conditional
    ones (as the pipelines concatenate them). ``inputs.sample`` is after ``scale_model_input``;
    ``step`` is each row's denoising step; ``final_latents`` are the runs' results in the UNet's
    (scaled) latent space, one per prompt.
    """

    prompts: list[str]
    inputs: Calibration
    step: torch.Tensor
    final_latents: torch.Tensor

    def __len__(self) -> int:
        return len(self.inputs)

    def from_step(self, step: int) -> TeacherTrajectories:
        """The rows of loop iterations ``step`` and later; ``ValueError`` naming ``from_step`` if none are."""
        rows = (self.step >= step).nonzero().flatten()
        if not len(rows):
            raise ValueError(f"from_step must be below the {int(self.step.max()) + 1} UNet calls per run, got {step}")
        if len(rows) == len(self):
            return self
        return TeacherTrajectories(self.prompts, self.batch(rows), self.step[rows], self.final_latents)

    def batch(self, rows: torch.Tensor | list[int]) -> Calibration:
        """The given rows as a :class:`Calibration` (also what pruning measures significance on)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        inputs = self.inputs
        added = inputs.added_cond_kwargs
        return Calibration(
            inputs.sample[rows],
            inputs.timestep[rows],
            inputs.encoder_hidden_states[rows],
            None if added is None else {key: value[rows] for key, value in added.items()},
        )


@torch.no_grad()
def collect_trajectories(
    pipe: DiffusionPipeline,
    prompts: list[str],
    steps: int,
    guidance_scale: float,
    seed: int,
    device: str | torch.device | None = None,
    timestep_power: float | None = None,
) -> TeacherTrajectories:
    """Run ``pipe`` (a Stable Diffusion or SDXL pipeline, with its own scheduler, at the timesteps of
    ``timestep_power`` where given, as the engine samples) on ``prompts`` in one batch, seeded, moved to
    ``device`` if given, and record what its UNet is called with."""
    if not prompts:
        raise ValueError("prompts must not be empty")
    if pipe.unet.config.time_cond_proj_dim is not None:
        raise ValueError("collect_trajectories does not record timestep_cond (guidance-embedding UNets)")
    if device is not None:
        pipe.to(device)
    signature = inspect.signature(pipe.unet.forward)
    calls: list[inspect.BoundArguments] = []

    def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append(signature.bind(*args, **kwargs))

    spacing = pipeline_timesteps(pipe.scheduler, steps, timestep_power)
    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        final = pipe(
            prompts,
            **spacing,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="latent",
        ).images
    finally:
        handle.remove()
    samples, timesteps, embeddings, step, added = [], [], [], [], []
    for index, call in enumerate(calls):
        arguments = call.arguments
        sample = arguments["sample"]
        samples.append(sample.float().cpu())
        timesteps.append(torch.as_tensor(arguments["timestep"]).cpu().long().expand(len(sample)))
        embeddings.append(arguments["encoder_hidden_states"].float().cpu())
        step.append(torch.full((len(sample),), index))
        conditions = arguments.get("added_cond_kwargs")
        if conditions:
            added.append({key: value.float().cpu() for key, value in conditions.items()})
    inputs = Calibration(
        torch.cat(samples),
        torch.cat(timesteps),
        torch.cat(embeddings),
        {key: torch.cat([row[key] for row in added]) for key in added[0]} if added else None,
    )
    return TeacherTrajectories(list(prompts), inputs, torch.cat(step), final.float().cpu())
