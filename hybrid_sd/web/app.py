"""The HTTP application (Starlette) over a server's one generation: ``POST /v1/generate``, ``GET``/``POST
/v1/generate/stream`` (server-sent events), ``POST /sdapi/v1/txt2img``, ``GET /metrics`` and the page at ``/``.

Requests decode through protobuf's JSON mapping into ``GenerateRequest`` and then ``wire.call_from_pb``, as a
gRPC call does: the same fields (``switchStep`` or ``switch_step``), validation, limits and error statuses.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.resources import files

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hybrid_sd.lane import Progress, ProgressCallback
from hybrid_sd.limits import MAX_MESSAGE_BYTES
from hybrid_sd.orchestrate import Generate
from hybrid_sd.request import GenerationRequest
from hybrid_sd.results import CallOptions, GenerationResult
from hybrid_sd.rpc_server import token_matches
from hybrid_sd.service_metrics import CONTENT_TYPE, ServiceMetrics
from hybrid_sd.streams import with_progress
from hybrid_sd.v1 import hybrid_sd_pb2 as pb
from hybrid_sd.web.a1111 import txt2img_answer, txt2img_call
from hybrid_sd.web.statuses import error_body, error_of
from hybrid_sd.wire import call_from_pb, progress_to_pb, result_to_pb

# Seconds a call may take, as gRPC's deadline: past it, 504.
TIMEOUT_HEADER = "x-request-timeout"
STATIC = files("hybrid_sd.web") / "static"

logger = logging.getLogger(__name__)


def http_app(generate: Generate, metrics: ServiceMetrics, token: str | None = None) -> ASGIApp:
    """The HTTP face of a server whose one generation is ``generate``; with ``token``, every route but the
    page's needs ``Authorization: Bearer <token>``."""

    @_refusals
    async def generate_json(request: Request) -> Response:
        deadline = _deadline(request)
        result = await generate(*_call(await _read_json(request)), deadline)
        return JSONResponse(_to_json(result_to_pb(result)))

    @_refusals
    async def generate_stream(request: Request) -> Response:
        deadline = _deadline(request)
        call = _call(await _read_json(request) if request.method == "POST" else _query_fields(request))

        async def run(on_progress: ProgressCallback) -> GenerationResult:
            return await generate(*call, deadline, on_progress)

        events = with_progress(run)
        first = await anext(events)  # a refusal before any work is an HTTP status, not an event
        return StreamingResponse(
            _sse(first, events), media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )

    @_refusals
    async def txt2img(request: Request) -> Response:
        deadline = _deadline(request)
        body = await _read_json(request)
        result = await generate(*txt2img_call(body), deadline)
        return JSONResponse(txt2img_answer(body, result))

    async def scrape(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    async def page(request: Request) -> Response:
        return Response((STATIC / "index.html").read_bytes(), media_type="text/html")

    app = Starlette(
        routes=[
            Route("/v1/generate", generate_json, methods=["POST"]),
            Route("/v1/generate/stream", generate_stream, methods=["GET", "POST"]),
            Route("/sdapi/v1/txt2img", txt2img, methods=["POST"]),
            Route("/metrics", scrape, methods=["GET"]),
            Route("/", page, methods=["GET"]),
            Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
        ]
    )
    routes = {route.path for route in app.routes}
    return CountedRequests(app if token is None else BearerToken(app, token), metrics, routes)


def _refusals(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """``endpoint`` answering an error with its status (docs/design.md, "Error semantics") and ``{"error": ...}``."""

    @functools.wraps(endpoint)
    async def answering(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Exception as error:  # noqa: BLE001 - every error must become a status
            if isinstance(error, json_format.ParseError):  # names the field, as wire's ValueErrors do
                error = ValueError(str(error))
            status, body = error_of(error)
            if status == 500:
                logger.exception("%s %s failed", request.method, request.url.path)
            return JSONResponse(body, status)

    return answering


def _call(fields: object) -> tuple[GenerationRequest, CallOptions]:
    """The request and options of ``GenerateRequest`` JSON fields, validated as a gRPC call's."""
    if not isinstance(fields, dict):
        raise ValueError("the body must be a JSON object of GenerateRequest fields")
    return call_from_pb(json_format.ParseDict(fields, pb.GenerateRequest()))


async def _read_json(request: Request) -> object:
    """The body as JSON; over the gRPC message limit, or not JSON, is a bad request."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_MESSAGE_BYTES:
            raise ValueError(f"the body is over {MAX_MESSAGE_BYTES} bytes")
    try:
        return json.loads(body or b"{}")
    except json.JSONDecodeError as error:
        raise ValueError(f"the body is not JSON: {error}") from None


def _query_fields(request: Request) -> dict:
    """A GET's query as ``GenerateRequest`` JSON fields (``ParseDict`` takes numbers as strings, not booleans)."""
    fields = {field.name: field for field in pb.GenerateRequest.DESCRIPTOR.fields}
    fields |= {field.json_name: field for field in pb.GenerateRequest.DESCRIPTOR.fields}
    query = dict(request.query_params)
    for name, value in query.items():
        field = fields.get(name)
        if field is not None and field.type == FieldDescriptor.TYPE_BOOL:
            query[name] = value.lower() in ("1", "true")
    return query


def _deadline(request: Request) -> float | None:
    """The call's deadline on the wall clock, from its ``X-Request-Timeout`` (seconds); None without one."""
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{TIMEOUT_HEADER} must be seconds, got {value!r}") from None
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_HEADER} must be positive, got {value!r}")
    return time.time() + seconds


def _to_json(message) -> dict:
    """Protobuf's JSON mapping with the .proto's field names; bytes (the image) as base64."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


async def _sse(first: object, events: AsyncIterator) -> AsyncIterator[str]:
    """Server-sent events: ``progress`` ones, then ``result``, or ``error`` (``{"error": {...}}``)."""
    item = first
    try:
        while True:
            if isinstance(item, Progress):
                yield _event("progress", _to_json(progress_to_pb(item)))
            else:
                yield _event("result", _to_json(result_to_pb(item)))
                return
            item = await anext(events)
    except Exception as error:  # noqa: BLE001 - the stream has begun: the error is its last event
        yield _event("error", error_of(error)[1])
    finally:
        await events.aclose()


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


class BearerToken:
    """401 unless the request carries ``Authorization: Bearer <token>``; the page and its files are open (the
    page asks for the token itself)."""

    def __init__(self, app: ASGIApp, token: str):
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path == "/" or path.startswith("/static/"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if token_matches(headers.get(b"authorization", b"").decode("latin-1"), self.expected):
            return await self.app(scope, receive, send)
        body = error_body(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        await JSONResponse(body, 401, headers={"www-authenticate": "Bearer"})(scope, receive, send)


class CountedRequests:
    """Counts every HTTP request by route and status (``hybrid_sd_requests_total{protocol="http"}``)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, routes: set[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in self.routes else "/static" if path.startswith("/static/") else "other"
        status = 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.count("http", f"{scope['method']} {route}", str(status))
