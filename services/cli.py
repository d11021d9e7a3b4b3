"""``hybrid-sd serve edge|gateway|cloud`` and ``hybrid-sd cluster up``: their arguments.

Registered with the ``hybrid-sd`` command line through the ``hybrid_sd.commands`` entry point, so that the
library does not import the workers; they are imported only when a command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hybrid_sd.cli.arguments import add_model_arguments, env_value
from hybrid_sd.limits import add_limit_arguments
from services.cluster import run_cluster_up
from services.serve import run_serve_cloud, run_serve_edge, run_serve_gateway

DEFAULT_GATEWAY_PORT = 50051
DEFAULT_EDGE_PORT = 50052
DEFAULT_GATEWAY_HTTP_PORT = 8080
DEFAULT_EDGE_HTTP_PORT = 8081
HTTP_HELP = "port of the HTTP face: JSON, server-sent events, A1111's txt2img, /metrics, the page at / (0: no HTTP)"
DEFAULT_MAX_BATCH = 8
PROFILE_HELP = (
    "quality against switch step for auto_switch requests: a sweep's summary.json or a pair's evaluation.json"
    " (default: the shapes pair's own, when serving it)"
)
THREADS_HELP = "torch intra-op threads (default: torch's); cloud and edge need the same for a bit-exact split"


def add_serving_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``cluster`` to the ``hybrid-sd`` subcommands."""
    serve = commands.add_parser("serve", help="run one service").add_subparsers(dest="role", required=True)

    edge = serve.add_parser("edge", help="the edge worker (small model, decoder)")
    _add_server_arguments(edge, DEFAULT_EDGE_PORT, DEFAULT_EDGE_HTTP_PORT)
    add_model_arguments(edge)
    edge.add_argument("--cloud", help="HOST:PORT of the gateway, for requests that start at this edge")
    edge.add_argument("--cloud-timeout", type=float, help="seconds the cloud half may take before a fallback")
    edge.add_argument("--cloud-token", default=env_value("HYBRID_SD_CLOUD_TOKEN"), help="token for --cloud")
    edge.add_argument("--torch-threads", type=int, help=THREADS_HELP)
    edge.add_argument("--bundle", dest="edge_bundle", type=Path, help="the same as --edge-bundle")
    _add_batch_arguments(edge, 1, "a site edge serving many clients")
    edge.add_argument("--profile", type=Path, help=PROFILE_HELP + "; for requests that start at this edge")
    edge.set_defaults(handler=run_serve_edge)

    gateway = serve.add_parser("gateway", help="the cloud gateway and its Ray Serve denoiser replicas")
    _add_server_arguments(gateway, DEFAULT_GATEWAY_PORT, DEFAULT_GATEWAY_HTTP_PORT)
    add_model_arguments(gateway)
    gateway.add_argument("--edge", required=True, help="HOST:PORT of the edge worker")
    gateway.add_argument("--edge-token", default=env_value("HYBRID_SD_EDGE_TOKEN"), help="token for --edge")
    gateway.add_argument("--profile", type=Path, help=PROFILE_HELP)
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
    up.add_argument(
        "--http-port", type=int, default=DEFAULT_GATEWAY_HTTP_PORT, help=HTTP_HELP + "; the edge's: the next one"
    )
    up.add_argument("--replicas", type=int, default=1, help="denoiser replicas")
    up.add_argument(
        "--torch-threads",
        type=int,
        help="torch intra-op threads of every process (default: the cores shared among the replicas and the edge"
        " worker)",
    )
    _add_batch_arguments(up, DEFAULT_MAX_BATCH, "each denoiser replica and the edge worker")
    up.add_argument("--profile", type=Path, help=PROFILE_HELP + " (gateway and edge)")
    add_limit_arguments(up)
    _add_log_dir_argument(up)
    up.add_argument("--generate", metavar="PROMPT", help="make one Generate call through the gateway, then stop")
    up.add_argument("--out", type=Path, default=Path("out/hybrid.png"), help="image file for --generate")
    up.add_argument("--switch-step", type=int, help="for --generate")
    up.add_argument("--steps", type=int, default=25, help="for --generate")
    up.add_argument("--seed", type=int, help="for --generate")
    up.set_defaults(handler=run_cluster_up)


def _add_server_arguments(parser: argparse.ArgumentParser, port: int, http_port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--http-port", type=int, default=http_port, help=HTTP_HELP)
    parser.add_argument("--token", default=env_value("HYBRID_SD_TOKEN"), help="require this bearer token")
    parser.add_argument("--tls-cert", type=Path, default=_env_path("HYBRID_SD_TLS_CERT"))
    parser.add_argument("--tls-key", type=Path, default=_env_path("HYBRID_SD_TLS_KEY"))
    parser.add_argument("--tls-client-ca", type=Path, default=_env_path("HYBRID_SD_TLS_CLIENT_CA"), help="mTLS")
    parser.add_argument(
        "--tls-ca", type=Path, default=_env_path("HYBRID_SD_TLS_CA"), help="CA of the servers this one calls"
    )
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    add_limit_arguments(parser)
    _add_log_dir_argument(parser)


def _add_log_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=Path("out/logs"),
        help="where the logs go without --verbose (default: %(default)s)",
    )


def _add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray-address", help="HOST:PORT of a Ray head to join (default: start Ray here)")
    parser.add_argument("--ray-num-cpus", type=int, help="CPUs of a Ray started here")
    parser.add_argument("--replicas", type=int, default=1, help="denoiser replicas (the minimum, with autoscaling)")
    parser.add_argument("--autoscale-to", type=int, help="autoscale replicas up to this many")
    parser.add_argument("--gpus-per-replica", type=float, default=0.0)
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument(
        "--max-replicas-per-node", type=int, help="at most this many replicas on one node (1: spread them)"
    )
    parser.add_argument("--torch-threads", type=int, help=THREADS_HELP + " (per replica)")
    _add_batch_arguments(parser, DEFAULT_MAX_BATCH, "each denoiser replica")
    _add_ray_node_arguments(parser)


def _add_batch_arguments(parser: argparse.ArgumentParser, max_batch: int, who: str) -> None:
    parser.add_argument(
        "--max-batch",
        type=int,
        default=max_batch,
        help=f"requests whose denoising steps share one UNet call, on {who} (1: one request at a time;"
        " a request with exact set always runs alone)",
    )
    parser.add_argument(
        "--batch-wait-ms", type=float, default=0.0, help="how long an idle compute lane waits for a batch to fill"
    )
    parser.add_argument(
        "--max-queued", type=int, default=64, help=f"requests waiting for {who} before RESOURCE_EXHAUSTED"
    )


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
    value = env_value(name)
    return Path(value) if value else None
