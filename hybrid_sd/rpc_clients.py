"""gRPC clients: channels to hybrid-sd servers, and the remote cloud and edge halves (the
``CloudHalf`` and ``EdgeHalf`` of :mod:`hybrid_sd.orchestrate`, over the wire)."""

from __future__ import annotations

import contextlib
import logging
import time

import grpc

from hybrid_sd.edge_profile import EdgeProfile
from hybrid_sd.errors import CloudUnavailableError, DeadlineExceededError
from hybrid_sd.lane import ProgressCallback
from hybrid_sd.limits import CHANNEL_OPTIONS
from hybrid_sd.request import GenerationRequest
from hybrid_sd.results import EdgeResult, Handoff, OutputSpec
from hybrid_sd.v1 import hybrid_sd_pb2 as pb
from hybrid_sd.v1 import hybrid_sd_pb2_grpc as pb_grpc
from hybrid_sd.wire import (
    denoise_to_pb,
    edge_profile_from_pb,
    edge_result_from_pb,
    handoff_from_pb,
    progress_from_pb,
    refine_to_pb,
)

logger = logging.getLogger(__name__)


def open_channel(target: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    """A channel to a hybrid-sd server: TLS with ``credentials``, else plaintext."""
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def seconds_left(deadline: float | None) -> float | None:
    """Time to a wall-clock deadline; raises DeadlineExceededError once it has passed."""
    if deadline is None:
        return None
    left = deadline - time.time()
    if left <= 0:
        raise DeadlineExceededError("deadline exceeded")
    return left


class GrpcCloudClient:
    """Steps [0, k) on a remote gateway's CloudDenoiser."""

    def __init__(self, channel: grpc.aio.Channel, token: str | None = None):
        self._channel = channel
        self._stub = pb_grpc.CloudDenoiserStub(channel)
        self._metadata = call_metadata(token)
        self.in_flight = 0  # calls waiting for their handoff

    @property
    def reachable(self) -> bool:
        """False while the channel is failing to connect (it keeps trying, so this turns True when it can)."""
        down = (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN)
        return self._channel.get_state(try_to_connect=True) not in down

    async def denoise(
        self,
        request: GenerationRequest,
        edge: EdgeProfile | None,
        deadline: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Handoff:
        call = denoise_to_pb(request, edge)
        self.in_flight += 1
        try:
            with _peer_errors("cloud"):
                stub = self._stub
                message = await _reporting_call(
                    stub.Denoise, stub.DenoiseStream, call, deadline, self._metadata, on_progress
                )
        finally:
            self.in_flight -= 1
        return handoff_from_pb(message)


# How long a caller waits for an edge to describe itself (answered at once by a running worker).
DESCRIBE_TIMEOUT_S = 5.0


class GrpcEdgeClient:
    """Steps [k, N) and the decode on a remote edge worker's EdgeRefiner. It remembers the worker's
    profile: asked for with Describe when unknown, then taken from each result, so a worker restarted
    with other models is seen at its first answer."""

    def __init__(self, channel: grpc.aio.Channel, token: str | None = None):
        self._stub = pb_grpc.EdgeRefinerStub(channel)
        self._metadata = call_metadata(token)
        self._profile: EdgeProfile | None = None
        self.in_flight = 0  # calls waiting for their result

    async def describe(self, deadline: float | None = None) -> EdgeProfile:
        """The worker's profile as of its last answer, else asked for."""
        if self._profile is None:
            timeout = DESCRIBE_TIMEOUT_S
            if deadline is not None:
                timeout = min(timeout, max(0.0, deadline - time.time()))
            with _peer_errors("edge"):
                message = await self._stub.Describe(pb.DescribeRequest(), timeout=timeout, metadata=self._metadata)
            self._profile = edge_profile_from_pb(message)
        return self._profile

    async def refine(
        self,
        start: Handoff | GenerationRequest,
        output: OutputSpec,
        deadline: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> EdgeResult:
        self.in_flight += 1
        try:
            with _peer_errors("edge"):
                stub = self._stub
                message = await _reporting_call(
                    stub.Refine, stub.RefineStream, refine_to_pb(start, output), deadline, self._metadata, on_progress
                )
        except Exception:
            self._profile = None  # the worker may be restarting, perhaps with other models: ask again
            raise
        finally:
            self.in_flight -= 1
        result = edge_result_from_pb(message)
        self._profile = result.profile
        return result


async def _reporting_call(unary, streaming, message, deadline, metadata, on_progress):
    """The unary call, or, to report progress, its streaming twin: hand each progress event to
    ``on_progress`` and return the final message (the event's other field)."""
    if on_progress is None:
        return await unary(message, timeout=seconds_left(deadline), metadata=metadata)
    async for event in streaming(message, timeout=seconds_left(deadline), metadata=metadata):
        kind = event.WhichOneof("event")
        if kind != "progress":
            return getattr(event, kind)
        on_progress(progress_from_pb(event.progress))
    raise RuntimeError("the stream ended without its result")


@contextlib.contextmanager
def _peer_errors(peer: str):
    """A peer's DEADLINE_EXCEEDED, and an unreachable cloud, as library errors (which decide a
    fallback); any other status passes through unchanged."""
    try:
        yield
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise DeadlineExceededError(f"{peer}: {error.details()}") from error
        if error.code() == grpc.StatusCode.UNAVAILABLE and peer == "cloud":
            raise CloudUnavailableError(f"cloud unreachable: {error.details()}") from error
        raise
