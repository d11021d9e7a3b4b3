"""A small batch of UNet inputs on which pruning measures how far the output moves."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel

# SDXL's six micro-conditioning time ids: original size, crop offset, target size.
SDXL_TIME_IDS = 6


@dataclass
class Calibration:
    """UNet inputs: latents, timesteps, text embeddings and (SDXL) added conditions, one per row."""

    sample: torch.Tensor
    timestep: torch.Tensor
    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    @classmethod
    def random(
        cls,
        unet: UNet2DConditionModel,
        batch_size: int = 4,
        sequence_length: int = 8,
        sample_size: int | None = None,
        seed: int = 0,
    ) -> Calibration:
        """Gaussian latents and embeddings, timesteps spread evenly over the training schedule."""
        config = unet.config
        if not isinstance(config.cross_attention_dim, int):
            raise ValueError(f"Calibration.random needs one cross_attention_dim, got {config.cross_attention_dim!r}")
        size = sample_size or config.sample_size
        generator = torch.Generator().manual_seed(seed)
        added = None
        if config.addition_embed_type == "text_time":
            pooled = config.projection_class_embeddings_input_dim - SDXL_TIME_IDS * config.addition_time_embed_dim
            added = {
                "text_embeds": torch.randn(batch_size, pooled, generator=generator),
                "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * batch_size).float(),
            }
        return cls(
            sample=torch.randn(batch_size, config.in_channels, size, size, generator=generator),
            timestep=torch.linspace(0, 999, batch_size).round().long(),
            encoder_hidden_states=torch.randn(
                batch_size, sequence_length, config.cross_attention_dim, generator=generator
            ),
            added_cond_kwargs=added,
        )

    def __len__(self) -> int:
        return self.sample.shape[0]

    def first(self) -> Calibration:
        """The first row alone: MACs are counted per UNet evaluation of one latent."""
        added = None if self.added_cond_kwargs is None else {k: v[:1] for k, v in self.added_cond_kwargs.items()}
        return Calibration(self.sample[:1], self.timestep[:1], self.encoder_hidden_states[:1], added)

    @torch.no_grad()
    def run(self, unet: UNet2DConditionModel) -> torch.Tensor:
        """The UNet's prediction for every row, on the UNet's device and dtype."""
        parameter = next(unet.parameters())
        added = self.added_cond_kwargs
        if added is not None:
            added = {key: value.to(parameter) for key, value in added.items()}
        return unet(
            self.sample.to(parameter),
            self.timestep.to(parameter.device),
            self.encoder_hidden_states.to(parameter),
            added_cond_kwargs=added,
        ).sample
