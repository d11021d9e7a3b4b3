"""Which latent space a model denoises in: the rules that decide whether two models can share a run."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DiffusionPipeline

# AutoencoderKL scaling factors of the public latent spaces.
LATENT_SPACE_BY_SCALING = {0.18215: "sd1", 0.13025: "sdxl"}


def unet_family(pipe: DiffusionPipeline) -> str:
    """``sdxl`` for UNets conditioned on SDXL's pooled text and time ids, else ``sd1``."""
    return "sdxl" if pipe.unet.config.get("addition_embed_type") == "text_time" else "sd1"


def vae_latent_space(vae: torch.nn.Module) -> str | None:
    """The latent space an AutoencoderKL's scaling factor identifies; None where it cannot tell
    (an AutoencoderTiny's config is the same for SD 1.x and SDXL)."""
    if not isinstance(vae, AutoencoderKL):
        return None
    scaling = vae.config.scaling_factor
    return latent_space_name(scaling)


def latent_space_name(scaling_factor: float) -> str:
    """``sd1``/``sdxl`` for the public AutoencoderKL scaling factors, else ``custom-<factor>``."""
    return LATENT_SPACE_BY_SCALING.get(scaling_factor, f"custom-{scaling_factor}")


def pipeline_latent_space(pipe: DiffusionPipeline) -> str:
    """The latent space a pipeline denoises in: its AutoencoderKL's, else (a tiny decoder) its UNet family's."""
    return vae_latent_space(pipe.vae) or unet_family(pipe)
