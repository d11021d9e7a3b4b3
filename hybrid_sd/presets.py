"""Named model pairs (data only: importing this loads no model library)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hybrid_sd.request import DEFAULT_GUIDANCE_SCALE


@dataclass(frozen=True)
class PairSpec:
    """Where the two models of a pair come from: local diffusers folders or hub IDs.

    ``edge`` is a whole pipeline or a UNet alone (then it runs on the cloud model's text encoders
    and VAE). ``edge_vae`` replaces the edge's VAE, typically by a tiny decoder; an
    AutoencoderTiny's config does not say which latent space it decodes, so the spec states it.
    ``edge_shares_text_encoder`` loads the edge pipeline on the cloud's text encoders. ``guidance_scale`` is
    the classifier-free guidance scale a request that names none gets, ``timestep_power`` its timestep spacing
    (None: the scheduler's own; see :class:`hybrid_sd.request.GenerationRequest`).
    """

    cloud: str
    edge: str
    edge_vae: str | None = None
    edge_vae_latent_space: str | None = None
    edge_shares_text_encoder: bool = False
    description: str = ""
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    timestep_power: float | None = None


PRESETS: dict[str, PairSpec] = {
    "sd14-hybrid-224m": PairSpec(
        "CompVis/stable-diffusion-v1-4",
        "cqyan/hybrid-sd-224m",
        "cqyan/hybrid-sd-tinyvae",
        "sd1",
        True,
        "SD 1.4 with the Hybrid-SD 224M pruned UNet and its tiny VAE (arXiv 2408.06646)",
    ),
    "sd15-bk-sdm-small": PairSpec(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "nota-ai/bk-sdm-small",
        "madebyollin/taesd",
        "sd1",
        True,
        "SD 1.5 with BK-SDM-Small (0.49B UNet) and TAESD",
    ),
    "sd15-bk-sdm-tiny": PairSpec(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "nota-ai/bk-sdm-tiny",
        "madebyollin/taesd",
        "sd1",
        True,
        "SD 1.5 with BK-SDM-Tiny (0.33B UNet) and TAESD",
    ),
    "sdxl-koala-700m": PairSpec(
        "stabilityai/stable-diffusion-xl-base-1.0",
        "etri-vilab/koala-700m",
        "madebyollin/taesdxl",
        "sdxl",
        True,
        "SDXL base with KOALA-700M and TAESDXL",
    ),
    "sdxl-ssd-1b": PairSpec(
        "stabilityai/stable-diffusion-xl-base-1.0",
        "segmind/SSD-1B",
        "madebyollin/taesdxl",
        "sdxl",
        True,
        "SDXL base with Segmind SSD-1B and TAESDXL",
    ),
    "sdxl-vega": PairSpec(
        "stabilityai/stable-diffusion-xl-base-1.0",
        "segmind/Segmind-Vega",
        "madebyollin/taesdxl",
        "sdxl",
        True,
        "SDXL base with Segmind Vega and TAESDXL",
    ),
}
# Trained pairs shipped in the package: folder with cloud/, edge-unet/, edge-vae/ (see its README.md).
EMBEDDED_PRESETS = {"shapes": Path(__file__).parent / "shapes" / "pair"}
# Random-weight pairs built from config on first use (see hybrid_sd.tiny_models).
TINY_PRESETS = {"tiny-sd1": "sd1", "tiny-sdxl": "sdxl"}
DEFAULT_PAIR = "shapes"
PAIR_NAMES = (*EMBEDDED_PRESETS, *TINY_PRESETS, *PRESETS)
