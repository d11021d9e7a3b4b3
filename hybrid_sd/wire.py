"""Protobuf encoding (``hybrid_sd.v1``) of requests, tensors, handoffs and images.

Protobuf stays at the edge of the code: servicers convert with these functions and hand plain
library values inward. Every decoder validates and raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import io
import json
import math

import PIL.Image
import torch

from hybrid_sd.edge_profile import EdgeProfile
from hybrid_sd.request import MAX_SEED, GenerationRequest
from hybrid_sd.state import FORMAT, HybridState
from hybrid_sd.v1 import hybrid_sd_pb2 as pb

TENSOR_DTYPES = {
    name: getattr(torch, name)
    for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
}
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
IMAGE_FORMATS = {
    pb.OUTPUT_FORMAT_UNSPECIFIED: ("PNG", "image/png"),
    pb.OUTPUT_FORMAT_PNG: ("PNG", "image/png"),
    pb.OUTPUT_FORMAT_JPEG: ("JPEG", "image/jpeg"),
    pb.OUTPUT_FORMAT_WEBP: ("WEBP", "image/webp"),
}


def tensor_to_pb(tensor: torch.Tensor) -> pb.Tensor:
    tensor = tensor.detach().cpu().contiguous()
    # Through uint8, since numpy has no bfloat16; x86 and ARM are little-endian, as the contract says.
    data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
    return pb.Tensor(dtype=str(tensor.dtype).removeprefix("torch."), shape=list(tensor.shape), data=data)


def tensor_from_pb(message: pb.Tensor, field: str) -> torch.Tensor:
    """Decode a Tensor message, refusing an unknown dtype or a byte count that does not match."""
    if message.dtype not in TENSOR_DTYPES:
        raise ValueError(f"{field}: unknown dtype {message.dtype!r}")
    dtype = TENSOR_DTYPES[message.dtype]
    shape = tuple(message.shape)
    if any(size < 0 for size in shape):
        raise ValueError(f"{field}: negative size in shape {shape}")
    expected = math.prod(shape) * dtype.itemsize
    if len(message.data) != expected:
        raise ValueError(
            f"{field}: {len(message.data)} bytes do not match shape {shape} of {message.dtype} ({expected} bytes)"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(message.data), dtype=torch.uint8).view(dtype).reshape(shape)


def request_from_pb(message: pb.GenerateRequest) -> GenerationRequest:
    """A validated library request from its protobuf form (unset fields take the defaults)."""
    defaults = GenerationRequest(prompt="")
    if message.HasField("seed") and message.seed > MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}], got {message.seed}")

    def get(name: str):
        return getattr(message, name) if message.HasField(name) else getattr(defaults, name)

    request = GenerationRequest(
        prompt=message.prompt,
        negative_prompt=message.negative_prompt if message.HasField("negative_prompt") else None,
        switch_step=get("switch_step"),
        num_inference_steps=get("num_inference_steps"),
        guidance_scale=get("guidance_scale"),
        guidance_rescale=get("guidance_rescale"),
        seed=get("seed"),
        width=get("width"),
        height=get("height"),
        scheduler=message.scheduler or None,
    )
    request.check()
    return request


def request_to_pb(request: GenerationRequest, template: pb.GenerateRequest | None = None) -> pb.GenerateRequest:
    """``request``'s fields on a copy of ``template`` (which keeps output format, pair, ids)."""
    message = pb.GenerateRequest()
    if template is not None:
        message.CopyFrom(template)
    message.prompt = request.prompt
    for name in ("negative_prompt", "switch_step", "guidance_scale", "guidance_rescale", "seed", "width", "height"):
        value = getattr(request, name)
        if value is None:
            message.ClearField(name)
        else:
            setattr(message, name, value)
    message.num_inference_steps = request.num_inference_steps
    message.scheduler = request.scheduler or ""
    return message


def handoff_to_pb(state: HybridState) -> pb.Handoff:
    document, tensors = state.to_parts()
    return pb.Handoff(
        format=FORMAT,
        state_json=json.dumps(document),
        tensors={name: tensor_to_pb(tensor) for name, tensor in tensors.items()},
    )


def handoff_from_pb(message: pb.Handoff) -> HybridState:
    try:
        document = json.loads(message.state_json)
    except json.JSONDecodeError as error:
        raise ValueError(f"handoff.state_json is not JSON: {error}") from error
    tensors = {name: tensor_from_pb(tensor, f"handoff.tensors[{name!r}]") for name, tensor in message.tensors.items()}
    return HybridState.from_parts(document, tensors)


def check_output_format(output_format: int) -> None:
    """Refuse an output format that is neither an image format nor latents, before any work."""
    if output_format not in IMAGE_FORMATS and output_format != pb.OUTPUT_FORMAT_LATENTS:
        known = ", ".join(pb.OutputFormat.Name(value) for value in (*IMAGE_FORMATS, pb.OUTPUT_FORMAT_LATENTS))
        raise ValueError(f"output_format {output_format} is not one of {known}")


def edge_profile_to_pb(profile: EdgeProfile) -> pb.EdgeProfile:
    return pb.EdgeProfile(text_encoder_id=profile.text_encoder_id, dtype=str(profile.dtype).removeprefix("torch."))


def edge_profile_from_pb(message: pb.EdgeProfile) -> EdgeProfile:
    """Decode an edge's profile, refusing a dtype it cannot denoise in."""
    if message.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"edge_profile.dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {message.dtype!r}")
    return EdgeProfile(message.text_encoder_id, TENSOR_DTYPES[message.dtype])


def encode_image(image: PIL.Image.Image, output_format: int) -> tuple[bytes, str]:
    """Image bytes and MIME type for a non-latent output format."""
    if output_format not in IMAGE_FORMATS:
        raise ValueError(f"output_format {output_format} is not an image format")
    pil_format, mime_type = IMAGE_FORMATS[output_format]
    buffer = io.BytesIO()
    image.save(buffer, format=pil_format)
    return buffer.getvalue(), mime_type
