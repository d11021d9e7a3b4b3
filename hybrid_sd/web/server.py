"""The HTTP face served by uvicorn as a task on the gRPC server's event loop, so that both share the
servicer's clients and models."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Iterator

import uvicorn

from hybrid_sd.credentials import Security
from hybrid_sd.orchestrate import Generate
from hybrid_sd.ports import check_can_listen
from hybrid_sd.service_metrics import ServiceMetrics
from hybrid_sd.web.app import http_app

GRACE_S = 10.0


class _EmbeddedServer(uvicorn.Server):
    """uvicorn with no signal handlers of its own: the process it runs in stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def http_face(
    name: str,
    generate: Generate,
    metrics: ServiceMetrics,
    host: str,
    port: int | None,
    security: Security = Security(),
) -> AsyncIterator[int]:
    """Serve the HTTP face of ``generate`` on ``host:port`` (0: any free port; None: no HTTP, and the port is
    0) until the block exits, over HTTPS when ``security`` has a certificate (with a client CA: mutual TLS),
    with its bearer token; in-flight requests get ``GRACE_S`` to finish. Yields the port."""
    if port is None:
        yield 0
        return
    check_can_listen(host, port, f"{name}'s HTTP server", "choose another with --http-port")
    listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    config = uvicorn.Config(
        http_app(generate, metrics, security.token),
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=GRACE_S,
        ssl_certfile=security.tls_cert,
        ssl_keyfile=security.tls_key,
        ssl_ca_certs=security.tls_client_ca,
        ssl_cert_reqs=ssl.CERT_REQUIRED if security.tls_client_ca else ssl.CERT_NONE,
    )
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        while not server.started:
            if task.done():
                task.result()  # its error
                raise RuntimeError(f"the {name}'s HTTP server stopped while starting")
            await asyncio.sleep(0.05)
        yield listener.getsockname()[1]
    finally:
        server.should_exit = True
        await task
        listener.close()
