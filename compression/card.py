"""What goes on an edge bundle's card: size and MACs per UNet step (every compress action), and measured
quality against the uncompressed pair (``hybrid-sd compress export``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from diffusers import UNet2DConditionModel
from tqdm import tqdm

from compression.prune.calibration import Calibration
from compression.prune.cost import count_macs, count_params
from hybrid_sd.bundle import Bundle, folder_bytes
from hybrid_sd.metrics import psnr, ssim
from hybrid_sd.pipeline import HybridPipeline
from hybrid_sd.request import GenerationRequest
from hybrid_sd.shapes_pair.evaluate import HeldoutSet


def unet_cost(float_unet: UNet2DConditionModel) -> dict:
    """Parameters and MACs of one UNet evaluation (batch 1, the native latent size; classifier-free guidance
    doubles it) of a float architecture; int8 kernels do the same multiply-accumulates."""
    calibration = Calibration.random(float_unet, batch_size=1)
    return {"unet_params": count_params(float_unet), "macs_per_unet_step": count_macs(float_unet, calibration)}


def size_card(bundle: Bundle, float_unet: UNet2DConditionModel, extra: dict | None = None) -> dict:
    """:func:`unet_cost` of ``float_unet`` and the bundle's weight bytes on disk."""
    return {**unet_cost(float_unet), **carried_card(bundle), **(extra or {})}


def carried_card(bundle: Bundle) -> dict:
    """The card entries that change when a bundle is copied forward: bytes on disk and the history."""
    return {
        "unet_bytes": folder_bytes(bundle.unet),
        "vae_bytes": folder_bytes(bundle.vae) if bundle.vae is not None else None,
        "history": [step["action"] for step in bundle.history],
    }


def measure_quality(
    reference: HybridPipeline,
    compressed: HybridPipeline,
    prompts: Sequence[str],
    switch_steps: Sequence[int],
    steps: int,
    heldout: HeldoutSet | None = None,
    seed: int = 0,
) -> dict:
    """PSNR and SSIM of the compressed edge's images against the uncompressed edge's (same prompts and seed)
    per switch step; with ``heldout`` (the shapes pair's held-out captions, as ``prompts``) adherence and
    Fréchet distance of both as well."""
    quality = {}
    for k in tqdm(switch_steps, desc="quality per switch step"):
        images = {}
        for name, pipeline in (("reference", reference), ("compressed", compressed)):
            images[name] = [
                pipeline(GenerationRequest(text, switch_step=k, num_inference_steps=steps, seed=seed)).image
                for text in prompts
            ]
        row = {
            "psnr_vs_uncompressed": float(np.mean([psnr(a, b) for a, b in zip(*images.values(), strict=True)])),
            "ssim_vs_uncompressed": float(np.mean([ssim(a, b) for a, b in zip(*images.values(), strict=True)])),
        }
        if heldout is not None:
            for name, generated in images.items():
                scores = heldout.score(generated)
                row[f"adherence_{name}"] = scores["adherence"]["overall"]
                row[f"frechet_distance_{name}"] = scores["frechet_distance"]
        quality[str(k)] = row
    return {"prompts": len(prompts), "steps": steps, "seed": seed, "by_switch_step": quality}
