"""One side of the split (cloud or edge): a diffusers pipeline's UNet, text encoders and VAE."""

from __future__ import annotations

import dataclasses
import logging
from functools import cached_property

import PIL.Image
import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from hybrid_sd import sampler_state
from hybrid_sd.conditioning import encode_conditioning, text_encoder_fingerprint
from hybrid_sd.denoise import Guidance, StepCallback, StepRun, Steps, run_alone
from hybrid_sd.edge_profile import EdgeProfile
from hybrid_sd.errors import IncompatibleModelsError
from hybrid_sd.latent_space import pipeline_latent_space
from hybrid_sd.limits import RequestLimits
from hybrid_sd.request import DEFAULT_GUIDANCE_SCALE, GenerationRequest
from hybrid_sd.schedulers import (
    make_scheduler,
    resolve_scheduler,
    scheduler_from_config,
    set_timesteps,
    uses_generator,
)
from hybrid_sd.state import HybridState

logger = logging.getLogger(__name__)


class Denoiser:
    """Begins runs, advances them over a range of steps, and decodes them, for one model.

    ``name`` is the model's path or hub ID, used in error messages. ``latent_space`` is the one the UNet
    was trained in, where the pipeline's own decoder cannot tell (an AutoencoderTiny in place of its VAE).
    ``default_guidance_scale`` and ``default_timestep_power`` are what a request that names none gets: its pair's.
    """

    def __init__(
        self,
        pipe: DiffusionPipeline,
        name: str,
        latent_space: str | None = None,
        default_guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        default_timestep_power: float | None = None,
    ):
        self.pipe = pipe
        self.name = name
        self.latent_space = latent_space or pipeline_latent_space(pipe)
        self.default_guidance_scale = default_guidance_scale
        self.default_timestep_power = default_timestep_power
        # Looked up once: diffusers walks every module for offload hooks on each access.
        self.device: torch.device = pipe._execution_device
        # What one request may cost; servers set it, in-process use has no limits.
        self.limits: RequestLimits | None = None

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.pipe.vae.config.scaling_factor)

    @property
    def default_size(self) -> int:
        return self.pipe.unet.config.sample_size * self.vae_scale_factor

    @cached_property
    def text_encoder_id(self) -> str:
        return text_encoder_fingerprint(self.pipe)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype this model denoises in: its prompt embeddings', as diffusers' ``encode_prompt``
        chooses it (the last text encoder's, else the UNet's)."""
        encoder = getattr(self.pipe, "text_encoder_2", None) or self.pipe.text_encoder
        return (encoder or self.pipe.unet).dtype

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """Validate ``request`` and fill in what it leaves to the model: switch step, seed, size, scheduler
        (this model's own class), guidance scale and timestep spacing (its pair's)."""
        request.check()
        resolve_scheduler(request.scheduler, type(self.pipe.scheduler).__name__)
        request = EdgeProfile.of(self).fill(request.with_defaults())  # the same defaults a handoff's edge fills
        self.check_size(request)
        if self.limits is not None:
            self.limits.check(request)  # bytes before the tokenizer reads the prompt; the size filled in
            for name in ("prompt", "negative_prompt"):
                self.limits.check_tokens(name, len(self.pipe.tokenizer.tokenize(getattr(request, name) or "")))
        self._check_schedule(request)
        return request

    def _check_schedule(self, request: GenerationRequest) -> None:
        """Refuse a step count the schedule cannot take (e.g. PLMS with as many steps as training
        timesteps indexes past the end), before any work is done."""
        scheduler = make_scheduler(request.scheduler, self.pipe.scheduler)
        set_timesteps(scheduler, request.num_inference_steps, request.timestep_power)
        train_steps = scheduler.config.num_train_timesteps
        if scheduler.timesteps.numel() and not 0 <= float(scheduler.timesteps.max()) < train_steps:
            raise ValueError(
                f"num_inference_steps {request.num_inference_steps} is too many for {type(scheduler).__name__}"
                f" on {train_steps} training timesteps"
            )
        timesteps = scheduler.timesteps
        repeated = (timesteps[1:] == timesteps[:-1]).nonzero()
        if hasattr(scheduler, "lambda_t") and repeated.numel():
            # DPM-Solver++, DEIS and UniPC step in log-SNR (lambda_t): a repeated timestep is a step of
            # length 0, and their multistep update divides by it (diffusers' linspace spacing does this at
            # as many steps as training timesteps). PLMS repeats one on purpose.
            raise ValueError(
                f"num_inference_steps {request.num_inference_steps} repeats timestep"
                f" {int(timesteps[repeated[0, 0]])} in {type(scheduler).__name__}'s schedule, a step of length"
                " zero that its solver divides by: choose fewer steps"
            )

    def check_size(self, request: GenerationRequest) -> None:
        for field in ("width", "height"):
            value = getattr(request, field)
            if value % self.vae_scale_factor:
                raise ValueError(
                    f"{field} must be a multiple of {self.vae_scale_factor} (the VAE factor of {self.name}),"
                    f" got {value}"
                )

    def begin(self, request: GenerationRequest) -> HybridState:
        """Encode the prompt, set the schedule and draw the initial noise: the state before step 0.

        ``request`` must be resolved (seed, size, scheduler and guidance scale set).
        """
        scheduler = make_scheduler(request.scheduler, self.pipe.scheduler)
        set_timesteps(scheduler, request.num_inference_steps, request.timestep_power, self.device)
        if isinstance(self.pipe, StableDiffusionXLPipeline) and hasattr(scheduler, "set_begin_index"):
            # StableDiffusionXLPipeline does this before its loop (StableDiffusionPipeline does not).
            scheduler.set_begin_index(0)
        conditioning = encode_conditioning(self.pipe, request, self.text_encoder_id, request.height, request.width)
        generator = torch.Generator("cpu").manual_seed(request.seed)
        shape = (
            1,
            self.pipe.unet.config.in_channels,
            request.height // self.vae_scale_factor,
            request.width // self.vae_scale_factor,
        )
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=conditioning.prompt_embeds.dtype)
        return HybridState(
            request=request,
            latent_space=self.latent_space,
            vae_scaling_factor=self.vae_scaling_factor,
            scheduler_config={**scheduler.config, "_class_name": type(scheduler).__name__},
            timesteps=scheduler.timesteps.cpu(),
            step_index=0,
            sampler_state=sampler_state.capture(scheduler, request.num_inference_steps, request.timestep_power),
            generator_state=generator.get_state() if uses_generator(scheduler) else None,
            latents=noise * scheduler.init_noise_sigma,
            conditioning=conditioning,
            model=self.name,
        )

    def denoise(self, state: HybridState, end: int, callback: StepCallback | None = None) -> HybridState:
        """Run loop iterations ``[state.step_index, end)`` with this model alone; return the new state."""
        return run_alone(self.denoise_steps(state, end, callback))

    def denoise_steps(self, state: HybridState, end: int, callback: StepCallback | None = None) -> Steps[HybridState]:
        """Loop iterations ``[state.step_index, end)`` as a :class:`~hybrid_sd.denoise.StepRun` for a
        driver to step, alone or batched; returns the new state."""
        self.check_handoff(state)
        if not state.step_index <= end <= state.loop_length:
            raise ValueError(f"end must be in [{state.step_index}, {state.loop_length}], got {end}")
        state = state.to_dtype(self.dtype)
        if state.step_index == end:  # nothing to run (k = N): no scheduler, no prompt embeddings
            return state
        request = state.request
        scheduler = scheduler_from_config(state.scheduler_config)
        set_timesteps(scheduler, request.num_inference_steps, request.timestep_power, self.device)
        if not torch.equal(scheduler.timesteps.cpu(), state.timesteps):
            raise ValueError(
                f"{self.name} computes other timesteps for {type(scheduler).__name__} than the handoff"
                " carries (different diffusers versions?)"
            )
        sampler_state.restore(scheduler, state.sampler_state, self.device)
        generator = torch.Generator("cpu")
        if state.generator_state is not None:
            generator.set_state(state.generator_state)
        conditioning = self.conditioned(state).conditioning.to(self.device)
        guidance = self._guidance(request, state.latents.dtype)
        latents = state.latents.to(self.device)
        run = StepRun(
            self.pipe.unet,
            scheduler,
            latents,
            conditioning,
            guidance,
            generator,
            state.step_index,
            end,
            callback,
            alone=request.exact,
        )
        yield run
        return dataclasses.replace(
            state,
            step_index=end,
            sampler_state=sampler_state.capture(scheduler, request.num_inference_steps, request.timestep_power),
            generator_state=generator.get_state() if uses_generator(scheduler) else None,
            latents=run.latents,
            conditioning=conditioning,
            model=self.name,
        )

    def check_handoff(self, state: HybridState) -> None:
        """Refuse a state this model cannot continue: another latent space (naming both models), or
        latents whose shape does not fit the request."""
        if state.latent_space != self.latent_space:
            raise IncompatibleModelsError(
                f"handoff from {state.model or 'an unnamed model'!r} is in the {state.latent_space!r} latent space"
                f" but {self.name!r} denoises in {self.latent_space!r}"
            )
        request = state.request
        self.check_size(request)
        if self.limits is not None:
            self.limits.check(request)
        expected = (
            1,
            self.pipe.unet.config.in_channels,
            request.height // self.vae_scale_factor,
            request.width // self.vae_scale_factor,
        )
        if tuple(state.latents.shape) != expected:
            raise ValueError(
                f"handoff latents have shape {tuple(state.latents.shape)}, expected {expected} for"
                f" {request.width}x{request.height}"
            )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to an image tensor in [-1, 1], as the end of ``StableDiffusionXLPipeline.__call__``
        (which for a VAE without ``latents_mean`` is also ``StableDiffusionPipeline``'s)."""
        vae = self.pipe.vae
        config = vae.config
        latents = latents.to(device=vae.device, dtype=vae.dtype)
        if config.get("latents_mean") is not None and config.get("latents_std") is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        return vae.decode(latents, return_dict=False)[0]

    def to_image(self, latents: torch.Tensor) -> PIL.Image.Image:
        """Decode and post-process as the pipelines do for ``output_type="pil"``."""
        return VaeImageProcessor().postprocess(self.decode(latents), output_type="pil")[0]

    def conditioned(self, state: HybridState) -> HybridState:
        """``state`` with prompt embeddings this model can use: the handoff's where they come from the
        same text encoders, else its own (other text encoders, or a lean handoff that left them out).
        A state with no steps left needs none."""
        carried = state.conditioning
        if state.step_index == state.loop_length or (
            carried.has_embeddings and carried.text_encoder_id == self.text_encoder_id
        ):
            return state
        if carried.has_embeddings:
            logger.info("%s has its own text encoders: encoding the prompt again", self.name)
        request = state.request
        conditioning = encode_conditioning(self.pipe, request, self.text_encoder_id, request.height, request.width)
        return dataclasses.replace(state, conditioning=conditioning)

    def _guidance(self, request: GenerationRequest, dtype: torch.dtype) -> Guidance:
        embedding_dim = self.pipe.unet.config.time_cond_proj_dim
        if embedding_dim is None:
            return Guidance(request.guidance_scale, request.guidance_rescale)
        scale = torch.tensor(request.guidance_scale - 1).repeat(1)
        embedding = self.pipe.get_guidance_scale_embedding(scale, embedding_dim=embedding_dim)
        return Guidance(request.guidance_scale, request.guidance_rescale, embedding.to(self.device, dtype))
