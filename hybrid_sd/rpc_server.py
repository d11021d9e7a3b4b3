"""gRPC server plumbing shared by the gateway and the edge worker: servers with health, reflection,
auth and error mapping (docs/design.md, "Error semantics")."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hybrid_sd.credentials import Security
from hybrid_sd.errors import (
    CloudUnavailableError,
    DeadlineExceededError,
    IncompatibleModelsError,
    NonFiniteLatentsError,
    NotReadyError,
    QueueFullError,
    RunCancelledError,
)
from hybrid_sd.limits import CHANNEL_OPTIONS
from hybrid_sd.orchestrate import Generate
from hybrid_sd.ports import check_can_listen
from hybrid_sd.streams import as_events
from hybrid_sd.v1 import hybrid_sd_pb2 as pb
from hybrid_sd.v1 import hybrid_sd_pb2_grpc as pb_grpc
from hybrid_sd.wire import call_from_pb, result_to_pb

logger = logging.getLogger(__name__)

HYBRID_DIFFUSION = pb.DESCRIPTOR.services_by_name["HybridDiffusion"].full_name
CLOUD_DENOISER = pb.DESCRIPTOR.services_by_name["CloudDenoiser"].full_name
EDGE_REFINER = pb.DESCRIPTOR.services_by_name["EdgeRefiner"].full_name
# Probes and tooling must work without a token (compose healthchecks, grpcurl list).
_OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# Hears the status of every call a server answers: (method, status code name).
StatusReport = Callable[[str, str], None]


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """A call's deadline on the wall clock; None without one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.time() + remaining


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
        (NotReadyError, grpc.StatusCode.UNAVAILABLE),
        (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (NonFiniteLatentsError, grpc.StatusCode.INTERNAL),
        # A method the servicer leaves to its generated base (grpc_health's aio servicer has no List).
        (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
    ):
        if isinstance(error, error_type):
            return code, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


class HybridDiffusionServicer(pb_grpc.HybridDiffusionServicer):
    """``HybridDiffusion`` over a server's one generation (the gateway's and the edge worker's)."""

    def __init__(self, generate: Generate):
        self.generate = generate

    def _call(self, message: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        """The generation a call asks for, waiting only for ``on_progress``."""
        request, options = call_from_pb(message)
        return partial(self.generate, request, options, deadline_of(context))

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        return result_to_pb(await self._call(request, context)())

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        async for event in as_events(self._call(request, context), pb.GenerateEvent, "result", result_to_pb):
            yield event


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions escaping a servicer into status codes, so a bad request never surfaces as
    UNKNOWN and never takes the server down.

    Request bytes are parsed inside the wrapped handler, not by grpc.aio before it: undecodable
    bytes are a bad request (INVALID_ARGUMENT), on every method of every service."""

    def __init__(self, on_status: StatusReport | None = None):
        self._report = on_status or (lambda method, status: None)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        parse = _parser(method, handler.request_deserializer)
        report = self._report

        @contextlib.asynccontextmanager
        async def statuses(context: grpc.aio.ServicerContext):
            """Every exception but an abort or a cancellation leaves as the status it maps to; each call's
            status is reported."""
            try:
                yield
            except asyncio.CancelledError:
                report(method, grpc.StatusCode.CANCELLED.name)
                raise
            except grpc.aio.AbortError:
                code = context.code()
                report(method, code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN")
                raise
            except Exception as error:  # noqa: BLE001 - every error must become a status
                code, details = status_for(error)
                if code == grpc.StatusCode.INTERNAL and not isinstance(error, NonFiniteLatentsError):
                    logger.exception("%s failed", method)
                else:
                    logger.info("%s: %s: %s", method, code.name, details)
                report(method, code.name)
                await context.abort(code, details)
            else:
                report(method, grpc.StatusCode.OK.name)

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

    def __init__(self, token: str, on_status: StatusReport | None = None):
        self._expected = f"Bearer {token}".encode()
        self._report = on_status or (lambda method, status: None)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(_OPEN_SERVICES):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if token_matches(str(metadata.get("authorization", "")), self._expected):
            return await continuation(handler_call_details)
        self._report(method, grpc.StatusCode.UNAUTHENTICATED.name)
        return _unauthenticated_handler(await continuation(handler_call_details))


def token_matches(authorization: str, expected: bytes) -> bool:
    """Whether an ``authorization`` header is ``expected`` (``Bearer <token>``), in constant time."""
    return hmac.compare_digest(authorization.encode(), expected)


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
    http_port: int = 0  # the HTTP face's, where one runs beside

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
    on_status: StatusReport | None = None,
) -> RunningServer:
    """Start the ``name`` server (as error messages call it) on ``host:port`` (port 0: any free port) with the
    standard services; health says NOT_SERVING until :meth:`RunningServer.set_serving` (once the models are
    loaded). ``on_status`` hears the status of every call."""
    security.check()
    check_can_listen(host, port, name)
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if security.token:
        interceptors.append(BearerTokenInterceptor(security.token, on_status))
    interceptors.append(ErrorMappingInterceptor(on_status))
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
