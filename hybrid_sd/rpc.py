"""gRPC plumbing shared by the gateway and the edge worker: servers with health, reflection, auth
and error mapping; channels and the remote cloud and edge clients."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hybrid_sd.credentials import check_certificate, check_token
from hybrid_sd.errors import (
    CloudUnavailableError,
    DeadlineExceededError,
    IncompatibleModelsError,
    NonFiniteLatentsError,
    QueueFullError,
    RunCancelledError,
)
from hybrid_sd.limits import MAX_MESSAGE_BYTES
from hybrid_sd.ports import check_can_listen
from hybrid_sd.v1 import hybrid_sd_pb2 as pb
from hybrid_sd.v1 import hybrid_sd_pb2_grpc as pb_grpc

ProgressCallback = Callable[[pb.Progress], None]

logger = logging.getLogger(__name__)

HYBRID_DIFFUSION = pb.DESCRIPTOR.services_by_name["HybridDiffusion"].full_name
CLOUD_DENOISER = pb.DESCRIPTOR.services_by_name["CloudDenoiser"].full_name
EDGE_REFINER = pb.DESCRIPTOR.services_by_name["EdgeRefiner"].full_name
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# Probes and tooling must work without a token (compose healthchecks, grpcurl list).
_OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class Security:
    """Bearer-token auth and TLS (with a client CA: mutual TLS); all off by default.

    ``tls_ca`` verifies the servers this one calls (gateway and edge call each other); when set,
    those calls present ``tls_cert``/``tls_key`` as the client certificate.
    """

    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    tls_ca: Path | None = None

    @classmethod
    def from_env(cls) -> Security:
        def path(name: str) -> Path | None:
            return Path(os.environ[name]) if os.environ.get(name) else None

        return cls(
            token=os.environ.get("HYBRID_SD_TOKEN") or None,
            tls_cert=path("HYBRID_SD_TLS_CERT"),
            tls_key=path("HYBRID_SD_TLS_KEY"),
            tls_client_ca=path("HYBRID_SD_TLS_CLIENT_CA"),
            tls_ca=path("HYBRID_SD_TLS_CA"),
        )

    def check(self) -> None:
        check_token(self.token)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "tls_ca"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {str(path)!r} is not a file")
        check_certificate("tls_cert", self.tls_cert, self.tls_key)
        check_certificate("tls_client_ca", self.tls_client_ca)
        check_certificate("tls_ca", self.tls_ca)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert is None:
            return None
        client_ca = self.tls_client_ca.read_bytes() if self.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(self.tls_key.read_bytes(), self.tls_cert.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )

    def peer_channel(self, target: str) -> grpc.aio.Channel:
        """A channel to another hybrid-sd server, with this server's TLS identity when TLS is on."""
        return open_channel(target, self.tls_ca, self.tls_cert, self.tls_key)


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a library error is reported with (docs/design.md, "Error semantics")."""
    if isinstance(error, grpc.aio.AioRpcError):  # a downstream call failed: pass its status on
        return error.code(), error.details() or ""
    for error_type, code in (
        (IncompatibleModelsError, grpc.StatusCode.FAILED_PRECONDITION),
        (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
        (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
        (RunCancelledError, grpc.StatusCode.CANCELLED),
        (CloudUnavailableError, grpc.StatusCode.UNAVAILABLE),
        (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (NonFiniteLatentsError, grpc.StatusCode.INTERNAL),
        # A method the servicer leaves to its generated base (grpc_health's aio servicer has no List).
        (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
    ):
        if isinstance(error, error_type):
            return code, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions escaping a servicer into status codes, so a bad request never surfaces as
    UNKNOWN and never takes the server down.

    Request bytes are parsed inside the wrapped handler, not by grpc.aio before it: undecodable
    bytes are a bad request (INVALID_ARGUMENT), on every method of every service."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        parse = _parser(method, handler.request_deserializer)

        @contextlib.asynccontextmanager
        async def statuses(context: grpc.aio.ServicerContext):
            """Every exception but an abort or a cancellation leaves as the status it maps to."""
            try:
                yield
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as error:  # noqa: BLE001 - every error must become a status
                code, details = status_for(error)
                if code == grpc.StatusCode.INTERNAL and not isinstance(error, NonFiniteLatentsError):
                    logger.exception("%s failed", method)
                else:
                    logger.info("%s: %s: %s", method, code.name, details)
                await context.abort(code, details)

        serialize = handler.response_serializer
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request: bytes, context):
                async with statuses(context):
                    response = inner(parse(request), context)
                    return await response if inspect.isawaitable(response) else response

            return grpc.unary_unary_rpc_method_handler(unary_unary, None, serialize)

        if handler.unary_stream and inspect.iscoroutinefunction(handler.unary_stream):
            inner_writer = handler.unary_stream  # writes with context.write(), as grpc_health's Watch

            async def unary_stream_writer(request: bytes, context):
                async with statuses(context):
                    await inner_writer(parse(request), context)

            return grpc.unary_stream_rpc_method_handler(unary_stream_writer, None, serialize)

        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def unary_stream(request: bytes, context):
                async with statuses(context):
                    async for response in inner_stream(parse(request), context):
                        yield response

            return grpc.unary_stream_rpc_method_handler(unary_stream, None, serialize)

        if handler.stream_stream:  # server reflection
            inner_bidi = handler.stream_stream

            async def stream_stream(requests, context):
                async with statuses(context):
                    async for response in inner_bidi((parse(request) async for request in requests), context):
                        yield response

            return grpc.stream_stream_rpc_method_handler(stream_stream, None, serialize)
        return handler


def _parser(method: str, deserializer: Callable[[bytes], object] | None) -> Callable[[bytes], object]:
    """``deserializer`` raising ValueError (INVALID_ARGUMENT) for bytes that are not its message."""
    if deserializer is None:
        return lambda request: request

    def parse(request: bytes) -> object:
        try:
            return deserializer(request)
        except DecodeError as error:
            raise ValueError(f"request to {method} is not a valid protobuf message: {error}") from None

    return parse


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless the call carries ``authorization: Bearer <token>``."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(_OPEN_SERVICES):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if hmac.compare_digest(str(metadata.get("authorization", "")).encode(), self._expected):
            return await continuation(handler_call_details)
        return _unauthenticated_handler(await continuation(handler_call_details))


def _unauthenticated_handler(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler:
    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    if handler is not None and handler.unary_stream:

        async def deny_stream(request, context):
            await deny(request, context)
            yield  # pragma: no cover - unreachable, makes this an async generator

        return grpc.unary_stream_rpc_method_handler(
            deny_stream, handler.request_deserializer, handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(
        deny,
        handler.request_deserializer if handler else None,
        handler.response_serializer if handler else None,
    )


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: tuple[str, ...]

    async def set_serving(self, serving: bool = True) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking calls and let in-flight ones finish for up to ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(
    name: str,
    register: Callable[[grpc.aio.Server], None],
    service_names: tuple[str, ...],
    host: str,
    port: int,
    security: Security = Security(),
) -> RunningServer:
    """Start the ``name`` server (as error messages call it) on ``host:port`` (port 0: any free port) with the
    standard services; health says NOT_SERVING until :meth:`RunningServer.set_serving` (once the models are
    loaded)."""
    security.check()
    check_can_listen(host, port, name)
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if security.token:
        interceptors.append(BearerTokenInterceptor(security.token))
    interceptors.append(ErrorMappingInterceptor())
    server = grpc.aio.server(interceptors=interceptors, options=CHANNEL_OPTIONS)
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    credentials = security.server_credentials()
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    await server.start()
    running = RunningServer(server, bound, health_servicer, service_names)
    await running.set_serving(False)
    return running


def open_channel(
    target: str, tls_ca: Path | None = None, client_cert: Path | None = None, client_key: Path | None = None
) -> grpc.aio.Channel:
    if tls_ca is None:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    check_certificate("tls_ca", tls_ca)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls_ca.read_bytes(),
        private_key=client_key.read_bytes() if client_key else None,
        certificate_chain=client_cert.read_bytes() if client_cert else None,
    )
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
        self._stub = pb_grpc.CloudDenoiserStub(channel)
        self._metadata = call_metadata(token)

    async def denoise(
        self, request: pb.DenoiseRequest, deadline: float | None, on_progress: ProgressCallback | None = None
    ) -> pb.Handoff:
        with _peer_errors("cloud"):
            stub = self._stub
            return await _reporting_call(
                stub.Denoise, stub.DenoiseStream, request, deadline, self._metadata, on_progress, "handoff"
            )


# How long a gateway waits for an edge's profile before it sends a full handoff instead.
PROFILE_TIMEOUT_S = 5.0


class GrpcEdgeClient:
    """Steps [k, N) and the decode on a remote edge worker's EdgeRefiner. It remembers the worker's
    profile for lean handoffs: asked for with Describe when unknown, then taken from each result, so
    a worker restarted with other models is seen at its first answer."""

    def __init__(self, channel: grpc.aio.Channel, token: str | None = None):
        self._stub = pb_grpc.EdgeRefinerStub(channel)
        self._metadata = call_metadata(token)
        self._profile: pb.EdgeProfile | None = None

    async def profile(self, deadline: float | None) -> pb.EdgeProfile | None:
        """The worker's profile as of its last answer, else asked for; None if it cannot say now."""
        if self._profile is None:
            timeout = PROFILE_TIMEOUT_S
            if deadline is not None:
                timeout = min(timeout, max(0.0, deadline - time.time()))
            try:
                describe = self._stub.Describe(pb.DescribeRequest(), timeout=timeout, metadata=self._metadata)
                self._profile = await describe
            except grpc.aio.AioRpcError as error:
                logger.warning("no edge profile (%s: %s): sending a full handoff", error.code().name, error.details())
        return self._profile

    async def refine(
        self, request: pb.RefineRequest, deadline: float | None, on_progress: ProgressCallback | None = None
    ) -> pb.ImageResult:
        try:
            with _peer_errors("edge"):
                stub = self._stub
                result = await _reporting_call(
                    stub.Refine, stub.RefineStream, request, deadline, self._metadata, on_progress, "result"
                )
        except Exception:
            self._profile = None  # the worker may be restarting, perhaps with other models: ask again
            raise
        self._profile = result.edge_profile if result.HasField("edge_profile") else None
        return result


async def _reporting_call(unary, streaming, message, deadline, metadata, on_progress, final_field: str):
    """The unary call, or, to report progress, its streaming twin: hand each progress event to
    ``on_progress`` and return the final message."""
    if on_progress is None:
        return await unary(message, timeout=seconds_left(deadline), metadata=metadata)
    async for event in streaming(message, timeout=seconds_left(deadline), metadata=metadata):
        if event.HasField(final_field):
            return getattr(event, final_field)
        on_progress(event.progress)
    raise RuntimeError(f"the stream ended without its {final_field}")


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
