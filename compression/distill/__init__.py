"""Distillation: a pruned UNet from its teacher (BK-SDM output and feature losses), a tiny VAE from a full one."""

from compression.distill.teacher_data import TeacherTrajectories, collect_trajectories
from compression.distill.tiny_vae import TinyVaeConfig, decoder_input, default_tiny, distill_tiny_vae
from compression.distill.unet import (
    DistillConfig,
    block_outputs,
    distill_unet,
    distillation_losses,
    feature_blocks,
    matching_blocks,
)

__all__ = [
    "DistillConfig",
    "TeacherTrajectories",
    "TinyVaeConfig",
    "block_outputs",
    "collect_trajectories",
    "decoder_input",
    "default_tiny",
    "distill_tiny_vae",
    "distill_unet",
    "distillation_losses",
    "feature_blocks",
    "matching_blocks",
]
