"""A client of hybrid-sd's gRPC API: one Generate call, its answer as a library result."""

from __future__ import annotations

from pathlib import Path

import grpc

from hybrid_sd.credentials import channel_credentials
from hybrid_sd.request import GenerationRequest
from hybrid_sd.results import CallOptions, GenerationResult
from hybrid_sd.rpc_clients import call_metadata, open_channel
from hybrid_sd.v1 import hybrid_sd_pb2_grpc as pb_grpc
from hybrid_sd.wire import call_to_pb, result_from_pb


async def generate_remote(
    target: str,
    request: GenerationRequest,
    options: CallOptions,
    token: str | None = None,
    tls_ca: Path | None = None,
    timeout: float | None = None,
) -> GenerationResult:
    """Call ``HybridDiffusion.Generate`` on ``target`` (a gateway or an edge worker)."""
    async with open_channel(target, channel_credentials(tls_ca)) as channel:
        return await generate_on(channel, request, options, token, timeout)


async def generate_on(
    channel: grpc.aio.Channel,
    request: GenerationRequest,
    options: CallOptions,
    token: str | None = None,
    timeout: float | None = None,
) -> GenerationResult:
    """Call ``HybridDiffusion.Generate`` over an open channel (one shared by many calls)."""
    response = await pb_grpc.HybridDiffusionStub(channel).Generate(
        call_to_pb(request, options), timeout=timeout, metadata=call_metadata(token)
    )
    return result_from_pb(response, request)
