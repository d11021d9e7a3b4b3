"""Protobuf encoding (``hybrid_sd.v1``) of requests, tensors, handoffs and images.

Protobuf stays at the edge of the code: servicers convert with these functions and hand plain
library values inward. Every decoder validates and raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math

import PIL.Image
import torch
from google.protobuf.message import DecodeError

from hybrid_sd.edge_profile import EdgeProfile
from hybrid_sd.lane import Progress
from hybrid_sd.request import MAX_SEED, GenerationRequest
from hybrid_sd.results import (
    CLOUD_STAGES,
    EDGE_STAGES,
    STAGES,
    CallOptions,
    EdgeResult,
    GenerationResult,
    Handoff,
    OutputSpec,
    SwitchChoice,
)
from hybrid_sd.state import FORMAT, HybridState
from hybrid_sd.v1 import hybrid_sd_pb2 as pb

TENSOR_DTYPES = {
    name: getattr(torch, name)
    for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
}
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
# Output formats that are images, as PIL names them.
IMAGE_FORMATS = {
    pb.OUTPUT_FORMAT_UNSPECIFIED: "PNG",
    pb.OUTPUT_FORMAT_PNG: "PNG",
    pb.OUTPUT_FORMAT_JPEG: "JPEG",
    pb.OUTPUT_FORMAT_WEBP: "WEBP",
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
        preview_every=message.preview_every,
        exact=message.exact,
        auto_switch=message.auto_switch,
        latency_target_s=get("latency_target_s"),
        timestep_power=get("timestep_power"),
    )
    request.check()
    return request


def request_to_pb(request: GenerationRequest, template: pb.GenerateRequest | None = None) -> pb.GenerateRequest:
    """``request``'s fields on a copy of ``template`` (which keeps output format, pair, ids)."""
    message = pb.GenerateRequest()
    if template is not None:
        message.CopyFrom(template)
    message.prompt = request.prompt
    optional = ("negative_prompt", "switch_step", "guidance_scale", "guidance_rescale", "seed", "width", "height")
    for name in (*optional, "latency_target_s", "timestep_power"):
        value = getattr(request, name)
        if value is None:
            message.ClearField(name)
        else:
            setattr(message, name, value)
    message.num_inference_steps = request.num_inference_steps
    message.scheduler = request.scheduler or ""
    message.preview_every = request.preview_every
    message.exact, message.auto_switch = request.exact, request.auto_switch
    return message


def state_payload(state: HybridState) -> bytes:
    """``state`` as the bytes of a ``Handoff`` message holding only the state (format, state_json,
    tensors): what crosses to the edge, and what ``handoff_bytes`` counts on every path."""
    document, tensors = state.to_parts()
    message = pb.Handoff(
        format=FORMAT,
        state_json=json.dumps(document),
        tensors={name: tensor_to_pb(tensor) for name, tensor in tensors.items()},
    )
    return message.SerializeToString()


def state_from_payload(payload: bytes) -> HybridState:
    """Parse :func:`state_payload`'s bytes; a malformed one raises ``ValueError`` naming what is wrong."""
    try:
        message = pb.Handoff.FromString(payload)
    except DecodeError as error:
        raise ValueError(f"handoff is not a Handoff message: {error}") from error
    try:
        document = json.loads(message.state_json)
    except json.JSONDecodeError as error:
        raise ValueError(f"handoff.state_json is not JSON: {error}") from error
    tensors = {name: tensor_from_pb(tensor, f"handoff.tensors[{name!r}]") for name, tensor in message.tensors.items()}
    return HybridState.from_parts(document, tensors)


def handoff_to_pb(handoff: Handoff) -> pb.Handoff:
    message = pb.Handoff.FromString(handoff.payload)
    message.cloud_model, message.cloud_replica, message.cloud_node = handoff.model, handoff.replica, handoff.node
    message.cloud_unet_evaluations = handoff.unet_evaluations
    message.batch_sizes[:] = handoff.batch_sizes
    for stage in CLOUD_STAGES:  # each as the message's <stage>_seconds
        setattr(message, f"{stage}_seconds", handoff.timings.get(stage, 0.0))
    return message


def handoff_from_pb(message: pb.Handoff) -> Handoff:
    """The plain handoff of a message (its state decoded only by the edge that continues it)."""
    state = pb.Handoff(format=message.format, state_json=message.state_json)
    state.tensors.MergeFrom(message.tensors)
    return Handoff(
        payload=state.SerializeToString(),
        unet_evaluations=message.cloud_unet_evaluations,
        timings={stage: getattr(message, f"{stage}_seconds") for stage in CLOUD_STAGES},
        model=message.cloud_model,
        replica=message.cloud_replica,
        node=message.cloud_node,
        batch_sizes=list(message.batch_sizes),
    )


