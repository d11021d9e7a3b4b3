"""Train the shapes pair from nothing, seeded, on the CPU: VAE, then text encoder with the large UNet, then the
small UNet distilled from the large one, then the tiny autoencoder distilled from the VAE.

Writes ``cloud/`` (a StableDiffusionPipeline folder), ``edge-unet/`` (the small UNet alone: the edge shares
the cloud's text encoder), ``edge-vae/`` (the AutoencoderTiny) and ``training.json`` under ``--out``.
Weights are stored in float16 to keep the pair small; the engine loads them in the dtype it is asked for.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.training_utils import EMAModel, compute_snr
from tqdm import tqdm

from hybrid_sd.shapes.dataset import ShapesDataset
from hybrid_sd.shapes_pair import pair_models
from hybrid_sd.shapes_pair.train_config import TrainConfig

DROP_CAPTION = 0.1  # captions replaced by "" in training, for classifier-free guidance
MIN_SNR_GAMMA = 5.0  # Min-SNR loss weighting (Hang et al., 2023): faster convergence at equal steps


def render_dataset(config: TrainConfig) -> tuple[torch.Tensor, list[str]]:
    """The training images as uint8 [N, 3, 64, 64] and their captions."""
    dataset = ShapesDataset(config.images, seed=config.seed)
    images, captions = [], []
    for index in tqdm(range(len(dataset)), desc="render shapes"):
        image, text = dataset[index]
        images.append(np.asarray(image))
        captions.append(text)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def batches(count: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """`steps` batches of random indices into `count` items, each epoch a fresh permutation."""
    order = torch.randperm(count, generator=generator)
    position = 0
    for _ in range(steps):
        if position + batch_size > count:
            order, position = torch.randperm(count, generator=generator), 0
        yield order[position : position + batch_size]
        position += batch_size


def optimizer_with_schedule(
    parameters: list[torch.nn.Parameter], lr: float, steps: int, warmup: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with linear warm-up and cosine decay to a tenth of `lr`."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run_steps(
    name: str,
    steps: int,
    loss_fn: Callable[[int], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    ema: EMAModel | None = None,
    parameters: list[torch.nn.Parameter] | None = None,
) -> dict:
    """The optimisation loop shared by every stage; returns the stage's time and its last losses."""
    started = time.monotonic()
    recent: list[float] = []
    progress = tqdm(range(steps), desc=name)
    for step in progress:
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if ema is not None:
            ema.step(parameters)
        recent = (recent + [loss.item()])[-100:]
        if step % 25 == 0:
            progress.set_postfix(loss=f"{np.mean(recent):.4f}")
    return {"steps": steps, "seconds": round(time.monotonic() - started, 1), "final_loss": float(np.mean(recent))}


def train_vae(config: TrainConfig, images: torch.Tensor) -> tuple[torch.nn.Module, dict]:
    """AutoencoderKL with an L1 reconstruction loss and a small KL term, first on crops, then whole images."""
    torch.manual_seed(config.seed)
    vae = pair_models.build_vae().train()
    generator = torch.Generator().manual_seed(config.seed)
    steps = config.vae_crop_steps + config.vae_full_steps
    indices = batches(len(images), config.batch_size, steps, generator)
    optimizer, schedule = optimizer_with_schedule(list(vae.parameters()), config.vae_lr, steps, config.warmup_steps)
    crop = pair_models.IMAGE_SIZE // 2

    def loss_fn(step: int) -> torch.Tensor:
        x = to_unit(images[next(indices)])
        if step < config.vae_crop_steps:
            top, left = torch.randint(0, pair_models.IMAGE_SIZE - crop + 1, (2,), generator=generator).tolist()
            x = x[:, :, top : top + crop, left : left + crop]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        return (reconstruction - x).abs().mean() + config.vae_kl_weight * posterior.kl().mean()

    stats = run_steps("train VAE", steps, loss_fn, optimizer, schedule)
    return vae.eval(), stats


