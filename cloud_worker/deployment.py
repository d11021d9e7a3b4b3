"""The large-model denoiser as a Ray Serve deployment: steps [0, k) of a request per call.

Requests and handoffs cross Ray as serialized protobuf bytes, so nothing of ours is pickled.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from functools import partial

import torch
from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import BackPressureError, RayServeException

from hybrid_sd.errors import CloudUnavailableError, DeadlineExceededError, QueueFullError, RunCancelledError
from hybrid_sd.pairs import load_cloud
from hybrid_sd.presets import PairSpec
from hybrid_sd.rpc import ProgressCallback, seconds_left
from hybrid_sd.service import ComputeLane, as_events, cloud_denoise, with_progress
from hybrid_sd.v1 import hybrid_sd_pb2 as pb

APP_NAME = "hybrid-sd-cloud"


# A replica denoises one request at a time (its ComputeLane) but accepts a few more, so the next one
# is already waiting when the lane frees: measured 1.04x the sequential rate with 8 clients on one
# replica, against 0.63x when Serve's router held every request until the replica was idle.
@serve.deployment(name="CloudDenoiser", max_ongoing_requests=4)
class CloudDenoiserDeployment:
    """One replica holds the large model and denoises one request at a time."""

    def __init__(self, pair: dict, device: str, dtype: str, torch_threads: int):
        # Ray limits an actor to OMP_NUM_THREADS=num_cpus; CPU kernels reduce in a thread-count
        # dependent order, so a bit-exact handoff needs the thread count the edge uses.
        torch.set_num_threads(torch_threads)
        self.denoiser = load_cloud(PairSpec(**pair), device, getattr(torch, dtype))
        self.lane = ComputeLane()
        self.replica = serve.get_replica_context().replica_tag

    async def _denoise(
        self, request: bytes, deadline: float | None, on_progress: ProgressCallback | None = None
    ) -> pb.Handoff:
        work = partial(cloud_denoise, self.denoiser, pb.DenoiseRequest.FromString(request), self.replica)
        return await self.lane.run(work, deadline, on_progress, "cloud_denoise")

    async def denoise(self, request: bytes, deadline: float | None) -> bytes:
        return (await self._denoise(request, deadline)).SerializeToString()

    async def denoise_stream(self, request: bytes, deadline: float | None) -> AsyncIterator[bytes]:
        """Serialized DenoiseEvents: one per UNet evaluation, then the handoff."""
        events = as_events(with_progress(partial(self._denoise, request, deadline)), pb.DenoiseEvent, "handoff")
        async for event in events:
            yield event.SerializeToString()


@dataclasses.dataclass(frozen=True)
class ReplicaConfig:
    replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    max_queued_requests: int = 64
    autoscale_to: int | None = None  # with a maximum, replicas scale between `replicas` and it
    # Intra-op threads per replica; the default is torch's (physical cores), like any other process.
    torch_threads: int = dataclasses.field(default_factory=torch.get_num_threads)


def bind(pair: PairSpec, replicas: ReplicaConfig, device: str, dtype: str):
    """The Serve application for ``serve.run``."""
    options = dict(
        ray_actor_options={"num_gpus": replicas.gpus_per_replica, "num_cpus": replicas.cpus_per_replica},
        max_queued_requests=replicas.max_queued_requests,
    )
    if replicas.autoscale_to:
        options["autoscaling_config"] = {
            "min_replicas": replicas.replicas,
            "max_replicas": replicas.autoscale_to,
            "target_ongoing_requests": 1,
        }
    else:
        options["num_replicas"] = replicas.replicas
    return CloudDenoiserDeployment.options(**options).bind(
        dataclasses.asdict(pair), device, dtype, replicas.torch_threads
    )


class RayCloudClient:
    """Steps [0, k) on the Serve deployment, through its handle."""

    def __init__(self, handle=None):
        self._handle = handle

    def attach(self, handle) -> None:
        self._handle = handle

    async def denoise(
        self, request: pb.DenoiseRequest, deadline: float | None, on_progress: ProgressCallback | None = None
    ) -> pb.Handoff:
        if self._handle is None:
            raise CloudUnavailableError("the cloud denoiser is still deploying")
        if on_progress is None:
            response = self._handle.denoise.remote(request.SerializeToString(), deadline)
            receive = response
        else:
            response = self._handle.options(stream=True).denoise_stream.remote(request.SerializeToString(), deadline)
            receive = _handoff_after_progress(response, on_progress)
        try:
            data = await asyncio.wait_for(receive, timeout=seconds_left(deadline))
        except TimeoutError as error:
            response.cancel()
            raise DeadlineExceededError("deadline exceeded waiting for the cloud denoiser") from error
        except asyncio.CancelledError:
            response.cancel()  # the caller went away: free the replica at the next step
            raise
        except BackPressureError as error:
            raise QueueFullError(f"cloud denoiser queue is full: {error}") from error
        except RayTaskError as error:
            if isinstance(error.cause, ValueError | DeadlineExceededError | RunCancelledError):
                raise error.cause from None  # a bad request or an expired one: the replica is fine
            raise RuntimeError(f"cloud denoiser failed: {error.cause!r}") from error
        except (RayError, RayServeException) as error:
            raise CloudUnavailableError(f"cloud denoiser unavailable: {error}") from error
        return pb.Handoff.FromString(data)


async def _handoff_after_progress(events, on_progress: ProgressCallback) -> bytes:
    """Report the stream's progress events; return the handoff's bytes."""
    async for data in events:
        event = pb.DenoiseEvent.FromString(data)
        if event.HasField("handoff"):
            return event.handoff.SerializeToString()
        on_progress(event.progress)
    raise CloudUnavailableError("the cloud denoiser's stream ended without a handoff")
