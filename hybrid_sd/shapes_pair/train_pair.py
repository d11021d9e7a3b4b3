"""Train the shapes pair from nothing, seeded, on the CPU or a GPU: VAE, then text encoder with the large UNet,
then the small UNet distilled from the large one, then the tiny autoencoder distilled from the VAE. Each stage
is resumable from its checkpoints (:mod:`hybrid_sd.shapes_pair.checkpoints`).

Writes ``cloud/`` (a StableDiffusionPipeline folder), ``edge-unet/`` (the small UNet alone: the edge shares
the cloud's text encoder), ``edge-vae/`` (the AutoencoderTiny) and ``training.json`` under ``--out``; a
cloud-only run stops after the large UNet and writes ``cloud/`` and ``training.json`` (its edge is made by
``hybrid-sd compress``). Weights are stored in float16 to keep the pair small; the engine loads them in the
dtype it is asked for.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.training_utils import EMAModel, compute_snr
from tqdm import tqdm

from hybrid_sd.shapes.dataset import caption
from hybrid_sd.shapes_pair import pair_models
from hybrid_sd.shapes_pair.checkpoints import Checkpoints
from hybrid_sd.shapes_pair.text_pretraining import pretrain_text_encoder
from hybrid_sd.shapes_pair.train_config import SCHEDULES, TrainConfig
from hybrid_sd.shapes_pair.training_data import caption_ids, dataset_scenes, render_scenes, to_unit
from hybrid_sd.shapes_pair.training_loop import batch_at, optimizer_with_schedule, run_steps, step_generator

DROP_CAPTION = 0.1  # captions replaced by "" in training, for classifier-free guidance
MIN_SNR_GAMMA = 5.0  # Min-SNR loss weighting (Hang et al., 2023): faster convergence at equal steps


@dataclass(frozen=True)
class Run:
    """Where a training run computes and keeps its checkpoints: what does not decide the weights beyond
    kernel rounding (``TrainConfig`` does)."""

    config: TrainConfig
    device: torch.device
    checkpoints: Checkpoints

    def autocast(self):
        """The forward passes in ``config.precision`` (bfloat16 autocast, or float32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.precision == "bf16")

    def stage(
        self,
        name: str,
        steps: int,
        loss_fn,
        trained: torch.nn.Module,
        lr: float,
        ema: bool,
        batch_size: int | None = None,
    ) -> dict:
        """Train ``trained``'s parameters on ``loss_fn`` (EMA weights kept where ``ema``), resumably; the stage's
        statistics with its batch size (``config.batch_size`` unless given) and the samples it saw."""
        parameters = [parameter for parameter in trained.parameters() if parameter.requires_grad]
        optimizer, schedule = optimizer_with_schedule(parameters, lr, steps, self.config.warmup_steps)
        average = EMAModel(parameters, decay=self.config.ema_decay, use_ema_warmup=True, power=2 / 3) if ema else None
        stats = run_steps(
            name, steps, loss_fn, optimizer, schedule, average, parameters, trained, self.checkpoints.stage(name)
        )
        batch_size = batch_size or self.config.batch_size
        return {**stats, "batch_size": batch_size, "samples": steps * batch_size}


def train_vae(run: Run, images: torch.Tensor) -> tuple[torch.nn.Module, dict]:
    """AutoencoderKL with an L1 reconstruction loss and a small KL term, first on crops, then whole images."""
    config = run.config
    torch.manual_seed(config.seed)
    vae = pair_models.build_vae().to(run.device).train()
    steps = config.vae_crop_steps + config.vae_full_steps
    crop = pair_models.IMAGE_SIZE // 2

    def loss_fn(step: int) -> torch.Tensor:
        generator = step_generator(config.seed, step)
        x = to_unit(images[batch_at(len(images), config.batch_size, step, config.seed)])
        if step < config.vae_crop_steps:
            top, left = torch.randint(0, pair_models.IMAGE_SIZE - crop + 1, (2,), generator=generator).tolist()
            x = x[:, :, top : top + crop, left : left + crop]
        x = x.to(run.device)
        with run.autocast():
            posterior = vae.encode(x).latent_dist
            eps = torch.randn(posterior.mean.shape, generator=generator).to(run.device)
            reconstruction = vae.decode(posterior.mean + posterior.std * eps).sample
        return (reconstruction.float() - x).abs().mean() + config.vae_kl_weight * posterior.kl().float().mean()

    stats = run.stage("vae", steps, loss_fn, vae, config.vae_lr, ema=False)
    return vae.eval(), stats


