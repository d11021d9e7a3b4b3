"""The serving command line as a user runs it: processes, ports on loopback, files written."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
import torch
from safetensors.torch import load_file

from hybrid_sd.pipeline import HybridPipeline
from hybrid_sd.request import GenerationRequest
from services.cluster import default_torch_threads
from tests.serving import ctrl_c_reaches, free_port

CLI = [sys.executable, "-m", "hybrid_sd.cli"]


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def wait_serving(target: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if run_cli("health", target, timeout=60).returncode == 0:
                return
        except subprocess.TimeoutExpired:  # a starved machine: the command's own start took that long
            pass
        assert time.monotonic() < deadline, f"{target} never became SERVING"
        time.sleep(1)


def test_cluster_up_serves_generate_from_both_entry_points(tmp_path, model_home, pairs):
    port, http_port = free_port(), free_port()
    gateway, edge = f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"
    command = [*CLI, "cluster", "up", "--port", str(port), "--http-port", str(http_port), "--log-dir", str(tmp_path)]
    cluster = ctrl_c_reaches(
        lambda: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    )
    try:
        wait_serving(gateway)
        wait_serving(edge)
        # Each service gets its share of the cores (both run side by side here, as the replica does).
        commands = [child.cmdline() for child in psutil.Process(cluster.pid).children()]
        shares = {line[line.index("serve") + 1]: line[line.index("--torch-threads") + 1] for line in commands}
        assert shares == dict.fromkeys(("edge", "gateway"), str(default_torch_threads(replicas=1))), shares
        fields = dict(prompt="a blue triangle", switch_step=3, num_inference_steps=6, seed=21)
        threads = torch.get_num_threads()
        torch.set_num_threads(default_torch_threads(replicas=1))  # the cluster's: the same kernels, the same bits
        try:
            expected = HybridPipeline(pairs["shapes"])(GenerationRequest(**fields)).latents  # the default pair
        finally:
            torch.set_num_threads(threads)
        for target in (gateway, edge):
            done = run_cli(
                "generate",
                "--target",
                target,
                "--prompt",
                fields["prompt"],
                "--switch-step",
                "3",
                "--steps",
                "6",
                "--seed",
                "21",
                "--out",
                str(tmp_path / "image.webp"),
                "--latents-out",
                str(tmp_path / "latents.safetensors"),
                "--json",
            )
            assert done.returncode == 0, done.stderr
            summary = json.loads(done.stdout)
            assert summary["unet_evaluations"] == {"cloud": 3, "edge": 3}
            assert summary["handoff_bytes"] > 0 and summary["cloud_replica"]
            assert (tmp_path / "image.webp").read_bytes()[8:12] == b"WEBP"
            assert torch.equal(load_file(tmp_path / "latents.safetensors")["latents"], expected)
        bad = run_cli(
            "generate",
            "--target",
            gateway,
            "--prompt",
            "x",
            "--steps",
            "4",
            "--width",
            "65",
            "--out",
            str(tmp_path / "x.png"),
        )
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "width" in bad.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=30) as page:
            assert page.headers["content-type"].startswith("text/html")
    finally:
        cluster.send_signal(signal.SIGINT)  # Ctrl-C
        output = cluster.communicate(timeout=120)[0]
    assert cluster.returncode == 0, output
    # One line per stage, the page's address, no line from the health polling, no traceback on Ctrl-C.
    lines = output.splitlines()
    assert lines[0] == f"logs in {tmp_path}/ (--verbose: here)"
    assert re.fullmatch(rf"starting the edge worker on {edge}\.\.\. ready in [0-9.]+ s", lines[1])
    assert re.fullmatch(rf"starting the gateway on {gateway}\.\.\. ready in [0-9.]+ s", lines[2])
    assert f"web page: http://127.0.0.1:{http_port}/" in output
    assert re.fullmatch(r"stopping the edge worker and the gateway\.\.\. stopped in [0-9.]+ s", lines[-1])
    assert len(lines) <= 7, output
    for noise in ("Traceback", "UNAVAILABLE", "NOT_SERVING", "fork_posix", "WARNING", "torchvision"):
        assert noise not in output
    assert "gateway serving on port" in (tmp_path / "gateway.log").read_text()  # the full logs


def test_cluster_up_generate_once(tmp_path, model_home):
    out = tmp_path / "hybrid.png"
    done = run_cli(
        "cluster",
        "up",
        "--port",
        str(free_port()),
        "--http-port",
        "0",
        "--generate",
        "a red circle",
        "--steps",
        "5",
        "--seed",
        "4",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout[done.stdout.index("{") : done.stdout.rindex("}") + 1])
    assert summary["seed"] == 4 and summary["switch_step"] == 2
    assert {"cloud_denoise", "edge_denoise", "vae_decode", "total"} <= set(summary["timings_s"])
    assert out.read_bytes().startswith(b"\x89PNG")


def test_health_of_nothing_fails():
    done = run_cli("health", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert done.returncode == 1 and "UNAVAILABLE" in done.stderr


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not on PATH: run setup.sh")
def test_every_compose_service_command_passes_check(model_home, tmp_path):
    from tests.test_compose import service_commands

    token = tmp_path / "ray_auth_token"  # the compose secret, which the Ray nodes' --check looks for
    token.write_text("0" * 64)
    checked = 0
    for service, (command, environment) in service_commands().items():
        if command[0] != "hybrid-sd":
            continue  # the Ray head runs `ray start`
        env = {**os.environ, **environment, "HYBRID_SD_HOME": model_home}
        if "RAY_AUTH_TOKEN_PATH" in environment:
            env["RAY_AUTH_TOKEN_PATH"] = str(token)
        done = run_cli(*command[1:], "--check", env=env)
        assert done.returncode == 0, f"{service}: {done.stderr}"
        assert "valid" in done.stdout
        checked += 1
    assert checked == 3  # cloud, gateway, edge
