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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import grpc
import torch

from hybrid_sd.credentials import Security
from hybrid_sd.denoiser import Denoiser
from hybrid_sd.edge_profile import EdgeProfile
from hybrid_sd.errors import NotReadyError
from hybrid_sd.halves import LocalEdge
from hybrid_sd.lane import ComputeLane, ProgressCallback
from hybrid_sd.limits import RequestLimits
from hybrid_sd.orchestrate import ServerGeneration
from hybrid_sd.pairs import load_edge
from hybrid_sd.presets import PairSpec
from hybrid_sd.request import GenerationRequest
from hybrid_sd.results import EdgeResult, Handoff, OutputSpec
from hybrid_sd.rpc_clients import GrpcCloudClient, open_channel
from hybrid_sd.rpc_server import (
    EDGE_REFINER,
    HYBRID_DIFFUSION,
    HybridDiffusionServicer,
    RunningServer,
    deadline_of,
    start_server,
)
from hybrid_sd.service_metrics import ServiceMetrics
from hybrid_sd.stages import stage
from hybrid_sd.streams import as_events
from hybrid_sd.switch_policy import SwitchPolicy
from hybrid_sd.switch_profile import SwitchProfile
from hybrid_sd.v1 import hybrid_sd_pb2 as pb
from hybrid_sd.v1 import hybrid_sd_pb2_grpc as pb_grpc
from hybrid_sd.web.server import http_face
from hybrid_sd.wire import edge_profile_to_pb, edge_result_to_pb, refine_from_pb

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
    http_port: int | None = None  # the HTTP face's (0: any free port); None: no HTTP
    max_batch: int = 1  # requests whose steps share a UNet call (a site edge serving many clients: more)
    batch_wait_s: float = 0.0
    max_queued: int | None = 64  # requests waiting for the lane before RESOURCE_EXHAUSTED (None: no bound)
    switch_profile: SwitchProfile | None = None  # quality against switch step, for auto_switch requests started here
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
        with stage(f"loading the edge model {self.config.pair.edge}"):
            lane = ComputeLane(self.config.max_batch, self.config.batch_wait_s, self.config.max_queued)
            self.half = LocalEdge(await asyncio.to_thread(self._load), self.config.name, lane)

    def _load(self) -> Denoiser:
        config = self.config
        denoiser = load_edge(config.pair, config.device, config.dtype)
        denoiser.limits = config.limits
        denoiser.text_encoder_id  # noqa: B018 - fingerprint the text encoders now, not in the first Describe
        return denoiser

    def _loaded(self) -> LocalEdge:
        if self.half is None:
            raise NotReadyError("the edge model is still loading")
        return self.half

    def queue_depth(self) -> int:
        return self.half.lane.waiting if self.half is not None else 0

    def edge_calls(self) -> int:
        """Requests on this worker's lane or waiting to join it."""
        return self.half.lane.occupancy + self.half.lane.waiting if self.half is not None else 0

    def cloud_calls(self) -> int:
        """This worker's calls outstanding at the cloud (what it knows of the cloud's queue)."""
        return self.cloud.in_flight if self.cloud is not None else 0

    def cloud_down(self) -> str | None:
        """Why the cloud cannot take this worker's requests now, or None when it can."""
        if self.cloud is None:
            return "no cloud configured"
        return None if self.cloud.reachable else "cloud unreachable"

    async def describe(self, deadline: float | None = None) -> EdgeProfile:
        return await self._loaded().describe(deadline)

    async def refine(
        self,
        start: Handoff | GenerationRequest,
        output: OutputSpec,
        deadline: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> EdgeResult:
        return await self._loaded().refine(start, output, deadline, on_progress)

    def close(self) -> None:
        if self.half is not None:
            self.half.lane.shutdown()


class EdgeRefinerServicer(pb_grpc.EdgeRefinerServicer):
    def __init__(self, worker: EdgeWorker):
        self.worker = worker

    async def Describe(self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext) -> pb.EdgeProfile:
        return edge_profile_to_pb(await self.worker.describe())

    async def Refine(self, request: pb.RefineRequest, context: grpc.aio.ServicerContext) -> pb.ImageResult:
        start, output = refine_from_pb(request)
        return edge_result_to_pb(await self.worker.refine(start, output, deadline_of(context)))

    async def RefineStream(
        self, request: pb.RefineRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RefineEvent]:
        start, output = refine_from_pb(request)
        call = partial(self.worker.refine, start, output, deadline_of(context))
        async for event in as_events(call, pb.RefineEvent, "result", edge_result_to_pb):
            yield event


@asynccontextmanager
async def running_edge(config: EdgeConfig) -> AsyncIterator[RunningServer]:
    """Serve until the block exits; health turns SERVING once the model is loaded."""
    worker = EdgeWorker(config)
    metrics = ServiceMetrics()
    metrics.watch_queue(worker.queue_depth)
    policy = SwitchPolicy(config.switch_profile, worker.cloud_calls, worker.cloud_down, edge_queued=worker.edge_calls)
    metrics.watch_switch(policy.inputs)
    generate = metrics.measured(
        ServerGeneration(worker.cloud, worker, config.pair_name, config.limits, config.cloud_timeout, policy)
    )

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_EdgeRefinerServicer_to_server(EdgeRefinerServicer(worker), server)
        pb_grpc.add_HybridDiffusionServicer_to_server(HybridDiffusionServicer(generate), server)

    server = await start_server(
        "edge worker",
        register,
        (EDGE_REFINER, HYBRID_DIFFUSION),
        config.host,
        config.port,
        config.security,
        partial(metrics.count, "grpc"),
    )
    logger.info("edge worker %s listening on %s:%d", config.name, config.host, server.port)
    try:
        await worker.load()
        async with http_face("edge worker", generate, metrics, config.host, config.http_port, config.security) as port:
            server.http_port = port
            await server.set_serving()
            yield server
    finally:
        await server.stop()
        worker.close()
