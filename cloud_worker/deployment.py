"""The large-model denoiser as a Ray Serve deployment: steps [0, k) of a request per call.

Requests and handoffs cross Ray as serialized protobuf bytes, so nothing of ours is pickled. A request
the replica refuses (a bad field, past its deadline, cancelled) comes back as a value, not an exception:
Ray Serve logs every exception a replica raises with its traceback, and a refusal is not a failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from functools import partial

import ray
import torch
from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.context import _get_global_client
from ray.serve.exceptions import BackPressureError, RayServeException

from hybrid_sd.edge_profile import EdgeProfile
from hybrid_sd.errors import (
    CloudUnavailableError,
    DeadlineExceededError,
    IncompatibleModelsError,
    QueueFullError,
    RunCancelledError,
)
from hybrid_sd.halves import LocalCloud
from hybrid_sd.lane import ComputeLane, ProgressCallback
from hybrid_sd.limits import RequestLimits
from hybrid_sd.pairs import load_cloud
from hybrid_sd.presets import PairSpec
from hybrid_sd.request import GenerationRequest
from hybrid_sd.results import Handoff
from hybrid_sd.rpc_clients import seconds_left
from hybrid_sd.streams import as_events
from hybrid_sd.v1 import hybrid_sd_pb2 as pb
from hybrid_sd.wire import denoise_from_pb, denoise_to_pb, handoff_from_pb, handoff_to_pb, progress_from_pb

logger = logging.getLogger(__name__)

APP_NAME = "hybrid-sd-cloud"
DEPLOYMENT_NAME = "CloudDenoiser"
# What a replica answers with instead of raising: (error class name, message).
Rejection = tuple[str, str]
# The errors a replica refuses a request with, most specific first.
REJECTED = {
    error.__name__: error for error in (IncompatibleModelsError, ValueError, DeadlineExceededError, RunCancelledError)
}


# Health checks every 2 s (Serve's default is 10 s): a dead replica is noticed, and replaced, sooner.
# max_ongoing_requests is set by bind(), from the batch size.
@serve.deployment(name=DEPLOYMENT_NAME, health_check_period_s=2)
class CloudDenoiserDeployment:
    """One replica holds the large model and denoises the requests it holds in shared UNet calls (its
    compute lane batches their steps)."""

    def __init__(
        self, pair: dict, device: str, dtype: str, torch_threads: int, limits: dict, max_batch: int, batch_wait_s: float
    ):
        # Ray limits an actor to OMP_NUM_THREADS=num_cpus; CPU kernels reduce in a thread-count
        # dependent order, so a bit-exact handoff needs the thread count the edge uses.
        torch.set_num_threads(torch_threads)
        denoiser = load_cloud(PairSpec(**pair), device, getattr(torch, dtype))
        denoiser.limits = RequestLimits(**limits)
        replica, node = serve.get_replica_context().replica_tag, ray.get_runtime_context().get_node_id()
        self.half = LocalCloud(denoiser, replica, node, ComputeLane(max_batch, batch_wait_s))

    async def _denoise(
        self, request: bytes, deadline: float | None, on_progress: ProgressCallback | None = None
    ) -> Handoff:
        generation, edge = denoise_from_pb(pb.DenoiseRequest.FromString(request))
        return await self.half.denoise(generation, edge, deadline, on_progress)

    async def denoise(self, request: bytes, deadline: float | None) -> bytes | Rejection:
        try:
            return handoff_to_pb(await self._denoise(request, deadline)).SerializeToString()
        except tuple(REJECTED.values()) as error:
            return _rejection(error)

    async def denoise_stream(self, request: bytes, deadline: float | None) -> AsyncIterator[bytes | Rejection]:
        """Serialized DenoiseEvents: one per UNet evaluation, then the handoff (or a rejection)."""
        events = as_events(partial(self._denoise, request, deadline), pb.DenoiseEvent, "handoff", handoff_to_pb)
        try:
            async for event in events:
                yield event.SerializeToString()
        except tuple(REJECTED.values()) as error:
            yield _rejection(error)


def _rejection(error: Exception) -> Rejection:
    name = next(name for name, kind in REJECTED.items() if isinstance(error, kind))
    logger.info("request refused: %s: %s", name, error)
    return name, str(error)


def _raise_if_rejected(answer: bytes | Rejection) -> bytes:
    if isinstance(answer, tuple):
        name, message = answer
        raise REJECTED[name](message)
    return answer


@dataclasses.dataclass(frozen=True)
class ReplicaConfig:
    replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    max_queued_requests: int = 64
    autoscale_to: int | None = None  # with a maximum, replicas scale between `replicas` and it
    max_replicas_per_node: int | None = None  # e.g. 1: one replica a node, so replicas spread over the nodes
    # Intra-op threads per replica; the default is torch's (physical cores), like any other process.
    torch_threads: int = dataclasses.field(default_factory=torch.get_num_threads)
    max_batch: int = 8  # requests per UNet call (docs/design.md, "Step-level batching")
    batch_wait_s: float = 0.0  # how long an idle replica waits for a batch to fill

    @property
    def max_ongoing_requests(self) -> int:
        """Requests Serve hands a replica at once: twice a batch, so that the next ones already wait on
        the replica when a request leaves the batch, rather than in Serve's router (with 8 a batch, 8 clients
        get 1.79x the throughput of one request a call: benchmarks/batching.py --served)."""
        return 2 * self.max_batch + 2


def bind(pair: PairSpec, replicas: ReplicaConfig, device: str, dtype: str, limits: RequestLimits):
    """The Serve application for ``serve.run``."""
    options = dict(
        ray_actor_options={"num_gpus": replicas.gpus_per_replica, "num_cpus": replicas.cpus_per_replica},
        max_queued_requests=replicas.max_queued_requests,
        max_ongoing_requests=replicas.max_ongoing_requests,
        max_replicas_per_node=replicas.max_replicas_per_node,
    )
    if replicas.autoscale_to:
        options["autoscaling_config"] = {
            "min_replicas": replicas.replicas,
            "max_replicas": replicas.autoscale_to,
            "target_ongoing_requests": replicas.max_batch,  # a replica is busy when its batch is full
        }
    else:
        options["num_replicas"] = replicas.replicas
    return CloudDenoiserDeployment.options(**options).bind(
        dataclasses.asdict(pair),
        device,
        dtype,
        replicas.torch_threads,
        dataclasses.asdict(limits),
        replicas.max_batch,
        replicas.batch_wait_s,
    )


class RayCloudClient:
    """Steps [0, k) on the Serve deployment, through its handle. While no replica is running (``alive``
    false, kept by the gateway) a request is refused at once rather than queued until Ray replaces one."""

    def __init__(self, handle=None):
        self._handle = handle
        self.alive = True
        self._in_flight: set = set()  # responses not yet received

    def attach(self, handle) -> None:
        self._handle = handle

    @property
    def pending(self) -> int:
        """Calls waiting for an answer from the replicas (queued there or running)."""
        return len(self._in_flight)

    def set_alive(self, alive: bool) -> None:
        """Going down cancels the requests waiting for a replica: they answer UNAVAILABLE (or fall back)."""
        self.alive = alive
        if not alive:
            for response in list(self._in_flight):
                response.cancel()

    async def denoise(
        self,
        request: GenerationRequest,
        edge: EdgeProfile | None,
        deadline: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Handoff:
        if self._handle is None:
            raise CloudUnavailableError("the cloud denoiser is still deploying")
        if not self.alive:
            raise CloudUnavailableError("no cloud denoiser replica is running (Ray is replacing it)")
        message = denoise_to_pb(request, edge).SerializeToString()
        if on_progress is None:
            response = self._handle.denoise.remote(message, deadline)
            receive = response
        else:
            response = self._handle.options(stream=True).denoise_stream.remote(message, deadline)
            receive = _handoff_after_progress(response, on_progress)
        self._in_flight.add(response)
        try:
            data = _raise_if_rejected(await asyncio.wait_for(receive, timeout=seconds_left(deadline)))
        except TimeoutError as error:
            response.cancel()
            raise DeadlineExceededError("deadline exceeded waiting for the cloud denoiser") from error
        except asyncio.CancelledError:
            response.cancel()  # the caller went away: free the replica at the next step
            raise
        except BackPressureError as error:
            raise QueueFullError(f"cloud denoiser queue is full: {error}") from error
        except RayTaskError as error:
            raise RuntimeError(f"cloud denoiser failed: {error.cause!r}") from error
        except (RayError, RayServeException) as error:  # a cancelled one too (set_alive)
            raise CloudUnavailableError(f"cloud denoiser unavailable: {error}") from error
        finally:
            self._in_flight.discard(response)
        return handoff_from_pb(pb.Handoff.FromString(data))


async def _handoff_after_progress(events, on_progress: ProgressCallback) -> bytes | Rejection:
    """Report the stream's progress events; return the handoff's bytes (or the replica's rejection)."""
    async for data in events:
        if isinstance(data, tuple):
            return data
        event = pb.DenoiseEvent.FromString(data)
        if event.HasField("handoff"):
            return event.handoff.SerializeToString()
        on_progress(progress_from_pb(event.progress))
    raise CloudUnavailableError("the cloud denoiser's stream ended without a handoff")


def running_replicas() -> int:
    """Replicas of the denoiser that Serve reports RUNNING. Read from the controller's details as it sends
    them: ``serve.status()`` validates them into pydantic models first, which pickles each deployment's
    request router class, 4% of a core at the gateway's one check a second."""
    details = _get_global_client().get_serve_details()
    application = details.get("applications", {}).get(APP_NAME, {})
    replicas = application.get("deployments", {}).get(DEPLOYMENT_NAME, {}).get("replicas", [])
    return sum(replica["state"] == "RUNNING" for replica in replicas)
