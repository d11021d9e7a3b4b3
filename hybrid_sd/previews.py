"""Previews while a picture forms: the clean image a denoising step predicts, decoded small, as PNG."""

from __future__ import annotations

import io
from functools import partial

import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny

from hybrid_sd.denoise import StepCallback
from hybrid_sd.denoiser import Denoiser

# A full VAE decodes previews from latents this many times smaller on each side (a tiny decoder: all).
FULL_VAE_DOWNSCALE = 2


def predicted_clean(step: dict) -> torch.Tensor:
    """The clean latents a step predicts, from its UNet input (variance-preserving, as every scheduler
    scales it) and output: epsilon, v or sample prediction, at the step's timestep."""
    scheduler, model_input, output = step["scheduler"], step["model_input"], step["noise_pred"]
    alphas = scheduler.alphas_cumprod.to(model_input.device, torch.float32)
    alpha = alphas[int(step["timestep"])].clamp(min=1e-8)
    x, output = model_input.float(), output.float()
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "v_prediction":
        return alpha.sqrt() * x - (1 - alpha).sqrt() * output
    if kind == "sample":
        return output
    return (x - (1 - alpha).sqrt() * output) / alpha.sqrt()


def preview_png(denoiser: Denoiser, step: dict) -> bytes:
    """The step's predicted image as PNG, through the model's tiny decoder, or its VAE at lower resolution."""
    latents = predicted_clean(step)
    if not isinstance(denoiser.pipe.vae, AutoencoderTiny) and min(latents.shape[-2:]) >= 8 * FULL_VAE_DOWNSCALE:
        latents = F.interpolate(latents, scale_factor=1 / FULL_VAE_DOWNSCALE, mode="bilinear")
    buffer = io.BytesIO()
    denoiser.to_image(latents.to(denoiser.dtype)).save(buffer, format="PNG")
    return buffer.getvalue()


def with_previews(callback: StepCallback | None, denoiser: Denoiser, every: int) -> StepCallback | None:
    """``callback`` offered a preview (``step["preview"]()``, rendered only if called) every ``every`` steps."""
    if callback is None or every <= 0:
        return callback

    def offering(step: dict) -> None:
        if step and (step["step"] + 1) % every == 0:
            step = {**step, "preview": partial(preview_png, denoiser, step)}
        callback(step)

    return offering
