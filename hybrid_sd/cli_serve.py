"""``hybrid-sd serve``, ``cluster up`` and ``health``: the serving side of the command line.

Only these entry points reach the worker packages, and only when run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shlex
import signal
import sys
import time
from pathlib import Path

from hybrid_sd.limits import RequestLimits, add_limit_arguments, limits_from_args
from hybrid_sd.ports import check_can_listen, check_port
from hybrid_sd.supervisor import Child, Supervisor

DEFAULT_GATEWAY_PORT = 50051
DEFAULT_EDGE_PORT = 50052
THREADS_HELP = "torch intra-op threads (default: torch's); cloud and edge need the same for a bit-exact split"


def add_serving_commands(commands) -> None:
    from hybrid_sd.cli import add_client_security_arguments, add_model_arguments, env_value

    serve = commands.add_parser("serve", help="run one service").add_subparsers(dest="role", required=True)

    edge = serve.add_parser("edge", help="the edge worker (small model, decoder)")
    _add_server_arguments(edge, DEFAULT_EDGE_PORT)
    add_model_arguments(edge)
    edge.add_argument("--cloud", help="HOST:PORT of the gateway, for requests that start at this edge")
    edge.add_argument("--cloud-timeout", type=float, help="seconds the cloud half may take before a fallback")
    edge.add_argument("--cloud-token", default=env_value("HYBRID_SD_CLOUD_TOKEN"), help="token for --cloud")
    edge.add_argument("--torch-threads", type=int, help=THREADS_HELP)
    edge.add_argument("--bundle", dest="edge_bundle", type=Path, help="the same as --edge-bundle")
    edge.set_defaults(handler=run_serve_edge)

    gateway = serve.add_parser("gateway", help="the cloud gateway and its Ray Serve denoiser replicas")
    _add_server_arguments(gateway, DEFAULT_GATEWAY_PORT)
    add_model_arguments(gateway)
    gateway.add_argument("--edge", required=True, help="HOST:PORT of the edge worker")
    gateway.add_argument("--edge-token", default=env_value("HYBRID_SD_EDGE_TOKEN"), help="token for --edge")
    _add_ray_arguments(gateway)
    gateway.set_defaults(handler=run_serve_gateway)

    cloud = serve.add_parser("cloud", help="a Ray worker node contributing its GPUs to the denoiser replicas")
    cloud.add_argument("--ray-address", required=True, help="HOST:PORT of the Ray head")
    cloud.add_argument("--num-gpus", type=int, help="GPUs to offer (default: all Ray finds)")
    cloud.add_argument("--num-cpus", type=int, help="CPUs to offer (default: all Ray finds)")
    _add_ray_node_arguments(cloud)
    cloud.add_argument("--check", action="store_true", help="validate the configuration and exit")
    cloud.set_defaults(handler=run_serve_cloud)

    cluster = commands.add_parser("cluster", help="the whole topology on loopback").add_subparsers(
        dest="action", required=True
    )
    up = cluster.add_parser("up", help="start edge worker and gateway (with a local Ray); Ctrl-C stops them")
    add_model_arguments(up)
    up.add_argument("--port", type=int, default=DEFAULT_GATEWAY_PORT, help="gateway port (edge: the next one)")
    up.add_argument("--replicas", type=int, default=1, help="denoiser replicas")
    up.add_argument("--torch-threads", type=int, help=THREADS_HELP + " (every process)")
    add_limit_arguments(up)
    up.add_argument("--generate", metavar="PROMPT", help="make one Generate call through the gateway, then stop")
    up.add_argument("--out", type=Path, default=Path("out/hybrid.png"), help="image file for --generate")
    up.add_argument("--switch-step", type=int, help="for --generate")
    up.add_argument("--steps", type=int, default=25, help="for --generate")
    up.add_argument("--seed", type=int, help="for --generate")
    up.set_defaults(handler=run_cluster_up)

    health = commands.add_parser("health", help="exit 0 if a server's gRPC health service says SERVING")
    health.add_argument("target", help="HOST:PORT")
    health.add_argument("--service", default="", help="service name (default: the whole server)")
    health.add_argument("--timeout", type=float, default=5.0)
    add_client_security_arguments(health)
    health.set_defaults(handler=run_health)


def _add_server_arguments(parser: argparse.ArgumentParser, port: int) -> None:
    from hybrid_sd.cli import env_value

    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--token", default=env_value("HYBRID_SD_TOKEN"), help="require this bearer token")
    parser.add_argument("--tls-cert", type=Path, default=_env_path("HYBRID_SD_TLS_CERT"))
    parser.add_argument("--tls-key", type=Path, default=_env_path("HYBRID_SD_TLS_KEY"))
    parser.add_argument("--tls-client-ca", type=Path, default=_env_path("HYBRID_SD_TLS_CLIENT_CA"), help="mTLS")
    parser.add_argument(
        "--tls-ca", type=Path, default=_env_path("HYBRID_SD_TLS_CA"), help="CA of the servers this one calls"
    )
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    add_limit_arguments(parser)


def _add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray-address", help="HOST:PORT of a Ray head to join (default: start Ray here)")
    parser.add_argument("--ray-num-cpus", type=int, help="CPUs of a Ray started here")
    parser.add_argument("--replicas", type=int, default=1, help="denoiser replicas (the minimum, with autoscaling)")
    parser.add_argument("--autoscale-to", type=int, help="autoscale replicas up to this many")
    parser.add_argument("--gpus-per-replica", type=float, default=0.0)
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--max-queued", type=int, default=64, help="requests queued before RESOURCE_EXHAUSTED")
    parser.add_argument(
        "--max-replicas-per-node", type=int, help="at most this many replicas on one node (1: spread them)"
    )
    parser.add_argument("--torch-threads", type=int, help=THREADS_HELP + " (per replica)")
    _add_ray_node_arguments(parser)


def _add_ray_node_arguments(parser: argparse.ArgumentParser) -> None:
    """The node a process starts to join the cluster at --ray-address, with Ray's token authentication."""
    parser.add_argument(
        "--ray-token-file",
        type=Path,
        help="the cluster's Ray auth token (default: Ray's RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)",
    )
    parser.add_argument("--ray-temp-dir", type=Path, help="Ray's session files and logs of the node (default: Ray's)")
    parser.add_argument(
        "--ray-start-args", default="", help="more `ray start` flags for the node, one quoted string (e.g. ports)"
    )


