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

from hybrid_sd.state import HybridState

if TYPE_CHECKING:
    from hybrid_sd.denoiser import Denoiser


@dataclass(frozen=True)
class EdgeProfile:
    """The receiving edge: its text encoders' fingerprint and the dtype it denoises in."""

    text_encoder_id: str
    dtype: torch.dtype

    @classmethod
    def of(cls, denoiser: Denoiser) -> EdgeProfile:
        return cls(denoiser.text_encoder_id, denoiser.dtype)


def for_edge(state: HybridState, edge: EdgeProfile) -> HybridState:
    """``state`` as ``edge`` should receive it: in its dtype, and without the prompt embeddings
    when its text encoders are the ones that made them (it encodes the prompt to the same bits)."""
    state = state.to_dtype(edge.dtype)
    if state.conditioning.text_encoder_id == edge.text_encoder_id:
        state = dataclasses.replace(state, conditioning=state.conditioning.without_embeddings())
    return state