@torch.no_grad()
def encode_latents(
    vae: torch.nn.Module, images: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of every image (unscaled)."""
    means, stds = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="encode latents"):
        posterior = vae.encode(to_unit(images[start : start + batch_size])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def caption_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids as the pipelines make them: padded to the tokenizer's maximum length."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


class LatentBatches:
    """Noised latent batches with their token ids (a tenth of captions dropped) and the noise added."""

    def __init__(
        self,
        config: TrainConfig,
        means: torch.Tensor,
        stds: torch.Tensor,
        ids: torch.Tensor,
        empty_ids: torch.Tensor,
        scaling_factor: float,
        steps: int,
        seed: int,
    ):
        self.generator = torch.Generator().manual_seed(seed)
        self.indices = batches(len(means), config.batch_size, steps, self.generator)
        self.means, self.stds, self.ids, self.empty_ids = means, stds, ids, empty_ids
        self.scaling_factor = scaling_factor
        self.noise_scheduler = DDPMScheduler(**pair_models.SCHEDULE)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps, token ids, noise)."""
        index = next(self.indices)
        g = self.generator
        eps = torch.randn(self.means[index].shape, generator=g)
        latents = (self.means[index] + self.stds[index] * eps) * self.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(index),), generator=g)
        drop = torch.rand(len(index), generator=g) < DROP_CAPTION
        ids = torch.where(drop[:, None], self.empty_ids, self.ids[index])
        return self.noise_scheduler.add_noise(latents, noise, timesteps), timesteps, ids, noise

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weights for epsilon prediction."""
        snr = compute_snr(self.noise_scheduler, timesteps)
        return torch.clamp(snr, max=MIN_SNR_GAMMA) / snr


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()


def train_large(config: TrainConfig, data: LatentBatches, text_encoder, unet) -> dict:
    """The text encoder and the large UNet together, on the epsilon loss; EMA weights are kept."""
    modules = torch.nn.ModuleList([text_encoder, unet]).train()
    parameters = list(modules.parameters())
    optimizer, schedule = optimizer_with_schedule(parameters, config.large_lr, config.large_steps, config.warmup_steps)
    ema = EMAModel(parameters, decay=config.ema_decay, use_ema_warmup=True, power=2 / 3)

    def loss_fn(step: int) -> torch.Tensor:
        noisy, timesteps, ids, noise = data.next()
        prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        return weighted_mse(prediction, noise, data.weights(timesteps))

    stats = run_steps(
        "train text encoder + large UNet", config.large_steps, loss_fn, optimizer, schedule, ema, parameters
    )
    ema.copy_to(parameters)
    modules.eval()
    return stats


def train_small(config: TrainConfig, data: LatentBatches, text_encoder, teacher, student) -> dict:
    """The small UNet from the large one's predictions (output distillation) plus the epsilon loss."""
    student.train()
    parameters = list(student.parameters())
    optimizer, schedule = optimizer_with_schedule(parameters, config.small_lr, config.small_steps, config.warmup_steps)
    ema = EMAModel(parameters, decay=config.ema_decay, use_ema_warmup=True, power=2 / 3)

    def loss_fn(step: int) -> torch.Tensor:
        noisy, timesteps, ids, noise = data.next()
        with torch.no_grad():
            context = text_encoder(ids)[0]
            target = teacher(noisy, timesteps, context).sample
        prediction = student(noisy, timesteps, context).sample
        weights = data.weights(timesteps)
        return weighted_mse(prediction, target, weights) + weighted_mse(prediction, noise, weights)

    stats = run_steps("distil small UNet", config.small_steps, loss_fn, optimizer, schedule, ema, parameters)
    ema.copy_to(parameters)
    student.eval()
    return stats


def train_tiny(
    config: TrainConfig, vae, images: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, scaling_factor: float
) -> tuple[torch.nn.Module, dict]:
    """AutoencoderTiny: the decoder matches the VAE decoder's images and the real ones; the encoder the
    VAE's scaled posterior means."""
    torch.manual_seed(config.seed + 3)
    tiny = pair_models.build_tiny_autoencoder().train()
    generator = torch.Generator().manual_seed(config.seed + 3)
    indices = batches(len(images), config.batch_size, config.tiny_steps, generator)
    optimizer, schedule = optimizer_with_schedule(
        list(tiny.parameters()), config.tiny_lr, config.tiny_steps, config.warmup_steps
    )

    def loss_fn(step: int) -> torch.Tensor:
        index = next(indices)
        latents = means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)
        with torch.no_grad():
            teacher_image = vae.decode(latents).sample.clamp(-1, 1)
        decoded = tiny.decode(latents * scaling_factor).sample
        real = to_unit(images[index])
        decoder_loss = (decoded - teacher_image).abs().mean() + (decoded - real).abs().mean()
        encoder_loss = F.mse_loss(tiny.encode(real).latents, means[index] * scaling_factor)
        return decoder_loss + encoder_loss

    stats = run_steps("distil tiny autoencoder", config.tiny_steps, loss_fn, optimizer, schedule)
    return tiny.eval(), stats


def train(out: Path, config: TrainConfig) -> dict:
    """Every stage, then the pair written under `out`; returns what ``training.json`` records."""
    torch.manual_seed(config.seed)
    started = time.monotonic()
    images, captions = render_dataset(config)
    stages = {"render": {"seconds": round(time.monotonic() - started, 1)}}

    vae, stages["vae"] = train_vae(config, images)
    means, stds = encode_latents(vae, images)
    # As Stable Diffusion: scale latents to unit variance (Rombach et al., 2022, section 4.3.2).
    scaling_factor = round(1.0 / float((means + stds * torch.randn_like(means)).std()), 5)
    vae.register_to_config(scaling_factor=scaling_factor)

    tokenizer = pair_models.build_tokenizer()
    ids, empty_ids = caption_ids(tokenizer, captions), caption_ids(tokenizer, [""])
    torch.manual_seed(config.seed + 1)
    text_encoder = pair_models.build_text_encoder(len(tokenizer))
    large = pair_models.build_large_unet()
    data = LatentBatches(config, means, stds, ids, empty_ids, scaling_factor, config.large_steps, config.seed + 1)
    stages["large"] = train_large(config, data, text_encoder, large)

    torch.manual_seed(config.seed + 2)
    small = pair_models.build_small_unet()
    data = LatentBatches(config, means, stds, ids, empty_ids, scaling_factor, config.small_steps, config.seed + 2)
    text_encoder.requires_grad_(False)
    large.requires_grad_(False)
    stages["small"] = train_small(config, data, text_encoder, large, small)

    tiny, stages["tiny"] = train_tiny(config, vae, images, means, stds, scaling_factor)

    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=large,
        scheduler=pair_models.build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    pipeline.to(torch.float16).save_pretrained(out / "cloud")
    small.to(torch.float16).save_pretrained(out / "edge-unet")
    tiny.to(torch.float16).save_pretrained(out / "edge-vae")
    record = {
        "config": asdict(config),
        "scaling_factor": scaling_factor,
        "stages": stages,
        "total_seconds": round(time.monotonic() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}
