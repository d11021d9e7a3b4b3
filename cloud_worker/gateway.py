"""The cloud gateway: a grpc.aio server in front of the Ray Serve denoiser deployment.

It serves ``HybridDiffusion`` (cloud steps on Ray, the rest on the edge worker over gRPC) and
``CloudDenoiser`` (for requests that start at an edge). Ray starts locally unless an address is
given, in which case the deployment's replicas run on that cluster's nodes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import grpc
import ray
from ray import serve

from cloud_worker.deployment import APP_NAME, RayCloudClient, ReplicaConfig, bind
from hybrid_sd import orchestrate
from hybrid_sd.presets import PairSpec
from hybrid_sd.rpc import (
    CLOUD_DENOISER,
    HYBRID_DIFFUSION,
    GrpcEdgeClient,
    RunningServer,
    Security,
    start_server,
)
from hybrid_sd.service import as_events, with_progress
from hybrid_sd.v1 import hybrid_sd_pb2 as pb
from hybrid_sd.v1 import hybrid_sd_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

RAY_START_ATTEMPTS = 3
RAY_START_TIMEOUTS = ("timed out during startup", "Timed out waiting for file")


@dataclass
class GatewayConfig:
    pair_name: str
    pair: PairSpec
    edge: str  # HOST:PORT of the edge worker
    host: str = "127.0.0.1"
    port: int = 50051
    ray_address: str | None = None  # None: start Ray in this process
    ray_num_cpus: int | None = None  # for a local Ray
    replicas: ReplicaConfig = field(default_factory=ReplicaConfig)
    device: str = "cpu"
    dtype: str = "float32"
    security: Security = field(default_factory=Security)
    edge_token: str | None = None


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.time() + remaining


class GatewayHybridDiffusionServicer(pb_grpc.HybridDiffusionServicer):
    def __init__(self, pair_name: str, cloud: RayCloudClient, edge: GrpcEdgeClient):
        self.pair_name, self.cloud, self.edge = pair_name, cloud, edge

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        return await orchestrate.generate(
            request, self.cloud, self.edge, _deadline(context), served_pair=self.pair_name
        )

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        async for event in orchestrate.generate_stream(
            request, self.cloud, self.edge, _deadline(context), served_pair=self.pair_name
        ):
            yield event


class GatewayCloudDenoiserServicer(pb_grpc.CloudDenoiserServicer):
    def __init__(self, cloud: RayCloudClient):
        self.cloud = cloud

    async def Denoise(self, request: pb.DenoiseRequest, context: grpc.aio.ServicerContext) -> pb.Handoff:
        return await self.cloud.denoise(request, _deadline(context))

    async def DenoiseStream(
        self, request: pb.DenoiseRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DenoiseEvent]:
        call = partial(self.cloud.denoise, request, _deadline(context))
        async for event in as_events(with_progress(call), pb.DenoiseEvent, "handoff"):
            yield event


def deploy(config: GatewayConfig):
    """Connect to (or start) Ray and run the denoiser application; returns its handle once every
    replica has loaded the model."""
    if not ray.is_initialized():
        address = config.ray_address
        if address and not address.startswith("ray://"):
            # A driver connects through a raylet on its own host: join the cluster as a node that
            # offers no resources, so every replica runs on the cloud nodes.
            subprocess.run(["ray", "start", "--address", address, "--num-cpus", "0", "--num-gpus", "0"], check=True)
            address = "auto"
        _init_ray(address, config.ray_num_cpus if address is None else None)
    application = bind(config.pair, config.replicas, config.device, config.dtype)
    return serve.run(application, name=APP_NAME, route_prefix=None)


def _init_ray(address: str | None, num_cpus: int | None) -> None:
    """``ray.init``, tried again when a local node misses one of Ray's start-up windows (its raylet's fixed
    30 s registration, the GCS port file), which a busy machine (models loading beside it on two cores) can
    make it miss; the GCS window, which Ray lets one set, is widened unless the environment sets it."""
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            return
        except Exception as error:  # Ray raises a bare Exception or a RuntimeError for these timeouts
            start_timeout = any(text in str(error) for text in RAY_START_TIMEOUTS)
            if not start_timeout or attempt == RAY_START_ATTEMPTS:
                raise
            logger.warning("Ray node start timed out (attempt %d of %d); again", attempt, RAY_START_ATTEMPTS)
            ray.shutdown()


@asynccontextmanager
async def running_gateway(config: GatewayConfig) -> AsyncIterator[RunningServer]:
    """Serve until the block exits; health turns SERVING once the replicas have loaded the model."""
    cloud = RayCloudClient()
    edge = GrpcEdgeClient(config.security.peer_channel(config.edge), config.edge_token)

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_HybridDiffusionServicer_to_server(
            GatewayHybridDiffusionServicer(config.pair_name, cloud, edge), server
        )
        pb_grpc.add_CloudDenoiserServicer_to_server(GatewayCloudDenoiserServicer(cloud), server)

    server = await start_server(register, (HYBRID_DIFFUSION, CLOUD_DENOISER), config.host, config.port, config.security)
    logger.info("gateway listening on %s:%d; deploying %s", config.host, server.port, config.pair.cloud)
    started_ray = not ray.is_initialized()
    try:
        cloud.attach(await asyncio.to_thread(deploy, config))
        await server.set_serving()
        yield server
    finally:
        await server.stop()
        if ray.is_initialized():
            await asyncio.to_thread(serve.delete, APP_NAME)
            if started_ray:
                await asyncio.to_thread(ray.shutdown)
