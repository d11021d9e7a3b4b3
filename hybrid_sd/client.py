"""A client of hybrid-sd's gRPC API: one Generate call, its outputs written to files."""

from __future__ import annotations

from pathlib import Path

from hybrid_sd.rpc import call_metadata, open_channel
from hybrid_sd.user_files import output_format_for
from hybrid_sd.v1 import hybrid_sd_pb2 as pb
from hybrid_sd.v1 import hybrid_sd_pb2_grpc as pb_grpc
from hybrid_sd.wire import tensor_from_pb


async def generate_remote(
    target: str,
    request: pb.GenerateRequest,
    out: Path | None = None,
    token: str | None = None,
    tls_ca: Path | None = None,
    timeout: float | None = None,
) -> pb.GenerateResponse:
    """Call ``HybridDiffusion.Generate`` on ``target`` and write the image to ``out``."""
    if out is not None:
        request.output_format = output_format_for(out)
    async with open_channel(target, tls_ca) as channel:
        response = await pb_grpc.HybridDiffusionStub(channel).Generate(
            request, timeout=timeout, metadata=call_metadata(token)
        )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(response.image)
    return response


def response_summary(response: pb.GenerateResponse) -> dict:
    """The fields ``hybrid-sd generate --json`` prints, for a served request."""
    timings = {field.name: value for field, value in response.timings.ListFields()}
    return {
        "seed": response.seed,
        "switch_step": response.switch_step,
        "num_inference_steps": response.num_inference_steps,
        "scheduler": response.scheduler,
        "width": response.width,
        "height": response.height,
        "unet_evaluations": {"cloud": response.cloud_unet_evaluations, "edge": response.edge_unet_evaluations},
        "handoff_bytes": response.handoff_bytes,
        "timings_s": {stage: round(seconds, 6) for stage, seconds in timings.items()},
        "cloud_replica": response.cloud_replica,
        "cloud_node": response.cloud_node,
        "edge_worker": response.edge_worker,
        "edge_fallback": response.edge_fallback,
    }


def latents_of(response: pb.GenerateResponse):
    return tensor_from_pb(response.latents, "latents")
