"""The handoff: everything the next denoising step needs, as one value with ``to_bytes``.

On the wire it is a safetensors file: tensors as raw little-endian bytes, everything else as one
JSON document in the safetensors metadata. No pickle anywhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from hybrid_sd import sampler_state
from hybrid_sd.conditioning import Conditioning
from hybrid_sd.request import GenerationRequest

FORMAT = "hybrid-sd.state/1"
_METADATA_KEY = "hybrid_sd"
_COND_PREFIX = "conditioning."
_SAMPLER_PREFIX = "sampler."


@dataclass
class HybridState:
    """A run of ``request.num_inference_steps`` steps paused before loop iteration ``step_index``.

    ``request`` has its seed, size and scheduler resolved. ``sampler_state`` is what stepping changed
    in the scheduler (see :mod:`hybrid_sd.sampler_state`); ``generator_state`` is the CPU generator's
    state for stochastic samplers.
    """

    request: GenerationRequest
    latent_space: str
    vae_scaling_factor: float
    scheduler_config: dict[str, Any]
    timesteps: torch.Tensor
    step_index: int
    sampler_state: dict[str, Any]
    generator_state: torch.Tensor | None
    latents: torch.Tensor
    conditioning: Conditioning

    @property
    def loop_length(self) -> int:
        """UNet evaluations in the whole schedule."""
        return len(self.timesteps)

    def to_bytes(self) -> bytes:
        sampler_description, tensors = sampler_state.flatten(self.sampler_state, _SAMPLER_PREFIX)
        tensors["latents"] = self.latents
        tensors["timesteps"] = self.timesteps
        if self.generator_state is not None:
            tensors["generator_state"] = self.generator_state
        for name, tensor in self.conditioning.tensors().items():
            tensors[_COND_PREFIX + name] = tensor
        document = {
            "format": FORMAT,
            "request": self.request.to_dict(),
            "latent_space": self.latent_space,
            "vae_scaling_factor": self.vae_scaling_factor,
            "scheduler_config": self.scheduler_config,
            "step_index": self.step_index,
            "sampler_state": sampler_description,
            "text_encoder_id": self.conditioning.text_encoder_id,
        }
        contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        return save_safetensors(contiguous, metadata={_METADATA_KEY: json.dumps(document)})

    @classmethod
    def from_bytes(cls, data: bytes) -> HybridState:
        """Parse a handoff; a malformed one raises ``ValueError`` naming what is wrong."""
        try:
            tensors = load_safetensors(data)
            document = json.loads(_read_metadata(data)[_METADATA_KEY])
        except (SafetensorError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"handoff is not a hybrid-sd state: {error}") from error
        if document.get("format") != FORMAT:
            raise ValueError(f"handoff format must be {FORMAT!r}, got {document.get('format')!r}")
        conditioning_tensors = {
            name.removeprefix(_COND_PREFIX): tensor for name, tensor in tensors.items() if name.startswith(_COND_PREFIX)
        }
        if "prompt_embeds" not in conditioning_tensors:
            raise ValueError("handoff is missing conditioning.prompt_embeds")
        return cls(
            request=GenerationRequest.from_dict(document["request"]),
            latent_space=document["latent_space"],
            vae_scaling_factor=document["vae_scaling_factor"],
            scheduler_config=document["scheduler_config"],
            timesteps=tensors["timesteps"],
            step_index=document["step_index"],
            sampler_state=sampler_state.unflatten(document["sampler_state"], tensors),
            generator_state=tensors.get("generator_state"),
            latents=tensors["latents"],
            conditioning=Conditioning(text_encoder_id=document["text_encoder_id"], **conditioning_tensors),
        )


def _read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors buffer (the format: 8-byte length, then a JSON header)."""
    header_length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_length])["__metadata__"]
