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
    # Contrastive steps of the text encoder, with hard negatives, before the large UNet trains (0: none;
    # hybrid_sd.shapes_pair.text_pretraining). For a CLIP encoder.
    text_steps: int = 0
    text_lr: float = 5e-4
    large_steps: int = 4000
    large_lr: float = 5e-4
    small_steps: int = 2200
    small_lr: float = 1e-3
    tiny_steps: int = 1000
    tiny_lr: float = 2e-3
    ema_decay: float = 0.999
    warmup_steps: int = 100
    precision: str = "bf16"  # of the forward passes: bf16 autocast (1.1x float32 on this CPU) or fp32
    schedule: str = "stable-diffusion"  # the noise schedule (SCHEDULES)
    text_encoder: str = "clip"  # the text encoder's kind (TEXT_ENCODERS)
    # Train the large UNet alone, on the text encoder as initialised (as Stable Diffusion's UNet is trained on a
    # frozen CLIP): a jointly trained encoder learns to drop the relation words (docs/design.md).
    freeze_text_encoder: bool = False


PRECISIONS = ("bf16", "fp32")

# The text encoders train-shapes can train (``TrainConfig.text_encoder``), as the model card states them; both
# width 128, 3 layers, 4 heads. CLIP's is causal as in Stable Diffusion: the first shape's words cannot see the
# relation stated after them. T5's encoder is bidirectional: every token sees the whole caption.
TEXT_ENCODERS: dict[str, str] = {
    "clip": "CLIPTextModel (causal), width 128, 3 layers, 4 heads, 32 tokens",
    "t5": "T5EncoderModel (bidirectional, relative positions), width 128, 3 layers, 4 heads, 32 tokens",
}

# steps_offset as Stable Diffusion's pipelines require it (they rewrite any other); "trailing" spacing ignores it.
_SD_BETAS = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
)
# The noise schedules train-shapes can train on (``TrainConfig.schedule``). Stable Diffusion's keeps 0.0047 of the
# latents' signal at its last timestep: over a 16x16 latent enough for a model to read the layout out of the
# starting noise (the shipped pair, trained on it, draws one layout whatever the stated relation for 93% of seeds).
# Rescaled to zero terminal SNR (Lin et al., 2024, "Common Diffusion Noise Schedules and Sample Steps are
# Flawed") the last step holds no signal, so the model predicts v and sampling starts at that step ("trailing").
# Stable Diffusion's betas were set for 64x64 latents; a 16x16 latent averages less noise away, so on them its
# content is decided late (t < 450, past the 40% switch step of a 20-step sampler). The cosine schedule (Nichol &
# Dhariwal, 2021, made for 64x64 images) keeps more signal at every t: SNR 0.52 at t = 600 against 0.15.
# docs/design.md, "Training the shapes pair", has what each gave.
_ZERO_SNR_V = dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
SCHEDULES: dict[str, dict] = {
    "zero-terminal-snr": dict(_SD_BETAS, **_ZERO_SNR_V),
    "cosine-zero-terminal-snr": dict(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", steps_offset=1, **_ZERO_SNR_V
    ),
    "stable-diffusion": dict(_SD_BETAS, prediction_type="epsilon"),
}
