"""Helpers to run the real servers (edge worker, gateway with a local Ray) from synchronous tests:
an asyncio loop on a thread, and async context managers entered on it."""

from __future__ import annotations

import asyncio
import socket
import threading
from contextlib import AbstractAsyncContextManager

import grpc

from hybrid_sd.denoiser import Denoiser
from hybrid_sd.rpc import CHANNEL_OPTIONS, GrpcEdgeClient, ProgressCallback, open_channel
from hybrid_sd.service import cloud_denoise
from hybrid_sd.v1 import hybrid_sd_pb2 as pb


class LoopThread:
    """An event loop running on its own thread; ``run`` waits for a coroutine's result."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def enter(self, context: AbstractAsyncContextManager):
        """Enter ``context`` on the loop; returns (value, exit) where exit() leaves it."""
        value = self.run(context.__aenter__())

        def leave() -> None:
            self.run(context.__aexit__(None, None, None))

        return value, leave

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def channel(port: int) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)


class LocalCloud:
    """The cloud half in this process, as a Ray replica runs it (an orchestrate.CloudClient)."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser

    async def denoise(
        self, request: pb.DenoiseRequest, deadline: float | None, on_progress: ProgressCallback | None = None
    ) -> pb.Handoff:
        return cloud_denoise(self.denoiser, request, "local", None)


class FullHandoffEdge:
    """An edge client that does not tell the cloud its profile, so handoffs to it are full."""

    def __init__(self, edge: GrpcEdgeClient):
        self.edge = edge

    async def profile(self, deadline: float | None) -> None:
        return None

    async def refine(
        self, request: pb.RefineRequest, deadline: float | None, on_progress: ProgressCallback | None = None
    ) -> pb.ImageResult:
        return await self.edge.refine(request, deadline, on_progress)


async def grpc_edge_client(target: str) -> GrpcEdgeClient:
    """A gateway's edge client; made on the loop it is used from, as grpc.aio channels must be."""
    return GrpcEdgeClient(open_channel(target))
