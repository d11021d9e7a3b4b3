"""The edge worker: a grpc.aio server holding the small model and its decoder.

It serves ``EdgeRefiner.Refine`` (finish a handoff from the cloud) and ``HybridDiffusion`` for
requests that start at the edge: it calls the cloud's ``Denoise`` and finishes locally, or finishes
alone when the cloud is unreachable or late and the request allows it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import grpc
import torch

from hybrid_sd import orchestrate
from hybrid_sd.credentials import Security
from hybrid_sd.denoiser import Denoiser
from hybrid_sd.halves import LocalEdge
from hybrid_sd.limits import RequestLimits
from hybrid_sd.pairs import load_edge
from hybrid_sd.presets import PairSpec
from hybrid_sd.rpc_clients import GrpcCloudClient, open_channel
from hybrid_sd.rpc_server import EDGE_REFINER, HYBRID_DIFFUSION, RunningServer, deadline_of, start_server
from hybrid_sd.streams import as_events
from hybrid_sd.v1 import hybrid_sd_pb2 as pb
from hybrid_sd.v1 import hybrid_sd_pb2_grpc as pb_grpc
from hybrid_sd.wire import call_from_pb, edge_profile_to_pb, edge_result_to_pb, refine_from_pb, result_to_pb

logger = logging.getLogger(__name__)


@dataclass
class EdgeConfig:
    pair: PairSpec
    pair_name: str | None = None  # requests naming another pair are refused
    host: str = "127.0.0.1"
    port: int = 50052
    cloud: str | None = None  # the gateway serving CloudDenoiser, for edge-initiated requests
    cloud_timeout: float | None = None  # seconds the cloud half may take before an edge fallback
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    security: Security = field(default_factory=Security)
    cloud_token: str | None = None
    torch_threads: int | None = None  # intra-op threads; must match the cloud's for a bit-exact split
    limits: RequestLimits = field(default_factory=RequestLimits)
    name: str = field(default_factory=lambda: f"edge@{socket.gethostname()}:{os.getpid()}")


class EdgeWorker:
    """The edge's model on its compute lane (the edge half of every request it serves), and its link
    to the cloud."""

    def __init__(self, config: EdgeConfig):
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        self.half: LocalEdge | None = None  # once the model is loaded
        self.cloud = None
        if config.cloud:
            channel = open_channel(config.cloud, config.security.peer_credentials())
            self.cloud = GrpcCloudClient(channel, config.cloud_token)

    async def load(self) -> None:
        self.half = LocalEdge(await asyncio.to_thread(self._load), self.config.name)
        logger.info("edge model %s loaded", self.config.pair.edge)

    def _load(self) -> Denoiser:
        config = self.config
        denoiser = load_edge(config.pair, config.device, config.dtype)
        denoiser.limits = config.limits
        denoiser.text_encoder_id  # noqa: B018 - fingerprint the text encoders now, not in the first Describe
        return denoiser

    def close(self) -> None:
        if self.half is not None:
            self.half.lane.shutdown()


async def _unless_loading(context: grpc.aio.ServicerContext, worker: EdgeWorker) -> None:
    if worker.half is None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the edge model is still loading")


class EdgeRefinerServicer(pb_grpc.EdgeRefinerServicer):
    def __init__(self, worker: EdgeWorker):
        self.worker = worker

    async def Describe(self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext) -> pb.EdgeProfile:
        await _unless_loading(context, self.worker)
        return edge_profile_to_pb(await self.worker.half.describe())

    async def Refine(self, request: pb.RefineRequest, context: grpc.aio.ServicerContext) -> pb.ImageResult:
        await _unless_loading(context, self.worker)
        start, output = refine_from_pb(request)
        return edge_result_to_pb(await self.worker.half.refine(start, output, deadline_of(context)))

    async def RefineStream(
        self, request: pb.RefineRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RefineEvent]:
        await _unless_loading(context, self.worker)
        start, output = refine_from_pb(request)
        call = partial(self.worker.half.refine, start, output, deadline_of(context))
        async for event in as_events(call, pb.RefineEvent, "result", edge_result_to_pb):
            yield event


class EdgeHybridDiffusionServicer(pb_grpc.HybridDiffusionServicer):
    """Edge-initiated requests: the cloud's Denoise over gRPC, then this worker's model."""

    def __init__(self, worker: EdgeWorker):
        self.worker = worker

    def _generate(self, message: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        """orchestrate.generate for a call, waiting only for ``on_progress``."""
        request, options = call_from_pb(message)
        timeout = self.worker.config.cloud_timeout
        return partial(
            orchestrate.generate,
            request,
            self.worker.cloud,
            self.worker.half,
            options,
            deadline=deadline_of(context),
            cloud_deadline=None if timeout is None else time.time() + timeout,
            served_pair=self.worker.config.pair_name,
            limits=self.worker.config.limits,
        )

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        await _unless_loading(context, self.worker)
        return result_to_pb(await self._generate(request, context)())

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        await _unless_loading(context, self.worker)
        async for event in as_events(self._generate(request, context), pb.GenerateEvent, "result", result_to_pb):
            yield event


@asynccontextmanager
async def running_edge(config: EdgeConfig) -> AsyncIterator[RunningServer]:
    """Serve until the block exits; health turns SERVING once the model is loaded."""
    worker = EdgeWorker(config)

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_EdgeRefinerServicer_to_server(EdgeRefinerServicer(worker), server)
        pb_grpc.add_HybridDiffusionServicer_to_server(EdgeHybridDiffusionServicer(worker), server)

    server = await start_server(
        "edge worker", register, (EDGE_REFINER, HYBRID_DIFFUSION), config.host, config.port, config.security
    )
    logger.info("edge worker %s listening on %s:%d", config.name, config.host, server.port)
    try:
        await worker.load()
        await server.set_serving()
        yield server
    finally:
        await server.stop()
        worker.close()
