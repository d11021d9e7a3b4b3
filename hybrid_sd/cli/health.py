"""``hybrid-sd health``: whether a server's gRPC health service says SERVING."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from hybrid_sd.cli.arguments import add_client_security_arguments


def add_health_command(commands: argparse._SubParsersAction) -> None:
    """Add ``health`` to the ``hybrid-sd`` subcommands."""
    health = commands.add_parser("health", help="exit 0 if a server's gRPC health service says SERVING")
    health.add_argument("target", help="HOST:PORT")
    health.add_argument("--service", default="", help="service name (default: the whole server)")
    health.add_argument("--timeout", type=float, default=5.0)
    add_client_security_arguments(health)
    health.set_defaults(handler=run_health)


def run_health(args: argparse.Namespace) -> None:
    code = asyncio.run(check_health(args.target, args.service, args.timeout, args.tls_ca))
    if code != 0:
        sys.exit(code)


async def check_health(target: str, service: str, timeout: float, tls_ca: Path | None, quiet: bool = False) -> int:
    """0 if ``target`` says ``service`` is SERVING, else 1; unless ``quiet``, what it said is printed."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from hybrid_sd.credentials import channel_credentials
    from hybrid_sd.rpc_clients import open_channel

    async with open_channel(target, channel_credentials(tls_ca)) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError as error:
            if not quiet:
                print(f"{target}: {error.code().name} {error.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if not quiet:
        print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
