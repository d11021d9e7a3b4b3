"""Random-initialised SD 1.x- and SDXL-architecture pipelines, saved as diffusers folders.

They go through exactly the loading code a real checkpoint does, so tests and the CPU default
exercise the real path. Shapes follow diffusers' own pipeline tests (``get_dummy_components``),
except that the VAE keeps the real 8x down-sampling factor and the tokenizer is built from a local
byte-level vocabulary, since nothing can be fetched from a hub here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

FAMILIES = ("sd1", "sdxl")
SIZES = ("large", "small")
TEXT_HIDDEN_SIZE = 32
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# The real SD 1.x / SDXL VAE scaling factors, so latent-space checks see what they see on real models.
VAE_SCALING_FACTOR = {"sd1": 0.18215, "sdxl": 0.13025}


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single bytes: every text tokenizes, with no merges file to ship."""
    vocab = {BOS: 0, EOS: 1}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        for token in (char, char + "</w>"):
            vocab.setdefault(token, len(vocab))
    # model_max_length must be set: the default (a huge int) overflows the fast tokenizer.
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _text_config(vocab_size: int, projection_dim: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=projection_dim or TEXT_HIDDEN_SIZE,
    )


def _unet(family: str, size: str) -> UNet2DConditionModel:
    wide = size == "large"
    common = dict(
        block_out_channels=(32, 64) if wide else (32, 32),
        layers_per_block=2 if wide else 1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    if family == "sd1":
        return UNet2DConditionModel(**common, cross_attention_dim=TEXT_HIDDEN_SIZE, norm_num_groups=8)
    return UNet2DConditionModel(
        **common,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2) if wide else (1, 1),
        # six time ids of 8 dims each, plus text_encoder_2's pooled projection.
        projection_class_embeddings_input_dim=6 * 8 + TEXT_HIDDEN_SIZE,
        cross_attention_dim=2 * TEXT_HIDDEN_SIZE,
        norm_num_groups=1,
    )


def _vae(family: str) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=VAE_SCALING_FACTOR[family],
    )


def build_tiny_decoder(seed: int = 0) -> AutoencoderTiny:
    """An AutoencoderTiny (TAESD architecture) with narrow blocks, 8x like the real one."""
    torch.manual_seed(seed)
    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    )


def build_tiny_pipeline(
    family: str, size: str = "large", seed: int = 0
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A random pipeline; text encoders and VAE depend only on ``seed``, so sizes share them."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(len(tokenizer))).eval()
    torch.manual_seed(seed + 1)
    vae = _vae(family).eval()
    torch.manual_seed(seed + (2 if size == "large" else 3))
    unet = _unet(family, size).eval()
    scheduler_config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if family == "sd1":
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=PNDMScheduler(**scheduler_config, skip_prk_steps=True, set_alpha_to_one=False),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    torch.manual_seed(seed + 4)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(len(tokenizer))).eval()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**scheduler_config, timestep_spacing="leading"),
    )


def save_tiny_pair(family: str, root: Path, seed: int = 0) -> dict[str, Path]:
    """Write ``cloud/``, ``edge/`` (diffusers pipeline folders) and ``edge-vae/`` under ``root``."""
    root = Path(root)
    paths = {"cloud": root / "cloud", "edge": root / "edge", "edge_vae": root / "edge-vae"}
    build_tiny_pipeline(family, "large", seed).save_pretrained(paths["cloud"])
    build_tiny_pipeline(family, "small", seed).save_pretrained(paths["edge"])
    build_tiny_decoder(seed).save_pretrained(paths["edge_vae"])
    return paths