def output_from_pb(output_format: int, include_latents: bool) -> OutputSpec:
    """The output a call asks for, refusing an output format that is neither an image format nor latents."""
    if output_format == pb.OUTPUT_FORMAT_LATENTS:
        return OutputSpec(decode=False, latents=True)
    if output_format not in IMAGE_FORMATS:
        known = ", ".join(pb.OutputFormat.Name(value) for value in (*IMAGE_FORMATS, pb.OUTPUT_FORMAT_LATENTS))
        raise ValueError(f"output_format {output_format} is not one of {known}")
    return OutputSpec(decode=True, image_format=IMAGE_FORMATS[output_format], latents=include_latents)


def output_to_pb(output: OutputSpec) -> tuple[int, bool]:
    """``(output_format, include_latents)`` of an output; a served call always encodes its image."""
    if not output.decode:
        return pb.OUTPUT_FORMAT_LATENTS, True
    by_name = {name: value for value, name in IMAGE_FORMATS.items() if value != pb.OUTPUT_FORMAT_UNSPECIFIED}
    return by_name[output.image_format or "PNG"], output.latents


def call_from_pb(message: pb.GenerateRequest) -> tuple[GenerationRequest, CallOptions]:
    """A ``Generate`` call's request and options, validated (``ValueError`` names a bad field)."""
    options = CallOptions(
        output=output_from_pb(message.output_format, message.include_latents),
        allow_edge_fallback=message.allow_edge_fallback,
        request_id=message.request_id,
        pair=message.pair,
    )
    return request_from_pb(message), options


def call_to_pb(request: GenerationRequest, options: CallOptions) -> pb.GenerateRequest:
    message = request_to_pb(request)
    message.output_format, message.include_latents = output_to_pb(options.output)
    message.allow_edge_fallback, message.request_id, message.pair = (
        options.allow_edge_fallback,
        options.request_id,
        options.pair,
    )
    return message


def denoise_to_pb(request: GenerationRequest, edge: EdgeProfile | None) -> pb.DenoiseRequest:
    message = pb.DenoiseRequest(request=request_to_pb(request))
    if edge is not None:
        message.edge_profile.CopyFrom(edge_profile_to_pb(edge))
    return message


def denoise_from_pb(message: pb.DenoiseRequest) -> tuple[GenerationRequest, EdgeProfile | None]:
    edge = edge_profile_from_pb(message.edge_profile) if message.HasField("edge_profile") else None
    return request_from_pb(message.request), edge


def refine_to_pb(start: Handoff | GenerationRequest, output: OutputSpec) -> pb.RefineRequest:
    message = pb.RefineRequest()
    if isinstance(start, Handoff):
        message.handoff.MergeFromString(start.payload)
    else:
        message.request.CopyFrom(request_to_pb(start))
    message.output_format, message.include_latents = output_to_pb(output)
    return message


def refine_from_pb(message: pb.RefineRequest) -> tuple[Handoff | GenerationRequest, OutputSpec]:
    output = output_from_pb(message.output_format, message.include_latents)
    if message.HasField("handoff"):
        return handoff_from_pb(message.handoff), output
    return request_from_pb(message.request), output


def edge_result_to_pb(result: EdgeResult) -> pb.ImageResult:
    message = pb.ImageResult(
        image=result.image_data,
        mime_type=result.mime_type,
        request=request_to_pb(result.request),
        edge_unet_evaluations=result.unet_evaluations,
        edge_worker=result.worker,
        edge_profile=edge_profile_to_pb(result.profile),
        batch_sizes=result.batch_sizes,
    )
    if result.latents is not None:
        message.latents.CopyFrom(tensor_to_pb(result.latents))
    for stage in EDGE_STAGES:
        setattr(message, f"{stage}_seconds", result.timings.get(stage, 0.0))
    return message


def edge_result_from_pb(message: pb.ImageResult) -> EdgeResult:
    return EdgeResult(
        request=request_from_pb(message.request),
        unet_evaluations=message.edge_unet_evaluations,
        timings={stage: getattr(message, f"{stage}_seconds") for stage in EDGE_STAGES},
        profile=edge_profile_from_pb(message.edge_profile),
        worker=message.edge_worker,
        batch_sizes=list(message.batch_sizes),
        image=decode_image(message.image),
        image_data=message.image,
        mime_type=message.mime_type,
        latents=tensor_from_pb(message.latents, "latents") if message.HasField("latents") else None,
    )


