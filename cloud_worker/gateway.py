"""The cloud gateway: a grpc.aio server in front of the Ray Serve denoiser deployment.

It serves ``HybridDiffusion`` (cloud steps on Ray, the rest on the edge worker over gRPC) and
``CloudDenoiser`` (for requests that start at an edge). Ray starts locally unless an address is
given, in which case the gateway joins that cluster as a node offering no resources, and the
deployment's replicas run on its cloud nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc
import psutil
import ray
from ray import serve

from cloud_worker.deployment import APP_NAME, RayCloudClient, ReplicaConfig, bind, running_replicas
from cloud_worker.ray_node import (
    START_ATTEMPTS,
    RayNode,
    joined_node,
    run_workers_at_normal_priority,
    start_timed_out,
)
from hybrid_sd.credentials import Security
from hybrid_sd.limits import RequestLimits
from hybrid_sd.orchestrate import ServerGeneration
from hybrid_sd.presets import PairSpec
from hybrid_sd.rpc_clients import GrpcEdgeClient, open_channel
from hybrid_sd.rpc_server import (
    CLOUD_DENOISER,
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
from hybrid_sd.wire import denoise_from_pb, handoff_to_pb

logger = logging.getLogger(__name__)

REPLICA_CHECK_INTERVAL_S = 1.0


@dataclass
class GatewayConfig:
    pair_name: str
    pair: PairSpec
    edge: str  # HOST:PORT of the edge worker
    host: str = "127.0.0.1"
    port: int = 50051
    ray_address: str | None = None  # None: start Ray in this process
    ray_num_cpus: int | None = None  # for a local Ray
    ray_temp_dir: Path | None = None  # for the node that joins the cluster at ray_address
    ray_start_args: str = ""  # more `ray start` flags for that node
    replicas: ReplicaConfig = field(default_factory=ReplicaConfig)
    device: str = "cpu"
    dtype: str = "float32"
    security: Security = field(default_factory=Security)
    edge_token: str | None = None
    limits: RequestLimits = field(default_factory=RequestLimits)
    http_port: int | None = None  # the HTTP face's (0: any free port); None: no HTTP
    ray_log_level: int = logging.ERROR  # Ray's and Serve's logging in this process (their own handlers)
    switch_profile: SwitchProfile | None = None  # quality against switch step, for auto_switch requests


class GatewayCloudDenoiserServicer(pb_grpc.CloudDenoiserServicer):
    """The cloud half for edge-initiated requests; a request over the limits never reaches a replica."""

    def __init__(self, cloud: RayCloudClient, limits: RequestLimits):
        self.cloud, self.limits = cloud, limits

    def _denoise(self, message: pb.DenoiseRequest, context: grpc.aio.ServicerContext):
        request, edge = denoise_from_pb(message)
        self.limits.check(request)
        return partial(self.cloud.denoise, request, edge, deadline_of(context))

    async def Denoise(self, request: pb.DenoiseRequest, context: grpc.aio.ServicerContext) -> pb.Handoff:
        return handoff_to_pb(await self._denoise(request, context)())

    async def DenoiseStream(
        self, request: pb.DenoiseRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DenoiseEvent]:
        async for event in as_events(self._denoise(request, context), pb.DenoiseEvent, "handoff", handoff_to_pb):
            yield event


def deploy(config: GatewayConfig, resources: ExitStack):
    """Connect to (or start) Ray and run the denoiser application; returns its handle once every
    replica has loaded the model. A node started to join a cluster stops when ``resources`` closes."""
    if not ray.is_initialized():
        _init_ray(**resources.enter_context(_ray_connection(config)), logging_level=config.ray_log_level)
    logging.getLogger("ray.serve").setLevel(config.ray_log_level)
    # The replicas are reached through handles only: no HTTP proxies, which would take port 8000 on every node.
    serve.start(proxy_location="Disabled")
    application = bind(config.pair, config.replicas, config.device, config.dtype, config.limits)
    return serve.run(application, name=APP_NAME, route_prefix=None)


@contextmanager
def _ray_connection(config: GatewayConfig) -> Iterator[dict]:
    """``ray.init``'s arguments for this gateway's driver: a Ray started here, a Ray Client address, or
    the cluster at ``config.ray_address`` through a node of this gateway's own, kept for the block."""
    address = config.ray_address
    if not address or address.startswith("ray://"):
        yield {"address": address, "num_cpus": config.ray_num_cpus if address is None else None}
        return
    # A driver connects through a raylet on its own host: join the cluster as a node that offers
    # no resources, so every replica runs on the cloud nodes, and attach to that node (its temp dir).
    node = RayNode(address, config.ray_temp_dir, config.ray_start_args)
    with joined_node(node, "--num-cpus", "0", "--num-gpus", "0") as joined:
        yield {"address": address, "_temp_dir": str(joined.temp_dir)}


