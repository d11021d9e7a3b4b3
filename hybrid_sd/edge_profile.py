"""The lean handoff: what the cloud sends an edge, given what that edge computes with.

An edge whose text encoders have the cloud's fingerprint would use the carried prompt embeddings
as they are, so it can as well compute them itself: the handoff leaves them out (for SD 1.x at
512x512 in fp16, 237 KB of 342 KB). Latents and sampler history travel in the edge's dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hybrid_sd.request import GenerationRequest
from hybrid_sd.schedulers import resolve_scheduler, takes_custom_timesteps
from hybrid_sd.state import HybridState

if TYPE_CHECKING:
    from hybrid_sd.denoiser import Denoiser


@dataclass(frozen=True)
class EdgeProfile:
    """The receiving edge: its text encoders' fingerprint, the dtype it denoises in, and the size,
    scheduler, guidance scale and timestep spacing a request that names none gets (the edge model's own and
    its pair's: it is the one model every path runs, so in-process, served, edge-initiated and fallback
    requests resolve alike)."""

    text_encoder_id: str
    dtype: torch.dtype
    default_width: int = 0
    default_height: int = 0
    default_scheduler: str = ""
    default_guidance_scale: float | None = None  # None: the receiving model's own (an edge that names none)
    default_timestep_power: float | None = None  # None: the scheduler's own spacing

    @classmethod
    def of(cls, denoiser: Denoiser) -> EdgeProfile:
        size, scheduler = denoiser.default_size, type(denoiser.pipe.scheduler).__name__
        return cls(
            denoiser.text_encoder_id,
            denoiser.dtype,
            size,
            size,
            scheduler,
            denoiser.default_guidance_scale,
            denoiser.default_timestep_power,
        )

    def fill(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` with the size, scheduler, guidance scale and timestep spacing it leaves unset taken from
        this edge; the pair's spacing only where the request's scheduler takes custom timesteps (a request may
        name, say, DDIM on a pair whose spacing is a power)."""
        scheduler = request.scheduler or self.default_scheduler or None
        timestep_power = request.timestep_power
        if timestep_power is None and scheduler is not None and self.default_timestep_power is not None:
            scheduler_class, _ = resolve_scheduler(scheduler, scheduler)
            timestep_power = self.default_timestep_power if takes_custom_timesteps(scheduler_class) else None
        return dataclasses.replace(
            request,
            width=request.width or self.default_width or None,
            height=request.height or self.default_height or None,
            scheduler=scheduler,
            guidance_scale=self.default_guidance_scale if request.guidance_scale is None else request.guidance_scale,
            timestep_power=timestep_power,
        )


def for_edge(state: HybridState, edge: EdgeProfile) -> HybridState:
    """``state`` as ``edge`` should receive it: in its dtype, and without the prompt embeddings
    when its text encoders are the ones that made them (it encodes the prompt to the same bits)."""
    state = state.to_dtype(edge.dtype)
    if state.conditioning.text_encoder_id == edge.text_encoder_id:
        state = dataclasses.replace(state, conditioning=state.conditioning.without_embeddings())
    return state
