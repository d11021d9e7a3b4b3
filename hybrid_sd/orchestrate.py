"""The one orchestration of a served request, over interchangeable cloud and edge clients.

The gateway runs it with a Ray cloud client and a gRPC edge client; an edge worker's own
``Generate`` runs it with a gRPC cloud client and its in-process edge. Either way: steps [0, k) on
the cloud, the handoff, steps [k, N) and the decode on the edge, or the edge alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Protocol

from hybrid_sd.errors import CloudUnavailableError, DeadlineExceededError
from hybrid_sd.limits import RequestLimits
from hybrid_sd.rpc import ProgressCallback
from hybrid_sd.service import as_events, with_progress
from hybrid_sd.v1 import hybrid_sd_pb2 as pb
from hybrid_sd.wire import check_output_format, request_from_pb, request_to_pb

logger = logging.getLogger(__name__)


class CloudClient(Protocol):
    async def denoise(
        self, request: pb.DenoiseRequest, deadline: float | None, on_progress: ProgressCallback | None = None
    ) -> pb.Handoff:
        """Steps [0, switch_step) of ``request``, handed off for the edge it names; raises
        CloudUnavailableError if unreachable. With ``on_progress``, reports every UNet evaluation."""


class EdgeClient(Protocol):
    async def profile(self, deadline: float | None) -> pb.EdgeProfile | None:
        """What the edge computes with, for a lean handoff; None where it cannot say (a full one).
        Never raises."""

    async def refine(
        self, request: pb.RefineRequest, deadline: float | None, on_progress: ProgressCallback | None = None
    ) -> pb.ImageResult:
        """The rest of the schedule and the decode; with ``on_progress``, reports every evaluation."""


async def generate(
    message: pb.GenerateRequest,
    cloud: CloudClient | None,
    edge: EdgeClient,
    deadline: float | None = None,
    cloud_deadline: float | None = None,
    on_progress: ProgressCallback | None = None,
    served_pair: str | None = None,
    limits: RequestLimits | None = None,
) -> pb.GenerateResponse:
    """Serve one request. ``deadline`` is the caller's (wall clock); ``cloud_deadline``, if earlier,
    bounds the cloud half so that an edge fallback still has time to run. ``on_progress`` hears of
    every UNet evaluation on either side. A request naming a pair other than ``served_pair``, or over
    ``limits``, is refused before any work."""
    started = time.perf_counter()
    if message.pair and served_pair and message.pair != served_pair:
        raise ValueError(f"pair {message.pair!r} is not served here; this server runs {served_pair!r}")
    request = request_from_pb(message).with_defaults()  # ValueError names a bad field
    check_output_format(message.output_format)
    if limits is not None:
        limits.check(request)
    message = request_to_pb(request, message)

    handoff: pb.Handoff | None = None
    fell_back = False
    cloud_wall = 0.0
    if request.switch_step > 0:
        cloud_started = time.perf_counter()
        try:
            if cloud is None:
                raise CloudUnavailableError("no cloud denoiser is configured")
            limit = min((d for d in (deadline, cloud_deadline) if d is not None), default=None)
            denoise = pb.DenoiseRequest(request=message, edge_profile=await edge.profile(limit))
            handoff = await cloud.denoise(denoise, limit, on_progress)
        except (CloudUnavailableError, DeadlineExceededError) as error:
            if not message.allow_edge_fallback or (deadline is not None and time.time() >= deadline):
                raise
            logger.warning("request %s: cloud failed (%s); finishing on the edge alone", message.request_id, error)
            fell_back = True
        cloud_wall = time.perf_counter() - cloud_started
    if handoff is not None:
        refine = pb.RefineRequest(handoff=handoff)
    else:
        edge_only = pb.GenerateRequest()
        edge_only.CopyFrom(message)
        edge_only.switch_step = 0
        refine = pb.RefineRequest(request=edge_only)
    refine.output_format = message.output_format
    refine.include_latents = message.include_latents
    edge_started = time.perf_counter()
    result = await edge.refine(refine, deadline, on_progress)
    edge_wall = time.perf_counter() - edge_started
    return _response(message, handoff, result, fell_back, cloud_wall, edge_wall, time.perf_counter() - started)


async def generate_stream(
    message: pb.GenerateRequest,
    cloud: CloudClient | None,
    edge: EdgeClient,
    deadline: float | None = None,
    cloud_deadline: float | None = None,
    served_pair: str | None = None,
    limits: RequestLimits | None = None,
) -> AsyncIterator[pb.GenerateEvent]:
    """:func:`generate` as a stream: a progress event per UNet evaluation, then the result."""
    call = partial(generate, message, cloud, edge, deadline, cloud_deadline, served_pair=served_pair, limits=limits)
    async for event in as_events(with_progress(call), pb.GenerateEvent, "result"):
        yield event


def _response(
    message: pb.GenerateRequest,
    handoff: pb.Handoff | None,
    result: pb.ImageResult,
    fell_back: bool,
    cloud_wall: float,
    edge_wall: float,
    total: float,
) -> pb.GenerateResponse:
    resolved = result.request
    edge_compute = result.handoff_decode_seconds + result.encode_prompt_seconds
    edge_compute += result.edge_denoise_seconds + result.vae_decode_seconds
    timings = pb.StageTimings(
        edge_denoise=result.edge_denoise_seconds,
        vae_decode=result.vae_decode_seconds,
        handoff_decode=result.handoff_decode_seconds,
        total=total,
    )
    handoff_bytes = 0
    if handoff is not None:
        handoff_bytes = handoff.ByteSize()
        cloud_compute = handoff.encode_prompt_seconds + handoff.cloud_denoise_seconds
        # The edge encodes too where the handoff left the embeddings out or it has other encoders.
        timings.encode_prompt = handoff.encode_prompt_seconds + result.encode_prompt_seconds
        timings.cloud_denoise = handoff.cloud_denoise_seconds
        # Everything between the two computations: serialization, the network, queues.
        timings.handoff_transfer = max(0.0, cloud_wall - cloud_compute) + max(0.0, edge_wall - edge_compute)
    else:
        timings.encode_prompt = result.encode_prompt_seconds
    return pb.GenerateResponse(
        image=result.image,
        mime_type=result.mime_type,
        latents=result.latents if result.HasField("latents") else None,
        seed=resolved.seed,
        switch_step=resolved.switch_step,
        num_inference_steps=resolved.num_inference_steps,
        scheduler=resolved.scheduler,
        width=resolved.width,
        height=resolved.height,
        timings=timings,
        handoff_bytes=handoff_bytes,
        cloud_unet_evaluations=handoff.cloud_unet_evaluations if handoff is not None else 0,
        edge_unet_evaluations=result.edge_unet_evaluations,
        cloud_replica=handoff.cloud_replica if handoff is not None else "",
        cloud_node=handoff.cloud_node if handoff is not None else "",
        edge_worker=result.edge_worker,
        edge_fallback=fell_back,
        request_id=message.request_id,
    )
