"""Text conditioning for SD 1.x and SDXL, computed by diffusers' own ``encode_prompt``."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields

import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

from hybrid_sd.request import GenerationRequest


@dataclass
class Conditioning:
    """Prompt embeddings (and SDXL's pooled embeddings and time ids) for one request.

    ``text_encoder_id`` fingerprints the encoders that made them: a side whose encoders have the
    same fingerprint uses these tensors as they are; any other side encodes the prompt again.
    Without ``prompt_embeds`` the tensors were left out of a lean handoff: the receiver encodes.
    """

    text_encoder_id: str
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    add_time_ids: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            field.name: getattr(self, field.name)
            for field in fields(self)
            if isinstance(getattr(self, field.name), torch.Tensor)
        }

    @property
    def has_embeddings(self) -> bool:
        return self.prompt_embeds is not None

    def without_embeddings(self) -> Conditioning:
        """Only the fingerprint: what a lean handoff carries."""
        return Conditioning(text_encoder_id=self.text_encoder_id)

    def to(self, device: torch.device | str) -> Conditioning:
        moved = {name: tensor.to(device) for name, tensor in self.tensors().items()}
        return Conditioning(text_encoder_id=self.text_encoder_id, **moved)

    def unet_inputs(self, classifier_free_guidance: bool) -> dict:
        """``encoder_hidden_states`` and ``added_cond_kwargs`` batched as diffusers' pipelines do:
        negative first, then positive."""

        def batch(negative: torch.Tensor | None, positive: torch.Tensor) -> torch.Tensor:
            return torch.cat([negative, positive]) if classifier_free_guidance else positive

        inputs = {
            "encoder_hidden_states": batch(self.negative_prompt_embeds, self.prompt_embeds),
            "added_cond_kwargs": None,
        }
        if self.add_time_ids is not None:
            inputs["added_cond_kwargs"] = {
                "text_embeds": batch(self.negative_pooled_prompt_embeds, self.pooled_prompt_embeds),
                "time_ids": batch(self.add_time_ids, self.add_time_ids),
            }
        return inputs


def text_encoder_fingerprint(pipe: DiffusionPipeline) -> str:
    """SHA-256 over the pipeline kind, its tokenizers' vocabularies and its text encoders' weights."""
    digest = hashlib.sha256(type(pipe).__name__.encode())
    if isinstance(pipe, StableDiffusionXLPipeline):
        digest.update(str(pipe.config.force_zeros_for_empty_prompt).encode())
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None:
            vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
            digest.update(f"{name}:{tokenizer.model_max_length}:{vocab}".encode())
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is None:
            continue
        # Private keys ("_name_or_path", ...) and the library version say nothing about the weights.
        config = {k: v for k, v in encoder.config.to_dict().items() if not k.startswith("_")}
        config.pop("transformers_version", None)
        digest.update(f"{name}:{json.dumps(config, sort_keys=True, default=str)}".encode())
        for key, tensor in encoder.state_dict().items():
            digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def encode_conditioning(
    pipe: DiffusionPipeline, request: GenerationRequest, text_encoder_id: str, height: int, width: int
) -> Conditioning:
    """Encode the request's prompts with ``pipe.encode_prompt``, exactly as its ``__call__`` does.

    Negative embeddings are made whenever guidance is on (scale > 1), so that either side can use
    classifier-free guidance whatever its own UNet does.
    """
    device = pipe._execution_device
    guidance = request.guidance_scale > 1
    with torch.no_grad():
        if not isinstance(pipe, StableDiffusionXLPipeline):
            positive, negative = pipe.encode_prompt(request.prompt, device, 1, guidance, request.negative_prompt)
            return Conditioning(text_encoder_id, positive, negative if guidance else None)
        positive, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=request.prompt,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guidance,
            negative_prompt=request.negative_prompt,
        )
    # SDXL micro-conditioning at the defaults of StableDiffusionXLPipeline.__call__:
    # original_size = target_size = (height, width), crops_coords_top_left = (0, 0).
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=positive.dtype, device=device)
    return Conditioning(
        text_encoder_id,
        positive,
        negative if guidance else None,
        pooled,
        negative_pooled if guidance else None,
        time_ids,
    )
