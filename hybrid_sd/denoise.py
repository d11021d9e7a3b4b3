"""The one denoising loop: loop iterations ``[start, end)`` of a schedule with one UNet.

It is the body of ``StableDiffusionPipeline.__call__`` / ``StableDiffusionXLPipeline.__call__``
step 7/8, operation for operation, so that any split of the range reproduces diffusers bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class Guidance:
    scale: float
    rescale: float = 0.0
    # LCM-distilled UNets take the scale as an embedding instead of a second batch.
    timestep_cond: torch.Tensor | None = None

    @property
    def classifier_free(self) -> bool:
        return self.scale > 1 and self.timestep_cond is None


@torch.no_grad()
def denoise(
    unet: UNet2DConditionModel,
    scheduler: SchedulerMixin,
    latents: torch.Tensor,
    conditioning: Conditioning,
    guidance: Guidance,
    generator: torch.Generator,
    start: int,
    end: int,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Run iterations ``[start, end)`` of ``scheduler.timesteps``; the scheduler is advanced in place."""
    unet_inputs = conditioning.unet_inputs(guidance.classifier_free)
    extra_step_kwargs = step_kwargs(scheduler, generator)
    for i in range(start, end):
        t = scheduler.timesteps[i]
        model_input = torch.cat([latents] * 2) if guidance.classifier_free else latents
        model_input = scheduler.scale_model_input(model_input, t)
        noise_pred = unet(
            model_input,
            t,
            timestep_cond=guidance.timestep_cond,
            return_dict=False,
            **unet_inputs,
        )[0]
        if guidance.classifier_free:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance.scale * (noise_pred_text - noise_pred_uncond)
            if guidance.rescale > 0.0:
                # Section 3.4 of "Common Diffusion Noise Schedules and Sample Steps are Flawed".
                noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=guidance.rescale)
        latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
        if not torch.isfinite(latents).all():
            raise NonFiniteLatentsError(
                f"latents became NaN or Inf at step {i + 1} of {len(scheduler.timesteps)}"
                f" (timestep {int(t)}, {type(scheduler).__name__})"
            )
        if callback is not None:
            callback(
                {
                    "step": i,
                    "total": len(scheduler.timesteps),
                    "timestep": t,
                    "latents": latents,
                    "model_input": model_input[-1:],
                    "noise_pred": noise_pred,
                    "scheduler": scheduler,
                }
            )
    return latents
