"""Ray beyond one node, as processes on this host: a Ray head with no CPUs and token authentication,
two cloud nodes (``hybrid-sd serve cloud``), the gateway joining as a third node and an edge worker.

Generate lands on replicas of both cloud nodes and says which; a node without the cluster's token is
refused; and once stopped, no process of the cluster is left, Ray's agents included. Every process
gets a HOME of its own (so no ``~/.ray/auth_token`` of this machine counts) and a PATH without this
virtualenv (so nothing runs the ``ray`` executable from PATH).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil  # a dependency of accelerate, and of Ray's own process management
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hybrid_sd import cli
from hybrid_sd.v1 import hybrid_sd_pb2 as pb
from hybrid_sd.v1 import hybrid_sd_pb2_grpc as pb_grpc
from tests.serving import channel, free_port

CLI = [sys.executable, "-m", "hybrid_sd.cli"]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]
REFUSED = "Authentication token is missing or incorrect"
START_TIMEOUT_S = 300
STOP_TIMEOUT_S = 90
NO_DRAIN = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def node_flags() -> str:
    """``ray start`` flags that let several nodes share one host: ports of their own."""
    return f"--dashboard-agent-listen-port {free_port()} --min-worker-port 0 --max-worker-port 0"


@dataclass
class Cluster:
    """Processes started for one test, each in a session of its own, with logs under ``root``."""

    root: Path
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, *command: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(self.root / f"{name}.log", "w") as log:
            process = subprocess.Popen(
                command, env=env or self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if name != "intruder" and process.poll() is not None:
                pytest.fail(f"{name} exited with code {process.returncode}:\n{self.log(name)[-4000:]}")

    def node_id(self, temp_dir: Path) -> str:
        """The Ray node id of the raylet whose session lives under ``temp_dir``."""
        for process in self.running():
            command = process.cmdline()
            if Path(command[0]).name == "raylet" and any(str(temp_dir) + "/" in arg for arg in command):
                return next(arg.split("=", 1)[1] for arg in command if arg.startswith("--node_id="))
        raise AssertionError(f"no raylet of {temp_dir}")

    def running(self) -> list[psutil.Process]:
        """Every running process of this cluster: its command line or its environment (HOME) names ``root``."""
        mine = []
        for process in psutil.process_iter():
            try:
                if any(str(self.root) in text for text in (*process.cmdline(), *process.environ().values())):
                    mine.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return mine

    def stop(self) -> None:
        """SIGTERM as an operator would: the gateway first (it removes its application and its node),
        then the cloud nodes and the edge at once (they drain through the head), then the head."""
        gateway, head = self.processes.pop("gateway", None), self.processes.pop("head", None)
        for group in ([gateway] if gateway else [], list(self.processes.values()), [head] if head else []):
            for process in group:
                process.send_signal(signal.SIGTERM)
            for process in group:
                try:
                    process.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()

    def kill_leftovers(self, grace_s: float = 20) -> list[str]:
        """SIGKILL whatever of this cluster still runs after ``grace_s`` (Ray's agents exit once
        they notice their raylet is gone); returns what each was and the files it had open."""
        deadline = time.monotonic() + grace_s
        while self.running() and time.monotonic() < deadline:
            time.sleep(1)
        left = []
        for process in self.running():
            try:
                files = sorted({Path(file.path).name for file in process.open_files()})
                left.append(f"{process.pid} {' '.join(process.cmdline()).strip()[:150]} {files}")
                process.kill()
            except psutil.NoSuchProcess:
                continue
        return left


def wait_serving(cluster: Cluster, port: int, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    stub = health_pb2_grpc.HealthStub(channel(port))
    while True:
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        cluster.check_alive()
        assert time.monotonic() < deadline, f"port {port} was not serving after {timeout:.0f} s"
        time.sleep(1)


def wait_for_file(cluster: Cluster, path: Path, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        cluster.check_alive()
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout:.0f} s"
        time.sleep(0.5)


def generate(port: int, seed: int) -> pb.GenerateResponse:
    request = pb.GenerateRequest(prompt="a red circle", num_inference_steps=4, switch_step=2, seed=seed)
    return pb_grpc.HybridDiffusionStub(channel(port)).Generate(request, timeout=120)


@pytest.fixture
def cluster(model_home):
    # Short: Ray's unix socket paths under a node's temp dir must fit in 107 characters.
    root = Path(tempfile.mkdtemp(prefix="hsd-mn-"))
    (root / "home").mkdir()
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH_", "RAY_ADDRESS"))}
    env.update(HOME=str(root / "home"), PATH=path, RAY_USAGE_STATS_ENABLED="0")
    running = Cluster(root, env)
    try:
        yield running
    finally:
        running.stop()
        left = running.kill_leftovers()
        assert not left, f"left running after the cluster stopped (logs in {root}): {left}"
        shutil.rmtree(root, ignore_errors=True)


def test_multinode_cluster_with_token_auth(cluster):
    token = cluster.root / "token"
    token.write_text(secrets.token_hex(32))
    wrong_token = cluster.root / "wrong-token"
    wrong_token.write_text(secrets.token_hex(32))
    gcs, gateway_port, edge_port = free_port(), free_port(), free_port()
    head_address = f"127.0.0.1:{gcs}"
    one_thread = ["--torch-threads", "1"]

    cluster.start(
        "head",
        *RAY,
        "start",
        "--head",
        "--block",
        "--num-cpus=0",
        "--num-gpus=0",
        f"--port={gcs}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-port={free_port()}",
        "--include-dashboard=false",
        f"--temp-dir={cluster.root / 'head'}",
        *node_flags().split(),
        # No drain on SIGTERM: Serve's controller lives on the head, which would wait out Ray's 30 s for it.
        env={**cluster.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), **NO_DRAIN},
    )
    cluster.start(
        "edge", *CLI, "serve", "edge", "--port", str(edge_port), "--cloud", f"127.0.0.1:{gateway_port}", *one_thread
    )
    wait_for_file(cluster, cluster.root / "head" / "ray_current_cluster")

    def join(name: str, token_file: Path) -> list[str]:
        """The flags of a node joining the head, with its own temp dir."""
        return [
            "--ray-address",
            head_address,
            "--ray-token-file",
            str(token_file),
            "--ray-temp-dir",
            str(cluster.root / name),
        ]

    for name in ("cloud1", "cloud2"):
        cluster.start(name, *CLI, "serve", "cloud", *join(name, token), "--ray-start-args", node_flags())
    intruder = cluster.start(
        "intruder", *CLI, "serve", "cloud", *join("intruder", wrong_token), "--ray-start-args", node_flags()
    )
    cluster.start(
        "gateway",
        *CLI,
        "serve",
        "gateway",
        "--port",
        str(gateway_port),
        "--edge",
        f"127.0.0.1:{edge_port}",
        *join("gateway", token),
        "--ray-start-args",
        node_flags(),
        "--replicas",
        "2",
        "--max-replicas-per-node",
        "1",
        *one_thread,
    )
    wait_serving(cluster, edge_port)
    wait_serving(cluster, gateway_port)

    assert intruder.wait(START_TIMEOUT_S) == 2
    assert REFUSED in cluster.log("intruder")
    assert cluster.log("intruder").splitlines()[-1].startswith("hybrid-sd: error: could not join the Ray cluster")

    cloud_nodes = {cluster.node_id(cluster.root / name) for name in ("cloud1", "cloud2")}
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda seed: generate(gateway_port, seed), range(6)))
    for response in responses:
        assert response.cloud_unet_evaluations == 2 and response.edge_unet_evaluations == 2
        assert response.cloud_replica and response.image.startswith(b"\x89PNG")
    assert {response.cloud_node for response in responses} == cloud_nodes  # both replicas served
    # A request that starts at the edge reaches a replica through the gateway's Denoise, and says where.
    assert generate(edge_port, 7).cloud_node in cloud_nodes
    assert cluster.node_id(cluster.root / "gateway") not in cloud_nodes


def test_serve_cloud_runs_ray_of_this_interpreter(tmp_path):
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
    env.update(PATH=os.defpath, HOME=str(tmp_path))  # no virtualenv on PATH
    command = [*CLI, "serve", "cloud", "--ray-address", "127.0.0.1:6379", "--check"]
    done = subprocess.run([*command, "--ray-token-file", str(token)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{sys.executable} -m ray.scripts.scripts start --address 127.0.0.1:6379 --block" in done.stdout

    done = subprocess.run(command, env=env, capture_output=True, text=True)  # no token anywhere
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].startswith("hybrid-sd: error: Ray token authentication is on")
    assert "Traceback" not in done.stderr


def test_serve_cloud_without_ray_fails_in_one_line(monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        "importlib.util.find_spec", lambda name, *args: None if name == "ray" else find_spec(name, *args)
    )
    assert cli.main(["serve", "cloud", "--ray-address", "127.0.0.1:6379", "--check"]) == 2
    assert (
        capsys.readouterr().err
        == f"hybrid-sd: error: Ray is not installed for {sys.executable}: install hybrid-sd's dependencies there\n"
    )
