"""The reference every split is checked against: diffusers' own pipeline, with the UNet (and, where
the edge has its own text encoders, the prompt embeddings) swapped at the switch step by a
``callback_on_step_end``, i.e. one uninterrupted loop with the model switched at k."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from hybrid_sd.request import GenerationRequest
from hybrid_sd.schedulers import make_scheduler, power_timesteps


def pipeline_kwargs(request: GenerationRequest) -> dict:
    """diffusers ``__call__`` arguments for a resolved request (a CPU generator, as the engine uses; a
    ``timestep_power`` as diffusers' own ``timesteps`` argument)."""
    spacing = {}
    if request.timestep_power is not None:
        spacing = dict(timesteps=power_timesteps(request.num_inference_steps, request.timestep_power))
    return dict(
        **spacing,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        guidance_rescale=request.guidance_rescale,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        height=request.height,
        width=request.width,
    )


def reference_run(
    pipe: DiffusionPipeline,
    request: GenerationRequest,
    cloud_unet: UNet2DConditionModel,
    edge_unet: UNet2DConditionModel,
    switch: int,
    edge_embeds: dict[str, torch.Tensor] | None = None,
    output_type: str = "latent",
):
    """Run ``request`` through diffusers with ``cloud_unet`` for loop iterations ``[0, switch)``
    and ``edge_unet`` after; ``edge_embeds`` replace the callback tensors from the switch on."""
    scheduler = make_scheduler(request.scheduler, pipe.scheduler)
    pipe = type(pipe).from_pipe(pipe, unet=cloud_unet if switch > 0 else edge_unet)
    # Assigned as diffusers' docs do: passed to the constructor instead, StableDiffusionPipeline
    # would rewrite a DDIM config (clip_sample=False) and so run another sampler.
    pipe.scheduler = scheduler

    def swap_models(pipe, i, t, tensors):
        if i + 1 == switch:
            pipe.unet = edge_unet
            return dict(edge_embeds or {})
        return {}

    return pipe(
        **pipeline_kwargs(request),
        output_type=output_type,
        callback_on_step_end=swap_models,
        callback_on_step_end_tensor_inputs=["latents", *(edge_embeds or {})],
    ).images