def _env_path(name: str) -> Path | None:
    from hybrid_sd.cli import env_value

    value = env_value(name)
    return Path(value) if value else None


def _security(args: argparse.Namespace):
    from hybrid_sd.rpc import Security

    security = Security(args.token, args.tls_cert, args.tls_key, args.tls_client_ca, args.tls_ca)
    security.check()
    return security


def _check_listen(args: argparse.Namespace, service: str) -> None:
    """``--port``, and unless ``--check`` (which may run beside the server it configures) that it is free now:
    before the server's libraries load."""
    if args.check:
        check_port(args.port)
    else:
        check_can_listen(args.host, args.port, service)


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


def _pair(args: argparse.Namespace):
    from hybrid_sd.cli import pair_spec
    from hybrid_sd.presets import DEFAULT_PAIR

    name = args.pair or (DEFAULT_PAIR if not args.cloud_model else "custom")
    return name, pair_spec(args)


def run_serve_edge(args: argparse.Namespace) -> None:
    _check_listen(args, "edge worker")
    _check_target("--cloud", args.cloud)
    import torch

    from edge_worker.server import EdgeConfig, running_edge
    from hybrid_sd.cli import quiet_libraries

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
    )
    if args.check:
        print(f"edge configuration is valid: {spec.edge} on {args.host}:{args.port}")
        return
    quiet_libraries(args)
    asyncio.run(_serve_until_signal(running_edge(config), "edge worker"))


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
        from hybrid_sd.cli import check_local_models

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
            max_queued_requests=args.max_queued,
            autoscale_to=args.autoscale_to,
            max_replicas_per_node=_positive("--max-replicas-per-node", args.max_replicas_per_node),
            **({"torch_threads": _positive("--torch-threads", args.torch_threads)} if args.torch_threads else {}),
        ),
        device=device,
        dtype=args.dtype,
        security=_security(args),
        edge_token=args.edge_token,
        limits=limits_from_args(args),
    )
    if args.check:
        print(f"gateway configuration is valid: {spec.cloud} on {args.host}:{args.port}, edge {args.edge}")
        return
    asyncio.run(_serve_until_signal(running_gateway(config), "gateway"))


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
    signal.signal(signal.SIGTERM, _interrupt)
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


