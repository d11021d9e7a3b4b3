"""Helpers to run the real servers (edge worker, gateway with a local Ray) from synchronous tests:
an asyncio loop on a thread, and async context managers entered on it."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hybrid_sd.edge_profile import EdgeProfile
from hybrid_sd.limits import CHANNEL_OPTIONS
from hybrid_sd.results import EdgeResult
from hybrid_sd.rpc_clients import GrpcEdgeClient, open_channel
from tests.shaped_link import ShapedLink

T = TypeVar("T")

# How far a request batched with others may be from its run alone, in its latents, on the CPU in float32
# (README, "Step-level batching"): CPU kernels reduce in an order that depends on the batch size. Measured
# at most 3.9e-5 on the shapes pair (benchmarks/batching.py).
BATCHED_LATENT_TOLERANCE = 1e-4


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


def ctrl_c_reaches(start: Callable[[], T]) -> T:
    """``start()`` (a child process) with SIGINT handled here meanwhile, so that the child sees Ctrl-C as from a
    terminal, also when this suite runs as a background job: its shell ignores SIGINT, children inherit the
    ignoring, and Python then raises no KeyboardInterrupt. A handled signal is reset to its default by exec
    (no ``preexec_fn``, which is unsafe in a process with threads)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return start()
    finally:
        signal.signal(signal.SIGINT, previous)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def channel(port: int) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)


class FullHandoffEdge:
    """An edge client that tells the cloud no text encoders it has, so handoffs to it are full."""

    def __init__(self, edge: GrpcEdgeClient):
        self.edge = edge

    async def describe(self, deadline: float | None = None) -> EdgeProfile:
        return dataclasses.replace(await self.edge.describe(deadline), text_encoder_id="")

    async def refine(self, start, output, deadline=None, on_progress=None) -> EdgeResult:
        return await self.edge.refine(start, output, deadline, on_progress)


async def grpc_edge_client(target: str) -> GrpcEdgeClient:
    """A gateway's edge client; made on the loop it is used from, as grpc.aio channels must be."""
    return GrpcEdgeClient(open_channel(target))


def serve_edge_in(link: ShapedLink, model: str, threads: int, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """``hybrid-sd serve edge`` of ``model`` (a pipeline folder, for both sides of the pair) inside
    ``link``'s namespace, on its veth address: the process, once SERVING, and its target."""
    port = free_port()  # free here; in a fresh namespace every port is
    command = ["serve", "edge", "--host", link.edge_address, "--port", str(port), "--torch-threads", str(threads)]
    command += ["--cloud-model", model, "--edge-model", model]
    # Its output goes to a file (a pipe nobody reads would fill and stall it), kept for a failed start.
    with tempfile.TemporaryFile() as log:
        argv = link.command(sys.executable, "-m", "hybrid_sd.cli", *command)
        worker = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        target = f"{link.edge_address}:{port}"
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(target, options=CHANNEL_OPTIONS))
        serving = health_pb2.HealthCheckResponse.SERVING
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and worker.poll() is None:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == serving:
                    return worker, target
            except grpc.RpcError:
                pass
            time.sleep(0.5)
        worker.kill()
        worker.wait()
        log.seek(0)
        output = log.read()[-2000:].decode(errors="replace")
    raise RuntimeError(f"the edge worker in the namespace did not start: {output}")


def stop(worker: subprocess.Popen) -> None:
    """SIGTERM (the worker finishes in-flight calls), then SIGKILL after a minute."""
    worker.terminate()
    try:
        worker.wait(60)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
