"""The handoff: everything the next denoising step needs, as one value, and its parts: one JSON
document and named tensors (``to_parts``/``from_parts``).

On the wire (:func:`hybrid_sd.wire.state_payload`) the parts are a ``Handoff`` message: tensors as raw
little-endian bytes, the document as JSON. No pickle anywhere. A lean handoff leaves the prompt
embeddings out and says so (``"conditioning": "omitted"``); see :mod:`hybrid_sd.edge_profile`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from hybrid_sd import sampler_state
from hybrid_sd.conditioning import Conditioning
from hybrid_sd.request import GenerationRequest

FORMAT = "hybrid-sd.state/1"
_COND_PREFIX = "conditioning."
_SAMPLER_PREFIX = "sampler."
CARRIED, OMITTED = "carried", "omitted"  # the document's "conditioning": embeddings in the tensors, or left out


@dataclass
class HybridState:
    """A run of ``request.num_inference_steps`` steps paused before loop iteration ``step_index``.

    ``request`` has its seed, size and scheduler resolved. ``sampler_state`` is what stepping changed
    in the scheduler (see :mod:`hybrid_sd.sampler_state`); ``generator_state`` is the CPU generator's
    state for stochastic samplers. ``conditioning`` without embeddings (a lean handoff) leaves the
    prompt to the receiver to encode.
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
    model: str = ""  # the model that made the latents, for error messages

    @property
    def loop_length(self) -> int:
        """UNet evaluations in the whole schedule."""
        return len(self.timesteps)

    def to_dtype(self, dtype: torch.dtype) -> HybridState:
        """The latents, and the sampler history shaped like them, in ``dtype`` (the receiver's compute
        dtype); timesteps and other scheduler values keep theirs. A cast is deterministic, so it gives
        the same bits on either side of the wire."""
        shape = self.latents.shape

        def cast(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(dtype) if tensor.is_floating_point() and tensor.shape == shape else tensor

        sampler = {name: sampler_state.map_tensors(value, cast) for name, value in self.sampler_state.items()}
        return dataclasses.replace(self, latents=self.latents.to(dtype), sampler_state=sampler)

    def to_parts(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """A JSON-able document and named CPU tensors: the one layout behind every encoding."""
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
            "conditioning": CARRIED if self.conditioning.has_embeddings else OMITTED,
            "model": self.model,
        }
        return document, {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}

    @classmethod
    def from_parts(cls, document: dict[str, Any], tensors: dict[str, torch.Tensor]) -> HybridState:
        """Inverse of :meth:`to_parts`; anything malformed raises ``ValueError`` naming the field."""
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            found = document.get("format") if isinstance(document, dict) else document
            raise ValueError(f"handoff format must be {FORMAT!r}, got {found!r}")
        carried = _conditioning_mode(document) == CARRIED
        for key in ("latents", "timesteps", *([_COND_PREFIX + "prompt_embeds"] if carried else [])):
            if key not in tensors:
                raise ValueError(f"handoff is missing tensor {key!r}")
        try:
            request = GenerationRequest.from_dict(document["request"])
            fields = {key: document[key] for key in _DOCUMENT_TYPES}
        except (KeyError, TypeError) as error:
            raise ValueError(f"handoff is missing or has a malformed field: {error}") from error
        for key, expected in _DOCUMENT_TYPES.items():
            if not isinstance(fields[key], expected) or isinstance(fields[key], bool):
                raise ValueError(f"handoff field {key!r} must be {expected}, got {fields[key]!r}")
        request.check()
        latents, timesteps = tensors["latents"], tensors["timesteps"]
        if not 0 <= fields["step_index"] <= len(timesteps):
            raise ValueError(f"handoff step_index must be in [0, {len(timesteps)}], got {fields['step_index']}")
        if latents.ndim != 4 or not latents.is_floating_point():
            raise ValueError(f"handoff latents must be a 4-D float tensor, got {latents.dtype} {tuple(latents.shape)}")
        if not torch.isfinite(latents).all():
            raise ValueError("handoff latents contain NaN or Inf")
        conditioning_tensors = {
            name.removeprefix(_COND_PREFIX): tensor for name, tensor in tensors.items() if name.startswith(_COND_PREFIX)
        }
        if conditioning_tensors and not carried:
            raise ValueError(f"handoff says its conditioning is {OMITTED!r} but carries {sorted(conditioning_tensors)}")
        try:
            conditioning = Conditioning(text_encoder_id=document["text_encoder_id"], **conditioning_tensors)
        except TypeError as error:
            raise ValueError(f"handoff has unknown conditioning tensors: {error}") from error
        return cls(
            request=request,
            latent_space=fields["latent_space"],
            vae_scaling_factor=float(fields["vae_scaling_factor"]),
            scheduler_config=fields["scheduler_config"],
            timesteps=timesteps,
            step_index=fields["step_index"],
            sampler_state=sampler_state.unflatten(fields["sampler_state"], tensors),
            generator_state=tensors.get("generator_state"),
            latents=latents,
            conditioning=conditioning,
            model=str(document.get("model", "")),
        )


_DOCUMENT_TYPES = {
    "latent_space": str,
    "vae_scaling_factor": int | float,
    "scheduler_config": dict,
    "step_index": int,
    "sampler_state": dict,
    "text_encoder_id": str,
}


def _conditioning_mode(document: dict[str, Any]) -> str:
    """The document's ``conditioning``: whether the prompt embeddings travel; never left implicit."""
    mode = document.get("conditioning")
    if mode not in (CARRIED, OMITTED):
        raise ValueError(f"handoff field 'conditioning' must be {CARRIED!r} or {OMITTED!r}, got {mode!r}")
    return mode