def result_to_pb(result: GenerationResult) -> pb.GenerateResponse:
    request = result.request
    return pb.GenerateResponse(
        image=result.image_data,
        mime_type=result.mime_type,
        latents=tensor_to_pb(result.latents) if result.latents is not None else None,
        seed=request.seed,
        switch_step=request.switch_step,
        num_inference_steps=request.num_inference_steps,
        scheduler=request.scheduler,
        guidance_scale=request.guidance_scale,
        timestep_power=request.timestep_power,
        width=request.width,
        height=request.height,
        timings=pb.StageTimings(**{stage: result.timings.get(stage, 0.0) for stage in STAGES}),
        handoff_bytes=result.handoff_bytes,
        cloud_unet_evaluations=result.unet_evaluations["cloud"],
        edge_unet_evaluations=result.unet_evaluations["edge"],
        cloud_replica=result.cloud_replica,
        cloud_node=result.cloud_node,
        edge_worker=result.edge_worker,
        edge_fallback=result.edge_fallback,
        request_id=result.request_id,
        cloud_batch_sizes=result.batch_sizes["cloud"],
        edge_batch_sizes=result.batch_sizes["edge"],
        switch_choice=switch_choice_to_pb(result.switch_choice) if result.switch_choice else None,
    )


def result_from_pb(message: pb.GenerateResponse, asked: GenerationRequest) -> GenerationResult:
    """A served response to ``asked`` as a result (a response repeats only what the server resolved)."""
    request = dataclasses.replace(
        asked,
        switch_step=message.switch_step,
        num_inference_steps=message.num_inference_steps,
        seed=message.seed,
        width=message.width,
        height=message.height,
        scheduler=message.scheduler,
        guidance_scale=message.guidance_scale,
        timestep_power=message.timestep_power if message.HasField("timestep_power") else None,
    )
    return GenerationResult(
        request=request,
        unet_evaluations={"cloud": message.cloud_unet_evaluations, "edge": message.edge_unet_evaluations},
        handoff_bytes=message.handoff_bytes,
        timings={stage: getattr(message.timings, stage) for stage in STAGES},
        image=decode_image(message.image),
        image_data=message.image,
        mime_type=message.mime_type,
        latents=tensor_from_pb(message.latents, "latents") if message.HasField("latents") else None,
        cloud_replica=message.cloud_replica,
        cloud_node=message.cloud_node,
        edge_worker=message.edge_worker,
        edge_fallback=message.edge_fallback,
        request_id=message.request_id,
        batch_sizes={"cloud": list(message.cloud_batch_sizes), "edge": list(message.edge_batch_sizes)},
        switch_choice=switch_choice_from_pb(message.switch_choice) if message.HasField("switch_choice") else None,
    )


def switch_choice_to_pb(choice: SwitchChoice) -> pb.SwitchChoice:
    return pb.SwitchChoice(
        switch_step=choice.switch_step,
        predicted_latency_s=choice.predicted_latency_s,
        quality=choice.quality,
        reason=choice.reason,
    )


def switch_choice_from_pb(message: pb.SwitchChoice) -> SwitchChoice:
    return SwitchChoice(
        switch_step=message.switch_step,
        predicted_latency_s=message.predicted_latency_s,
        quality=message.quality if message.HasField("quality") else None,
        reason=message.reason,
    )


def decode_image(data: bytes) -> PIL.Image.Image | None:
    """The image of encoded bytes (decoded when its pixels are first read); None for no bytes."""
    return PIL.Image.open(io.BytesIO(data)) if data else None


def progress_to_pb(progress: Progress) -> pb.Progress:
    return pb.Progress(stage=progress.stage, step=progress.step, total=progress.total, preview_png=progress.preview_png)


def progress_from_pb(message: pb.Progress) -> Progress:
    return Progress(message.stage, message.step, message.total, message.preview_png)


def edge_profile_to_pb(profile: EdgeProfile) -> pb.EdgeProfile:
    return pb.EdgeProfile(
        text_encoder_id=profile.text_encoder_id,
        dtype=str(profile.dtype).removeprefix("torch."),
        default_width=profile.default_width,
        default_height=profile.default_height,
        default_scheduler=profile.default_scheduler,
        default_guidance_scale=profile.default_guidance_scale,
        default_timestep_power=profile.default_timestep_power,
    )


def edge_profile_from_pb(message: pb.EdgeProfile) -> EdgeProfile:
    """Decode an edge's profile, refusing a dtype it cannot denoise in."""
    if message.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"edge_profile.dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {message.dtype!r}")
    return EdgeProfile(
        message.text_encoder_id,
        TENSOR_DTYPES[message.dtype],
        message.default_width,
        message.default_height,
        message.default_scheduler,
        message.default_guidance_scale if message.HasField("default_guidance_scale") else None,
        message.default_timestep_power if message.HasField("default_timestep_power") else None,
    )