@torch.no_grad()
def encode_latents(
    vae: torch.nn.Module, images: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of every image (unscaled, float32, on the VAE's device)."""
    device = next(vae.parameters()).device
    means, stds = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="encode latents"):
        posterior = vae.encode(to_unit(images[start : start + batch_size]).to(device)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


class LatentBatches:
    """Noised latent batches with their token ids (a tenth of captions dropped) and what the UNet is to predict
    (the noise added, or v); step ``s``'s batch depends on ``seed`` and ``s`` alone."""

    def __init__(
        self,
        run: Run,
        means: torch.Tensor,
        stds: torch.Tensor,
        ids: torch.Tensor,
        empty_ids: torch.Tensor,
        scaling_factor: float,
        seed: int,
    ):
        self.run, self.seed = run, seed
        self.means, self.stds, self.scaling_factor = means, stds, scaling_factor
        self.ids, self.empty_ids = ids.to(run.device), empty_ids.to(run.device)
        self.noise_scheduler = DDPMScheduler(**SCHEDULES[run.config.schedule])

    def at(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps, token ids, prediction target) of step ``step``."""
        index = batch_at(len(self.means), self.run.config.batch_size, step, self.seed).to(self.means.device)
        g = step_generator(self.seed, step)
        device = self.run.device
        eps = torch.randn((len(index), *self.means.shape[1:]), generator=g).to(device)
        latents = (self.means[index] + self.stds[index] * eps) * self.scaling_factor
        noise = torch.randn(latents.shape, generator=g).to(device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(index),), generator=g)
        timesteps = timesteps.to(device)
        drop = (torch.rand(len(index), generator=g) < DROP_CAPTION).to(device)
        ids = torch.where(drop[:, None], self.empty_ids, self.ids[index])
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return noisy, timesteps, ids, self.noise_scheduler.get_velocity(latents, noise, timesteps)
        return noisy, timesteps, ids, noise

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma loss weights: the weight of the error in the predicted latents, SNR for epsilon and
        SNR + 1 for v, capped at gamma (+ 1). Capping SNR itself, as diffusers' examples do for v, would give
        the zero-SNR step, where only the caption says where things go, no weight at all."""
        snr = compute_snr(self.noise_scheduler, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return torch.clamp(snr + 1, max=MIN_SNR_GAMMA + 1) / (snr + 1)
        return torch.clamp(snr, max=MIN_SNR_GAMMA) / snr


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()


def train_large(run: Run, data: LatentBatches, text_encoder, unet) -> dict:
    """The text encoder (unless frozen) and the large UNet together, on the diffusion loss; EMA weights are
    kept."""
    frozen = run.config.freeze_text_encoder
    text_encoder.requires_grad_(not frozen)
    modules = torch.nn.ModuleList([text_encoder, unet]).train()

    def loss_fn(step: int) -> torch.Tensor:
        noisy, timesteps, ids, target = data.at(step)
        with run.autocast():
            with torch.set_grad_enabled(not frozen):
                context = text_encoder(ids)[0]
            prediction = unet(noisy, timesteps, context).sample
        return weighted_mse(prediction, target, data.weights(timesteps))

    stats = run.stage("large", run.config.large_steps, loss_fn, modules, run.config.large_lr, ema=True)
    modules.eval()
    return stats


def train_small(run: Run, data: LatentBatches, text_encoder, teacher, student) -> dict:
    """The small UNet from the large one's predictions (output distillation) plus the diffusion loss."""
    student.train()

    def loss_fn(step: int) -> torch.Tensor:
        noisy, timesteps, ids, target = data.at(step)
        with run.autocast():
            with torch.no_grad():
                context = text_encoder(ids)[0]
                teacher_prediction = teacher(noisy, timesteps, context).sample.float()
            prediction = student(noisy, timesteps, context).sample
        weights = data.weights(timesteps)
        return weighted_mse(prediction, teacher_prediction, weights) + weighted_mse(prediction, target, weights)

    stats = run.stage("small", run.config.small_steps, loss_fn, student, run.config.small_lr, ema=True)
    student.eval()
    return stats


def train_tiny(
    run: Run, vae, images: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, scaling_factor: float
) -> tuple[torch.nn.Module, dict]:
    """AutoencoderTiny: the decoder matches the VAE decoder's images and the real ones; the encoder the
    VAE's scaled posterior means."""
    config, seed = run.config, run.config.seed + 3
    torch.manual_seed(seed)
    tiny = pair_models.build_tiny_autoencoder().to(run.device).train()

    def loss_fn(step: int) -> torch.Tensor:
        index = batch_at(len(images), config.batch_size, step, seed)
        batch_means, batch_stds = means[index.to(means.device)], stds[index.to(stds.device)]
        eps = torch.randn(batch_means.shape, generator=step_generator(seed, step)).to(run.device)
        latents = batch_means + batch_stds * eps
        real = to_unit(images[index]).to(run.device)
        with run.autocast():
            with torch.no_grad():
                teacher_image = vae.decode(latents).sample.float().clamp(-1, 1)
            decoded = tiny.decode(latents * scaling_factor).sample.float()
            encoded = tiny.encode(real).latents.float()
        decoder_loss = (decoded - teacher_image).abs().mean() + (decoded - real).abs().mean()
        return decoder_loss + F.mse_loss(encoded, batch_means * scaling_factor)

    stats = run.stage("tiny", config.tiny_steps, loss_fn, tiny, config.tiny_lr, ema=False)
    return tiny.eval(), stats


def train(
    out: Path,
    config: TrainConfig,
    device: str = "cpu",
    checkpoints: Checkpoints | None = None,
    resume: bool = False,
    cloud_only: bool = False,
) -> dict:
    """Every stage (up to the large UNet's if ``cloud_only``), then the pair written under `out`; returns what
    ``training.json`` records. With ``checkpoints``, each stage checkpoints as it goes and ``resume`` continues
    a stopped run."""
    if config.text_steps and config.text_encoder != "clip":
        raise ValueError("--text-steps: contrastive pretraining is for the clip text encoder (--text-encoder clip)")
    checkpoints = checkpoints or Checkpoints()
    checkpoints.start(config, resume)
    run = Run(config, torch.device(device), checkpoints)
    torch.manual_seed(config.seed)
    started = time.monotonic()
    scenes = dataset_scenes(config.images, config.seed)
    images = render_scenes(scenes, desc="render shapes")
    stages = {"render": {"seconds": round(time.monotonic() - started, 1)}}

    vae, stages["vae"] = train_vae(run, images)
    means, stds = encode_latents(vae, images)
    # As Stable Diffusion: scale latents to unit variance (Rombach et al., 2022, section 4.3.2).
    eps = torch.randn(means.shape, generator=torch.Generator().manual_seed(config.seed)).to(run.device)
    scaling_factor = round(1.0 / float((means + stds * eps).std()), 5)
    vae.register_to_config(scaling_factor=scaling_factor)

    tokenizer = pair_models.build_tokenizer()
    ids, empty_ids = caption_ids(tokenizer, [caption(scene) for scene in scenes]), caption_ids(tokenizer, [""])
    torch.manual_seed(config.seed + 1)
    text_encoder = pair_models.build_text_encoder(config.text_encoder, len(tokenizer)).to(run.device)
    large = pair_models.build_large_unet().to(run.device)
    if config.text_steps:
        stages["text"] = pretrain_text_encoder(run, images, scenes, ids, tokenizer, text_encoder)
    data = LatentBatches(run, means, stds, ids, empty_ids, scaling_factor, config.seed + 1)
    stages["large"] = train_large(run, data, text_encoder, large)

    out.mkdir(parents=True, exist_ok=True)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=large,
        scheduler=pair_models.build_scheduler(config.schedule),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if not cloud_only:
        torch.manual_seed(config.seed + 2)
        small = pair_models.build_small_unet().to(run.device)
        data = LatentBatches(run, means, stds, ids, empty_ids, scaling_factor, config.seed + 2)
        text_encoder.requires_grad_(False)
        large.requires_grad_(False)
        stages["small"] = train_small(run, data, text_encoder, large, small)
        tiny, stages["tiny"] = train_tiny(run, vae, images, means, stds, scaling_factor)
        small.to("cpu", torch.float16).save_pretrained(out / "edge-unet")
        tiny.to("cpu", torch.float16).save_pretrained(out / "edge-vae")
    pipeline.to("cpu", torch.float16).save_pretrained(out / "cloud")
    record = {
        "config": asdict(config),
        "scaling_factor": scaling_factor,
        "stages": stages,
        "total_seconds": round(sum(stage["seconds"] for stage in stages.values()), 1),
        "device": _device_name(run.device),
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}