def _init_ray(**kwargs) -> None:
    """``ray.init``, tried again when a local node misses one of Ray's start-up windows (its raylet's fixed
    30 s registration, the GCS port file), which a busy machine (models loading beside it on two cores) can
    make it miss; the GCS window, which Ray lets one set, is widened unless the environment sets it."""
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
    run_workers_at_normal_priority()
    # Serve's controller reconciles every 0.1 s, each time asking the GCS for every node's resources: 5% of
    # a core on an idle 2-core machine, with the GCS's share on top, taken from the replica's intra-op
    # threads. Every 0.5 s is prompt enough for replicas that report their health every 2 s.
    os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5")
    for attempt in range(1, START_ATTEMPTS + 1):
        before = {child.pid for child in psutil.Process().children(recursive=True)}
        try:
            ray.init(**kwargs, include_dashboard=False, log_to_driver=False)
            return
        except Exception as error:  # Ray raises a bare Exception or a RuntimeError for these timeouts
            if not start_timed_out(str(error)) or attempt == START_ATTEMPTS:
                raise
            logger.warning("Ray node start timed out (attempt %d of %d); again", attempt, START_ATTEMPTS)
            ray.shutdown()
            _stop_new_children(before)  # what the failed attempt started (GCS, monitors) must not linger


async def _follow_replicas(server: RunningServer, cloud: RayCloudClient) -> None:
    """Health follows the denoiser: NOT_SERVING while no replica runs, SERVING once Ray has replaced it."""
    while True:
        await asyncio.sleep(REPLICA_CHECK_INTERVAL_S)
        try:
            alive = await asyncio.to_thread(running_replicas) > 0
        except Exception as error:  # noqa: BLE001 - the controller itself may be restarting
            logger.warning("cannot read the denoiser's status: %s", error)
            alive = False
        if alive != cloud.alive:
            cloud.set_alive(alive)
            await server.set_serving(alive)
            logger.warning("denoiser replicas %s", "running again: SERVING" if alive else "all down: NOT_SERVING")


def _stop_new_children(before: set[int]) -> None:
    new = [child for child in psutil.Process().children(recursive=True) if child.pid not in before]
    for child in new:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(new, timeout=10)


@asynccontextmanager
async def running_gateway(config: GatewayConfig) -> AsyncIterator[RunningServer]:
    """Serve until the block exits; health turns SERVING once the replicas have loaded the model."""
    cloud = RayCloudClient()
    edge = GrpcEdgeClient(open_channel(config.edge, config.security.peer_credentials()), config.edge_token)
    metrics = ServiceMetrics()
    metrics.watch_queue(lambda: cloud.pending)
    policy = SwitchPolicy(
        config.switch_profile,
        lambda: cloud.pending,
        lambda: None if cloud.alive else "no cloud replica running",
        config.replicas.replicas,
        lambda: edge.in_flight,
    )
    metrics.watch_switch(policy.inputs)
    generate = metrics.measured(ServerGeneration(cloud, edge, config.pair_name, config.limits, chooser=policy))

    def register(server: grpc.aio.Server) -> None:
        pb_grpc.add_HybridDiffusionServicer_to_server(HybridDiffusionServicer(generate), server)
        pb_grpc.add_CloudDenoiserServicer_to_server(GatewayCloudDenoiserServicer(cloud, config.limits), server)

    server = await start_server(
        "gateway",
        register,
        (HYBRID_DIFFUSION, CLOUD_DENOISER),
        config.host,
        config.port,
        config.security,
        partial(metrics.count, "grpc"),
    )
    started_ray = not ray.is_initialized()
    watcher = None
    ray_node = ExitStack()
    http = AsyncExitStack()
    try:
        with stage(f"starting Ray and the denoiser replicas of {config.pair.cloud}"):
            cloud.attach(await asyncio.to_thread(deploy, config, ray_node))
        server.http_port = await http.enter_async_context(
            http_face("gateway", generate, metrics, config.host, config.http_port, config.security)
        )
        await server.set_serving()
        watcher = asyncio.create_task(_follow_replicas(server, cloud))
        yield server
    finally:
        if watcher is not None:
            watcher.cancel()
        # Ray's C++ failure handler (absl's) answers a SIGTERM with an abort 3 s later (an alarm), which
        # would cut this shutdown short and leave Ray's processes behind: the gateway stops in order instead.
        signal.alarm(0)
        await http.aclose()
        await server.stop()
        if ray.is_initialized():
            await asyncio.to_thread(serve.delete, APP_NAME)
            if started_ray:
                await asyncio.to_thread(ray.shutdown)
        await asyncio.to_thread(ray_node.close)
