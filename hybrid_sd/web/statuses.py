"""HTTP statuses for errors: the gRPC status a library error maps to (docs/design.md, "Error semantics"),
then the one table from gRPC codes to HTTP."""

from __future__ import annotations

import grpc

from hybrid_sd.rpc_server import status_for

# gRPC code -> HTTP status; any code not here is a 500.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)


def error_body(code: grpc.StatusCode, message: str) -> dict:
    """What an HTTP error answers (and an ``error`` event carries): ``{"error": {status, code, message}}``."""
    return {"error": {"status": http_status(code), "code": code.name, "message": message}}


def error_of(error: BaseException) -> tuple[int, dict]:
    """The HTTP status and body of a library error."""
    code, message = status_for(error)
    return http_status(code), error_body(code, message)
