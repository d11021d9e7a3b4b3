"""Architectures of the shapes pair: a word-level CLIP tokenizer over the captions' vocabulary, a CLIP text
encoder, an AutoencoderKL (64x64 RGB to 4x16x16), a large and a small UNet over its latents, and an
AutoencoderTiny (TAESD architecture) for the edge. All are stock diffusers / transformers classes."""

from __future__ import annotations

from diffusers import AutoencoderKL, AutoencoderTiny, DPMSolverMultistepScheduler, UNet2DConditionModel
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

from hybrid_sd.shapes.dataset import vocabulary
from hybrid_sd.shapes_pair.train_config import SCHEDULES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 32  # the longest caption (three shapes) is 20 tokens with BOS and EOS
TEXT_WIDTH = 128
LATENT_CHANNELS = 4
LATENT_SIZE = 16  # 64x64 images, a 4x down-sampling VAE
IMAGE_SIZE = 64
# The guidance a request that names none gets. Stable Diffusion's 7.5 over-saturated the first shipped pair's
# colours (colour 0.72 at 7.5, 0.94 at 5, 64 held-out captions); the shipped large model alone scores about
# the same from 2 to 10 and its lowest FD at 5 (benchmarks/shapes_guidance.py).
GUIDANCE_SCALE = 5.0


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer in which every caption word is one token; any other text falls back to bytes."""
    vocab = {BOS: 0, EOS: 1}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        for token in (char, char + "</w>"):
            vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    words = [word for word in vocabulary() if len(word) > 1]
    # Chain merges left to right; a word that an earlier word's merges split otherwise gets merges for the
    # pieces it does end up in, until every word is a single token.
    while True:
        tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MAX_TOKENS)
        split = [(word, tokenizer.tokenize(word)) for word in words]
        split = [(word, pieces) for word, pieces in split if len(pieces) > 1]
        if not split:
            return tokenizer
        for _, pieces in split:
            merged = pieces[0]
            for piece in pieces[1:]:
                if (merged, piece) not in merges:
                    merges.append((merged, piece))
                merged += piece
                vocab.setdefault(merged, len(vocab))


def build_text_encoder(kind: str, vocab_size: int) -> CLIPTextModel | T5EncoderModel:
    """The shared text encoder of ``kind`` (train_config.TEXT_ENCODERS): CLIP's or T5's."""
    if kind == "t5":
        return T5EncoderModel(
            T5Config(
                vocab_size=vocab_size,
                d_model=TEXT_WIDTH,
                d_kv=TEXT_WIDTH // 4,
                d_ff=4 * TEXT_WIDTH,
                num_layers=3,
                num_heads=4,
                dropout_rate=0.0,  # as CLIP's: a run stays a function of its seed and step
                pad_token_id=1,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        )
    return CLIPTextModel(
        CLIPTextConfig(
            hidden_size=TEXT_WIDTH,
            intermediate_size=4 * TEXT_WIDTH,
            num_attention_heads=4,
            num_hidden_layers=3,
            vocab_size=vocab_size,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            projection_dim=TEXT_WIDTH,
        )
    )


def build_vae() -> AutoencoderKL:
    """64x64 RGB to 4x16x16; ``scaling_factor`` is set after training from the latents' spread."""
    return AutoencoderKL(
        block_out_channels=(16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def _unet(channels: tuple[int, ...], attention: tuple[bool, ...], heads: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=heads,  # diffusers' historical name: the number of heads
        norm_num_groups=16,
    )


def build_large_unet() -> UNet2DConditionModel:
    """7.0M parameters, 0.79 GFLOPs a step at batch 1; attention at every resolution."""
    return _unet((64, 128, 128), (True, True, True), heads=4)


def build_small_unet() -> UNet2DConditionModel:
    """1.5M parameters, 0.13 GFLOPs a step (6x fewer); no attention at the full 16x16 latent resolution."""
    return _unet((32, 48, 64), (False, True, True), heads=2)


def build_tiny_autoencoder() -> AutoencoderTiny:
    """TAESD architecture, 4x instead of 8x: decodes the diffusion-space (scaled) latents directly."""
    return AutoencoderTiny(
        encoder_block_out_channels=(16, 16, 16),
        decoder_block_out_channels=(16, 16, 16),
        num_encoder_blocks=(1, 1, 1),
        num_decoder_blocks=(3, 2, 1),
        latent_channels=LATENT_CHANNELS,
    )


def build_scheduler(schedule: str) -> DPMSolverMultistepScheduler:
    """The pair's default sampler: DPM-Solver++(2M) over the schedule it was trained on."""
    return DPMSolverMultistepScheduler(**SCHEDULES[schedule])