async def _serve_until_signal(server_context, what: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with server_context as server:
        print(f"{what} serving on port {server.port}", flush=True)
        await stop.wait()
        print(f"{what} stopping: finishing in-flight requests", flush=True)


def run_health(args: argparse.Namespace) -> None:
    code = asyncio.run(_health(args.target, args.service, args.timeout, args.tls_ca))
    if code != 0:
        sys.exit(code)


async def _health(target: str, service: str, timeout: float, tls_ca: Path | None, quiet: bool = False) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from hybrid_sd.rpc import open_channel

    async with open_channel(target, tls_ca) as channel:
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


def run_cluster_up(args: argparse.Namespace) -> None:
    """The embedded topology as processes on loopback: an edge worker, and a gateway that starts
    Ray locally with the denoiser deployment. The edge can reach the gateway too."""
    from hybrid_sd.cli import local_pair_spec

    if not 1 <= args.port < 65535:
        raise ValueError(f"--port must be in [1, 65534] (the edge worker takes the next one), got {args.port}")
    for port, service in ((args.port, "gateway"), (args.port + 1, "edge worker")):
        check_can_listen("127.0.0.1", port, service, "choose another --port (the edge worker takes the next one)")
    local_pair_spec(args)  # both servers load their models here: check them before starting either
    gateway, edge = f"127.0.0.1:{args.port}", f"127.0.0.1:{args.port + 1}"
    common = _model_flags(args) + _limit_flags(limits_from_args(args))
    if args.torch_threads:
        common += ["--torch-threads", str(args.torch_threads)]
    base = [sys.executable, "-m", "hybrid_sd.cli"] + (["--verbose"] if args.verbose else [])
    edge_command = [*base, "serve", "edge", "--port", str(args.port + 1), "--cloud", gateway, *common]
    gateway_command = [*base, "serve", "gateway", "--port", str(args.port), "--edge", edge, *common]
    supervisor = Supervisor(
        [Child("edge worker", edge_command), Child("gateway", [*gateway_command, "--replicas", str(args.replicas)])]
    )
    signal.signal(signal.SIGTERM, _interrupt)
    supervisor.start()
    try:
        for target in (edge, gateway):
            _wait_until_serving(target, supervisor)
        print(f"cluster up: gateway {gateway}, edge {edge} (both serve HybridDiffusion)", flush=True)
        if args.generate is not None:
            _generate_once(gateway, args)
            return
        while True:  # until Ctrl-C or SIGTERM; a child that exits is restarted
            supervisor.poll()
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        supervisor.stop()


def _model_flags(args: argparse.Namespace) -> list[str]:
    """The model arguments of ``cluster up``, for the serve commands it starts."""
    flags = []
    for name in (
        "pair",
        "cloud_model",
        "edge_model",
        "edge_vae",
        "edge_vae_latent_space",
        "edge_bundle",
        "device",
        "dtype",
    ):
        value = getattr(args, name)
        if value is not None:
            flags += ["--" + name.replace("_", "-"), str(value)]
    if args.edge_shares_text_encoder:
        flags.append("--edge-shares-text-encoder")
    return flags


def _limit_flags(limits: RequestLimits) -> list[str]:
    """The request limits of ``cluster up``, for both services it starts."""
    return [
        arg for name, value in dataclasses.asdict(limits).items() for arg in ("--" + name.replace("_", "-"), str(value))
    ]


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _wait_until_serving(target: str, supervisor: Supervisor, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while asyncio.run(_health(target, "", 2.0, None, quiet=True)) != 0:
        exited = supervisor.exited()
        if exited:
            child = exited[0]
            raise RuntimeError(
                f"the {child.name} exited with code {child.process.returncode} before {target} was serving"
                " (its output is above)"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"{target} was not serving after {timeout:.0f} s")
        time.sleep(0.5)


def _generate_once(gateway: str, args: argparse.Namespace) -> None:
    from hybrid_sd.client import generate_remote, response_summary
    from hybrid_sd.v1 import hybrid_sd_pb2 as pb

    request = pb.GenerateRequest(prompt=args.generate, num_inference_steps=args.steps)
    if args.switch_step is not None:
        request.switch_step = args.switch_step
    if args.seed is not None:
        request.seed = args.seed
    response = asyncio.run(generate_remote(gateway, request, args.out))
    print(json.dumps(response_summary(response), indent=2))
    print(f"wrote {args.out}")
