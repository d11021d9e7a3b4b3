"""A tiny autoencoder (TAESD architecture, diffusers' ``AutoencoderTiny``) distilled from a full VAE: the decoder
matches the VAE's images of the same latents, optionally the encoder its posterior means."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny

from compression.distill.unet import loss_summary
from hybrid_sd.shapes_pair.training_loop import batches, optimizer_with_schedule, run_steps

TAESD_WIDTH = 64  # diffusers' default AutoencoderTiny block width, that of TAESD
TAESD_BLOCKS = 3  # blocks per stage, but one in the encoder's first and the decoder's last stage


@dataclass(frozen=True)
class TinyVaeConfig:
    """Optimisation settings. ``latent_noise`` is the std of the Gaussian noise added to each batch of
    latents (variety beyond the given ones); ``encoder`` trains the encoder too."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 50
    seed: int = 0
    encoder: bool = False
    latent_noise: float = 0.1

    def __post_init__(self) -> None:
        for field, minimum in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.encoder, bool):
            raise ValueError(f"encoder must be a bool, got {self.encoder!r}")
        for field, positive in (("lr", True), ("latent_noise", False)):
            value = getattr(self, field)
            valid = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
            if not valid or value < 0 or (positive and value == 0):
                raise ValueError(
                    f"{field} must be a {'positive' if positive else 'non-negative'} number, got {value!r}"
                )


def default_tiny(vae: AutoencoderKL, width: int = TAESD_WIDTH) -> AutoencoderTiny:
    """TAESD's architecture for ``vae``'s latent channels and down-sampling (one stage per VAE stage), with
    ``width`` channels in every block."""
    stages = len(vae.config.block_out_channels)
    return AutoencoderTiny(
        encoder_block_out_channels=(width,) * stages,
        decoder_block_out_channels=(width,) * stages,
        num_encoder_blocks=(1,) + (TAESD_BLOCKS,) * (stages - 1),
        num_decoder_blocks=(TAESD_BLOCKS,) * (stages - 1) + (1,),
        latent_channels=vae.config.latent_channels,
    )


def decoder_input(vae: AutoencoderKL | AutoencoderTiny, latents: torch.Tensor) -> torch.Tensor:
    """What the engine (``Denoiser.decode``) passes to ``vae.decode`` for UNet-space latents."""
    config = vae.config
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        mean, std = (
            torch.tensor(values).view(1, -1, 1, 1).to(latents) for values in (config.latents_mean, config.latents_std)
        )
        return latents * std / config.scaling_factor + mean
    return latents / config.scaling_factor


def unet_latents(vae: AutoencoderKL | AutoencoderTiny, decoder_latents: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`decoder_input`: a VAE's latents in the UNet's space."""
    config = vae.config
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        mean, std = (
            torch.tensor(values).view(1, -1, 1, 1).to(decoder_latents)
            for values in (config.latents_mean, config.latents_std)
        )
        return (decoder_latents - mean) * config.scaling_factor / std
    return decoder_latents * config.scaling_factor


def distill_tiny_vae(
    vae: AutoencoderKL,
    latents: torch.Tensor,
    config: TinyVaeConfig,
    tiny: AutoencoderTiny | None = None,
) -> tuple[AutoencoderTiny, dict]:
    """Train ``tiny`` (default :func:`default_tiny`) in float32 on ``vae``'s device so that the engine's
    decode of UNet-space ``latents`` [N, C, h, w] with it matches that with ``vae`` (L1 + MSE on the
    images); with ``config.encoder`` its encoder also learns the VAE's posterior means of those images,
    in the tiny's latent space. Returns the tiny autoencoder in eval mode and the steps, seconds, first
    and final losses."""
    vae.eval()
    parameter = next(vae.parameters())
    tiny = (default_tiny(vae) if tiny is None else tiny).to(parameter.device, torch.float32)
    if tiny.config.latent_channels != latents.shape[1]:
        raise ValueError(
            f"the tiny autoencoder has {tiny.config.latent_channels} latent channels, latents {latents.shape[1]}"
        )
    generator = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        probe = latents[:1].to(parameter.device)
        expected = vae.decode(decoder_input(vae, probe).to(parameter)).sample.shape
        actual = tiny.decode(decoder_input(tiny, probe.float())).sample.shape
    if actual != expected:
        raise ValueError(
            f"the tiny autoencoder decodes {tuple(probe.shape)} latents to {tuple(actual)},"
            f" the VAE to {tuple(expected)}"
        )
    tiny.train()
    trained = tiny if config.encoder else tiny.decoder
    optimizer, schedule = optimizer_with_schedule(
        list(trained.parameters()), config.lr, config.steps, config.warmup_steps
    )
    rows = batches(len(latents), min(config.batch_size, len(latents)), config.steps, generator)
    history: dict[str, list[float]] = {"loss": [], "decoder": []} | ({"encoder": []} if config.encoder else {})

    def loss_fn(step: int) -> torch.Tensor:
        batch = latents[next(rows)].float().cpu()
        batch = (batch + config.latent_noise * torch.randn(batch.shape, generator=generator)).to(parameter.device)
        with torch.no_grad():
            image = vae.decode(decoder_input(vae, batch).to(parameter)).sample.float().clamp(-1, 1)
        decoded = tiny.decode(decoder_input(tiny, batch)).sample
        losses = {"decoder": F.l1_loss(decoded, image) + F.mse_loss(decoded, image)}
        if config.encoder:
            with torch.no_grad():
                mean = vae.encode(image.to(parameter)).latent_dist.mean.float()
            target = decoder_input(tiny, unet_latents(vae, mean))
            losses["encoder"] = F.mse_loss(tiny.encode(image).latents, target)
        losses["loss"] = sum(losses.values())
        for name, value in losses.items():
            history[name].append(value.item())
        return losses["loss"]

    try:
        stats = run_steps("distil tiny VAE", config.steps, loss_fn, optimizer, schedule)
    finally:
        tiny.eval()
    return tiny, {"steps": config.steps, "seconds": stats["seconds"], **loss_summary(history)}
