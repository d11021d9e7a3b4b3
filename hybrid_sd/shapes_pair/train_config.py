"""The settings of ``hybrid-sd train-shapes`` (data only: the command line reads its fields without loading
torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (with the library versions)."""

    seed: int = 0
    images: int = 40_000
    batch_size: int = 32
    vae_crop_steps: int = 1500  # on 32x32 crops: the VAE is convolutional, a quarter of the cost
    vae_full_steps: int = 200
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    large_steps: int = 4000
    large_lr: float = 5e-4
    small_steps: int = 2200
    small_lr: float = 1e-3
    tiny_steps: int = 1000
    tiny_lr: float = 2e-3
    ema_decay: float = 0.999
    warmup_steps: int = 100
    precision: str = "bf16"  # of the forward passes: bf16 autocast (1.1x float32 on this CPU) or fp32
    schedule: str = "stable-diffusion"  # the noise schedule (pair_models.SCHEDULES)


PRECISIONS = ("bf16", "fp32")
SCHEDULE_NAMES = ("stable-diffusion", "zero-terminal-snr")  # pair_models.SCHEDULES' keys, without importing torch
