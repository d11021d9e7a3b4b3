"""``hybrid-sd serve edge|gateway|cloud``: one service, checked before its libraries load, until a signal."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hybrid_sd.cli.arguments import check_local_models, pair_spec, quiet_libraries
from hybrid_sd.limits import limits_from_args
from hybrid_sd.ports import check_can_listen, check_port
from hybrid_sd.presets import DEFAULT_PAIR, PairSpec
from hybrid_sd.stages import stage
from hybrid_sd.switch_profile import SwitchProfile, default_profile, load_profile
from services.logs import route_logs

if TYPE_CHECKING:
    from hybrid_sd.credentials import Security


def _security(args: argparse.Namespace) -> Security:
    from hybrid_sd.credentials import Security

    security = Security(args.token, args.tls_cert, args.tls_key, args.tls_client_ca, args.tls_ca)
    security.check()
    return security


def _check_listen(args: argparse.Namespace, service: str) -> None:
    """``--port`` and ``--http-port``, and unless ``--check`` (which may run beside the server it configures)
    that they are free now: before the server's libraries load."""
    check_port(args.http_port, "--http-port")
    if args.check:
        check_port(args.port)
        return
    check_can_listen(args.host, args.port, service)
    if args.http_port:
        check_can_listen(args.host, args.http_port, f"{service}'s HTTP server", "choose another with --http-port")


def _check_target(name: str, target: str | None) -> None:
    if target is None:
        return
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{name} must be HOST:PORT, got {target!r}")


