"""A tiny SD 1.x pipeline conditioned by a text encoder as wide as SD 1.x's (CLIP ViT-L/14's text
tower: 768 wide), so that its handoffs carry prompt embeddings of the real size (77 x 768) while its
UNet and VAE stay cheap enough for a CPU: what the lean handoff leaves out, at full size."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from hybrid_sd.tiny_models import build_tiny_pipeline

TEXT_WIDTH = 768  # CLIP ViT-L/14's text tower, SD 1.x's text encoder
CLIP_L_LAYERS = 12


def save_wide_text_pipeline(folder: Path, text_layers: int = CLIP_L_LAYERS, seed: int = 0) -> Path:
    """The tiny SD 1.x edge pipeline with a CLIP ViT-L/14-shaped text encoder of ``text_layers``
    layers (12: its real depth and cost) and a UNet attending to 768-wide embeddings."""
    pipe = build_tiny_pipeline("sd1", "small", seed)
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_attention_heads=12,
        num_hidden_layers=text_layers,
        vocab_size=len(pipe.tokenizer),
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    pipe.text_encoder = CLIPTextModel(text_config).eval()
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "cross_attention_dim": TEXT_WIDTH}).eval()
    pipe.save_pretrained(folder)
    return Path(folder)
