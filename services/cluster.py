"""``hybrid-sd cluster up``: the embedded topology as supervised processes on loopback."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
import time

from hybrid_sd.cli.arguments import local_pair_spec
from hybrid_sd.cli.health import check_health
from hybrid_sd.limits import RequestLimits, limits_from_args
from hybrid_sd.ports import check_can_listen
from hybrid_sd.stages import stage
from hybrid_sd.switch_profile import load_profile
from services.logs import print_stages
from services.serve import interrupt
from services.supervisor import Child, Supervisor


def run_cluster_up(args: argparse.Namespace) -> None:
    """The embedded topology as processes on loopback: an edge worker, and a gateway that starts
    Ray locally with the denoiser deployment. The edge can reach the gateway too. One line per stage;
    the services' full logs go to files under ``--log-dir`` (with ``--verbose``: here)."""
    _check_ports(args.port, "--port", ("gateway", "edge worker"))
    if args.http_port:
        _check_ports(args.http_port, "--http-port", ("gateway's HTTP server", "edge worker's HTTP server"))
    local_pair_spec(args)  # both servers load their models here: check them before starting either
    gateway, edge = f"127.0.0.1:{args.port}", f"127.0.0.1:{args.port + 1}"
    http_ports = (args.http_port, args.http_port + 1) if args.http_port else (0, 0)
    common = _model_flags(args) + _limit_flags(limits_from_args(args))
    common += ["--torch-threads", str(args.torch_threads or default_torch_threads(args.replicas))]
    # The embedded edge worker serves every client of the cluster: it batches as the replicas do.
    common += ["--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms)]
    common += ["--max-queued", str(args.max_queued)]
    if args.profile:
        load_profile(args.profile)  # a bad file fails here, not in both children
        common += ["--profile", str(args.profile)]
    base = [sys.executable, "-m", "hybrid_sd.cli", "--verbose"]  # the full log, here or in its file
    edge_command = [*base, "serve", "edge", "--port", str(args.port + 1), "--cloud", gateway, *common]
    edge_command += ["--http-port", str(http_ports[1])]
    gateway_command = [*base, "serve", "gateway", "--port", str(args.port), "--edge", edge, *common]
    gateway_command += ["--http-port", str(http_ports[0]), "--replicas", str(args.replicas)]
    logs = None if args.verbose else args.log_dir
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor(
        [
            Child("edge worker", edge_command, logs / "edge.log" if logs else None),
            Child("gateway", gateway_command, logs / "gateway.log" if logs else None),
        ]
    )
    print_stages(also_logged=False)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        if logs is not None:
            print(f"logs in {logs}/ (--verbose: here)", flush=True)
        supervisor.start()
        for target, child in zip((edge, gateway), supervisor.children, strict=True):
            with stage(f"starting the {child.name} on {target}"):
                _wait_until_serving(target, supervisor)
        print(f"cluster up: gateway {gateway}, edge {edge} (both serve HybridDiffusion)", flush=True)
        if args.http_port:
            print(f"web page: http://127.0.0.1:{http_ports[0]}/ (the edge's: http://127.0.0.1:{http_ports[1]}/)")
        if args.generate is not None:
            _generate_once(gateway, args)
            return
        while True:  # until Ctrl-C or SIGTERM; a child that exits is restarted
            supervisor.poll()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print()  # past the terminal's ^C
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the stop short
            signal.signal(signum, signal.SIG_IGN)
        with stage("stopping the edge worker and the gateway", "stopped"):
            supervisor.stop()


def default_torch_threads(replicas: int) -> int:
    """This machine's cores shared among the processes that compute side by side here: each replica and the edge
    worker. With more torch threads than cores every UNet call waits on the others' (libgomp stops spinning
    between parallel regions): on 2 cores, one thread each instead of two halves the shapes pair's request."""
    return max(1, len(os.sched_getaffinity(0)) // (replicas + 1))


def _check_ports(first: int, flag: str, services: tuple[str, str]) -> None:
    """``first`` and the next port free on loopback for ``services``."""
    if not 1 <= first < 65535:
        raise ValueError(f"{flag} must be in [1, 65534] (the edge worker takes the next one), got {first}")
    for port, service in zip((first, first + 1), services, strict=True):
        check_can_listen("127.0.0.1", port, service, f"choose another {flag} (the edge worker takes the next one)")


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


def _wait_until_serving(target: str, supervisor: Supervisor, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while asyncio.run(check_health(target, "", 2.0, None, quiet=True)) != 0:
        exited = supervisor.exited()
        if exited:
            child = exited[0]
            raise RuntimeError(
                f"the {child.name} exited with code {child.process.returncode} before {target} was serving"
                f" (its output: {child.log or 'above'})"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"{target} was not serving after {timeout:.0f} s")
        time.sleep(0.5)


def _generate_once(gateway: str, args: argparse.Namespace) -> None:
    from hybrid_sd.client import generate_remote
    from hybrid_sd.request import GenerationRequest
    from hybrid_sd.results import CallOptions, OutputSpec
    from hybrid_sd.user_files import image_format_for

    request = GenerationRequest(
        args.generate, switch_step=args.switch_step, num_inference_steps=args.steps, seed=args.seed
    )
    options = CallOptions(output=OutputSpec(image_format=image_format_for(args.out), latents=False))
    result = asyncio.run(generate_remote(gateway, request, options))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(result.image_data)
    print(json.dumps(result.summary(), indent=2))
    print(f"wrote {args.out}")