def _positive(flag: str, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise ValueError(f"{flag} must be at least 1, got {value}")
    return value


def _batching(args: argparse.Namespace) -> dict:
    """``--max-batch`` and ``--batch-wait-ms`` as the compute lane's arguments."""
    if args.batch_wait_ms < 0:
        raise ValueError(f"--batch-wait-ms must not be negative, got {args.batch_wait_ms}")
    return {"max_batch": _positive("--max-batch", args.max_batch), "batch_wait_s": args.batch_wait_ms / 1000}


def _pair(args: argparse.Namespace) -> tuple[str, PairSpec]:
    """The pair's name as the servers report it, and its models."""
    name = args.pair or (DEFAULT_PAIR if not args.cloud_model else "custom")
    return name, pair_spec(args)


def _switch_profile(args: argparse.Namespace, pair_name: str) -> SwitchProfile | None:
    """``--profile``, else the served pair's shipped one (None for a pair without); a bad file fails now."""
    return load_profile(args.profile) if args.profile else default_profile(pair_name)


def run_serve_edge(args: argparse.Namespace) -> None:
    _check_listen(args, "edge worker")
    _check_target("--cloud", args.cloud)
    import torch

    from edge_worker.server import EdgeConfig, running_edge

    name, spec = _pair(args)
    config = EdgeConfig(
        spec,
        pair_name=name,
        host=args.host,
        port=args.port,
        cloud=args.cloud,
        cloud_timeout=args.cloud_timeout,
        device=args.device or "cpu",
        dtype=getattr(torch, args.dtype),
        security=_security(args),
        cloud_token=args.cloud_token,
        torch_threads=_positive("--torch-threads", args.torch_threads),
        limits=limits_from_args(args),
        http_port=args.http_port or None,
        **_batching(args),
        max_queued=_positive("--max-queued", args.max_queued),
        switch_profile=_switch_profile(args, name),
    )
    if args.check:
        print(f"edge configuration is valid: {spec.edge} on {args.host}:{args.port}")
        return
    quiet_libraries(args)
    _serve(running_edge(config), "edge worker", route_logs(args, "edge"))


def run_serve_gateway(args: argparse.Namespace) -> None:
    _check_listen(args, "gateway")
    _check_target("--ray-address", args.ray_address.removeprefix("ray://") if args.ray_address else None)
    _check_ray_node(args)  # before Ray is imported
    _check_target("--edge", args.edge)
    if args.replicas < 1 or (args.autoscale_to is not None and args.autoscale_to < args.replicas):
        raise ValueError("--replicas must be at least 1 and --autoscale-to at least --replicas")
    name, spec = _pair(args)
    device = args.device or ("cuda" if args.gpus_per_replica > 0 else "cpu")
    if args.ray_address is None:  # the replicas load the cloud model here: fail now, not in a Ray actor
        check_local_models(device, spec.cloud)
    from cloud_worker.deployment import ReplicaConfig
    from cloud_worker.gateway import GatewayConfig, running_gateway

    config = GatewayConfig(
        name,
        spec,
        args.edge,
        host=args.host,
        port=args.port,
        ray_address=args.ray_address,
        ray_num_cpus=args.ray_num_cpus,
        ray_temp_dir=args.ray_temp_dir,
        ray_start_args=args.ray_start_args,
        replicas=ReplicaConfig(
            replicas=args.replicas,
            gpus_per_replica=args.gpus_per_replica,
            cpus_per_replica=args.cpus_per_replica,
            max_queued_requests=_positive("--max-queued", args.max_queued),
            autoscale_to=args.autoscale_to,
            max_replicas_per_node=_positive("--max-replicas-per-node", args.max_replicas_per_node),
            **({"torch_threads": _positive("--torch-threads", args.torch_threads)} if args.torch_threads else {}),
            **_batching(args),
        ),
        device=device,
        dtype=args.dtype,
        security=_security(args),
        edge_token=args.edge_token,
        limits=limits_from_args(args),
        http_port=args.http_port or None,
        ray_log_level=logging.INFO if args.verbose else logging.ERROR,
        switch_profile=_switch_profile(args, name),
    )
    if args.check:
        print(f"gateway configuration is valid: {spec.cloud} on {args.host}:{args.port}, edge {args.edge}")
        return
    _serve(running_gateway(config), "gateway", route_logs(args, "gateway"))


def run_serve_cloud(args: argparse.Namespace) -> None:
    """A Ray node joined to the cluster until SIGTERM or Ctrl-C, which stop it; or the node's exit code."""
    from cloud_worker.ray_node import RayNode, joined_node

    _check_target("--ray-address", args.ray_address)
    flags = []
    if args.num_gpus is not None:
        flags += ["--num-gpus", str(args.num_gpus)]
    if args.num_cpus is not None:
        flags += ["--num-cpus", str(args.num_cpus)]
    node = RayNode(args.ray_address, args.ray_temp_dir, args.ray_start_args)
    command = node.start_command(*flags)
    _check_ray_node(args)
    if args.check:
        print("cloud node configuration is valid: " + shlex.join(command))
        return
    signal.signal(signal.SIGTERM, interrupt)
    with joined_node(node, *flags) as joined:
        print(f"cloud node joined the Ray cluster at {args.ray_address}", flush=True)
        try:
            code = joined.process.wait()
        except KeyboardInterrupt:
            return
    sys.exit(code)


def _check_ray_node(args: argparse.Namespace) -> None:
    """Validate the Ray node flags; joining a cluster turns Ray's token authentication on."""
    from cloud_worker.ray_node import use_token_auth

    if args.ray_address:
        use_token_auth(args.ray_token_file)
    elif args.ray_token_file or args.ray_temp_dir or args.ray_start_args:
        raise ValueError("--ray-token-file, --ray-temp-dir and --ray-start-args need --ray-address")


def _serve(server_context, what: str, log: Path | None) -> None:
    if log is not None:
        print(f"{what}: logs in {log} (--verbose: here)", flush=True)
    asyncio.run(_serve_until_signal(server_context, what))


async def _serve_until_signal(server_context, what: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    stopping = contextlib.ExitStack()
    async with server_context as server:
        http = f"; HTTP on port {server.http_port}" if server.http_port else ""
        print(f"{what} serving on port {server.port}{http}", flush=True)
        await stop.wait()
        stopping.enter_context(stage(f"{what} stopping: finishing in-flight requests", "stopped"))
    stopping.close()


def interrupt(signum, frame) -> None:
    """A SIGTERM handler: stop as Ctrl-C does."""
    raise KeyboardInterrupt
