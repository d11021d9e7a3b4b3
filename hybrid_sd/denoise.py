"""The one denoising loop: loop iterations ``[start, end)`` of a schedule with one UNet.

A step is the body of ``StableDiffusionPipeline.__call__`` / ``StableDiffusionXLPipeline.__call__``
step 7/8, operation for operation, so that any split of the range reproduces diffusers bit for bit
when each request's UNet calls are its own (:func:`run_alone`). A compute lane may batch compatible
requests' calls into one (:func:`unet_outputs`); everything else stays per request.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from diffusers import SchedulerMixin, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from hybrid_sd.conditioning import Conditioning
from hybrid_sd.errors import NonFiniteLatentsError
from hybrid_sd.schedulers import step_kwargs

# Called after every loop iteration with {"step": i, "total": iterations in the schedule,
# "timestep": t, "latents": x, and for previews "model_input" (the scaled UNet input),
# "noise_pred" (the guided model output) and "scheduler"}; it observes only, and may raise to stop
# the run (cancellation, deadlines).
StepCallback = Callable[[dict[str, Any]], None]
T = TypeVar("T")


@dataclass(frozen=True)
class Guidance:
    scale: float
    rescale: float = 0.0
    # LCM-distilled UNets take the scale as an embedding instead of a second batch.
    timestep_cond: torch.Tensor | None = None

    @property
    def classifier_free(self) -> bool:
        return self.scale > 1 and self.timestep_cond is None


@dataclass
class StepRun:
    """One request's loop iterations ``[index, end)``: its UNet, scheduler, latents, prompt inputs and
    guidance. A step is the model input (:meth:`model_input`), a UNet call alone or batched with
    other runs (:func:`unet_outputs`), and :meth:`advance`, which guides, steps the scheduler and
    reports; each request keeps its own scheduler and generator, so batching shares only the UNet call."""

    unet: UNet2DConditionModel
    scheduler: SchedulerMixin
    latents: torch.Tensor
    conditioning: Conditioning
    guidance: Guidance
    generator: torch.Generator
    index: int
    end: int
    callback: StepCallback | None = None
    alone: bool = False  # never batched with other runs (an ``exact`` request)

    def __post_init__(self) -> None:
        self.unet_inputs = self.conditioning.unet_inputs(self.guidance.classifier_free)
        self.extra_step_kwargs = step_kwargs(self.scheduler, self.generator)

    @property
    def done(self) -> bool:
        return self.index >= self.end

    @property
    def timestep(self) -> torch.Tensor:
        return self.scheduler.timesteps[self.index]

    def batch_key(self) -> tuple:
        """What runs must share to be one UNet call: the model, and every input's shape after the
        batch dimension, dtype and device (a run with classifier-free guidance adds two rows, one
        without one)."""
        tensors = [self.latents, *_tensors(self.unet_inputs)]
        if self.guidance.timestep_cond is not None:
            tensors.append(self.guidance.timestep_cond)
        return (
            id(self.unet),
            self.guidance.timestep_cond is None,
            tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in tensors),
        )

    def model_input(self) -> torch.Tensor:
        model_input = torch.cat([self.latents] * 2) if self.guidance.classifier_free else self.latents
        return self.scheduler.scale_model_input(model_input, self.timestep)

    def advance(self, model_input: torch.Tensor, noise_pred: torch.Tensor) -> None:
        """Guide the UNet output for ``model_input``, step the scheduler, report the step."""
        i, t, guidance, scheduler = self.index, self.timestep, self.guidance, self.scheduler
        if guidance.classifier_free:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance.scale * (noise_pred_text - noise_pred_uncond)
            if guidance.rescale > 0.0:
                # Section 3.4 of "Common Diffusion Noise Schedules and Sample Steps are Flawed".
                noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=guidance.rescale)
        self.latents = scheduler.step(noise_pred, t, self.latents, **self.extra_step_kwargs, return_dict=False)[0]
        self.index += 1
        if not torch.isfinite(self.latents).all():
            raise NonFiniteLatentsError(
                f"latents became NaN or Inf at step {i + 1} of {len(scheduler.timesteps)}"
                f" (timestep {int(t)}, {type(scheduler).__name__})"
            )
        if self.callback is not None:
            self.callback(
                {
                    "step": i,
                    "total": len(scheduler.timesteps),
                    "timestep": t,
                    "latents": self.latents,
                    "model_input": model_input[-1:],
                    "noise_pred": noise_pred,
                    "scheduler": scheduler,
                }
            )


@torch.no_grad()
def unet_outputs(runs: list[StepRun], model_inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """One UNet call for ``runs`` (of one :meth:`StepRun.batch_key`), split back per run. Alone, a
    run's call is diffusers' own (one timestep for its rows); together, each row has its run's timestep."""
    first = runs[0]
    if len(runs) == 1:
        timesteps, inputs, timestep_cond = first.timestep, first.unet_inputs, first.guidance.timestep_cond
    else:
        rows = [len(x) for x in model_inputs]
        timesteps = torch.cat([run.timestep.reshape(1).expand(n) for run, n in zip(runs, rows, strict=True)])
        inputs = _concatenated([run.unet_inputs for run in runs])
        timestep_cond = None
        if first.guidance.timestep_cond is not None:
            timestep_cond = torch.cat([run.guidance.timestep_cond for run in runs])
    batch = model_inputs[0] if len(runs) == 1 else torch.cat(model_inputs)
    noise_pred = first.unet(batch, timesteps, timestep_cond=timestep_cond, return_dict=False, **inputs)[0]
    return list(noise_pred.split([len(x) for x in model_inputs]))


# A generation's model work with its denoising loops left open: it yields each loop as a StepRun for
# its driver to step (alone, or batched by a ComputeLane), then goes on to its value.
Steps = Generator[StepRun, None, T]


@torch.no_grad()
def run_alone(steps: Steps[T]) -> T:
    """Drive ``steps`` to its value, every UNet call its runs' own: what diffusers computes."""
    try:
        run = next(steps)
        while True:
            while not run.done:
                model_input = run.model_input()
                run.advance(model_input, unet_outputs([run], [model_input])[0])
            run = steps.send(None)
    except StopIteration as stop:
        return stop.value


def _tensors(inputs: dict) -> list[torch.Tensor]:
    """The tensors of UNet keyword inputs, nested dicts (``added_cond_kwargs``) included, in key order."""
    found = []
    for key in sorted(inputs):
        value = inputs[key]
        if isinstance(value, dict):
            found += _tensors(value)
        elif isinstance(value, torch.Tensor):
            found.append(value)
    return found


def _concatenated(inputs: list[dict]) -> dict:
    """Runs' UNet keyword inputs as one batch, row blocks in run order."""
    first = inputs[0]
    joined = {}
    for key, value in first.items():
        if isinstance(value, dict):
            joined[key] = _concatenated([each[key] for each in inputs])
        elif isinstance(value, torch.Tensor):
            joined[key] = torch.cat([each[key] for each in inputs])
        else:
            joined[key] = value
    return joined
