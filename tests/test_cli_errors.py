"""The errors a new user meets first: the real ``hybrid-sd`` in a process, one ``hybrid-sd: error:`` line on
stderr naming the thing, exit code 2, no traceback (``--verbose`` keeps it), and nothing loaded or waited for
that the error does not need."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from hybrid_sd.cli import build_parser, main
from hybrid_sd.pairs import preset
from hybrid_sd.presets import EMBEDDED_PRESETS, PRESETS
from tests.serving import free_port

HYBRID_SD = Path(sys.executable).with_name("hybrid-sd")  # the console script of this environment
SHAPES = EMBEDDED_PRESETS["shapes"]
SHAPES_EDGE_UNET = Path(preset("shapes").edge)  # whichever layout the shipped pair has
SD15 = PRESETS["sd15-bk-sdm-tiny"].cloud


def run(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 180):
    return subprocess.run(
        [str(HYBRID_SD), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def error_line(*args: str, env: dict | None = None, cwd: Path | None = None) -> str:
    """The one line ``hybrid-sd ARGS`` prints as it exits with code 2."""
    done = run(*args, env=env, cwd=cwd)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hybrid-sd: error: "), done.stderr
    return lines[0]


def generate(*args: str) -> list[str]:
    return ["generate", "--prompt", "a red circle", "--steps", "2", *args]


def offline_hub(tmp_path: Path, endpoint: str) -> dict:
    """An empty hub cache, offline mode unset, and the hub at ``endpoint``: nothing can be downloaded."""
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {**env, "HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": endpoint}


# Models


def test_hub_model_that_cannot_be_fetched_says_so_at_once(tmp_path):
    env = offline_hub(tmp_path, f"http://127.0.0.1:{free_port()}")  # nothing listens there: an unreachable hub
    started = time.monotonic()
    done = subprocess.run(
        [str(HYBRID_SD), *generate("--pair", "sd15-bk-sdm-tiny", "--out", str(tmp_path / "x.png"))],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    line = done.stderr.strip()
    assert f"cannot fetch model {SD15}: the Hugging Face hub is unreachable" in line
    assert "local diffusers folder" in line and "HF_HUB_OFFLINE=1" in line
    assert elapsed < 20  # hf_hub_download's retries took about 25 s more


def test_hub_model_not_cached_on_a_machine_offline_on_purpose(tmp_path):
    env = {**offline_hub(tmp_path, "http://127.0.0.1:9"), "HF_HUB_OFFLINE": "1"}
    line = error_line(*generate("--pair", "sd15-bk-sdm-tiny", "--out", str(tmp_path / "x.png")), env=env)
    assert f"model {SD15} is not in the hub cache" in line and "HF_HUB_OFFLINE is set" in line


class _NoSuchRepo(BaseHTTPRequestHandler):
    """The hub's answer for a repository that does not exist (or that this user cannot see)."""

    def do_GET(self) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args) -> None:
        pass


@contextmanager
def hub_without_models() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoSuchRepo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()


def test_hub_id_the_hub_does_not_have(tmp_path):
    with hub_without_models() as endpoint:
        args = generate("--cloud-model", "no-org/no-model", "--edge-model", "no-org/no-model", "--out", "x.png")
        line = error_line(*args, env=offline_hub(tmp_path, endpoint), cwd=tmp_path)
    assert "no model no-org/no-model on the Hugging Face hub (a wrong ID" in line and "local diffusers folder" in line


def test_an_unreachable_hub_is_not_asked_again(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from hybrid_sd.model_refs import resolve

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test, as the flag below
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="the Hugging Face hub is unreachable"):
        resolve("org-a/cloud")
    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.is_offline_mode()
    with pytest.raises(ValueError, match="org-b/edge is not in the hub cache"):
        resolve("org-b/edge")


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("/no/such/model", "no model folder at /no/such/model"),
        ("./models/sd15", "no model folder at ./models/sd15"),
        ("~/no-such-model", "no model folder at ~/no-such-model"),
        ("present/sd15", "no model folder at present/sd15"),  # present/ is a folder here: a path, not a hub ID
        ("sd15.safetensors", "no model folder at sd15.safetensors"),
        ("weights.safetensors", "model weights.safetensors is a file; pass the diffusers folder"),
        ("present", "present is not a diffusers model folder (no model_index.json or config.json)"),
    ],
)
def test_model_path_that_is_not_a_model_folder(tmp_path, reference, expected):
    (tmp_path / "present").mkdir()
    (tmp_path / "weights.safetensors").write_bytes(b"")
    args = generate("--cloud-model", reference, "--edge-model", reference, "--out", "x.png")
    env = offline_hub(tmp_path, f"http://127.0.0.1:{free_port()}")  # a path never reaches the hub
    assert error_line(*args, env=env, cwd=tmp_path).startswith(f"hybrid-sd: error: {expected}")


def test_verbose_keeps_the_traceback(tmp_path):
    done = run(
        "--verbose", *generate("--cloud-model", "/no/such/model", "--edge-model", "/no/such/model", "--out", "x.png")
    )
    assert done.returncode == 2
    assert "Traceback" in done.stderr
    assert done.stderr.splitlines()[-1] == (
        "hybrid-sd: error: no model folder at /no/such/model; pass a diffusers model folder or a hub ID (org/name)"
    )


def test_an_unexpected_error_still_shows_its_traceback(monkeypatch):
    import hybrid_sd.cli.health

    def broken(args) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(hybrid_sd.cli.health, "run_health", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["health", "127.0.0.1:1"])


def test_device_that_is_not_there(tmp_path):
    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    line = error_line(*generate("--device", device, "--out", str(tmp_path / "x.png")))
    assert f"device '{device}'" in line and ("no CUDA GPU" in line or "CUDA GPU(s)" in line)


# Edge bundles and model files


def fake_bundle(folder: Path, vae_latent_space: str | None = None) -> Path:
    """A bundle folder: bundle.json, the shapes pair's edge UNet, a decoder config if ``vae_latent_space``."""
    record = {"format": "hybrid-sd-edge-bundle", "version": 1, "vae_latent_space": vae_latent_space}
    shutil.copytree(SHAPES_EDGE_UNET, folder / "unet")
    if vae_latent_space is not None:
        (folder / "vae").mkdir()
        (folder / "vae" / "config.json").write_text("{}")
    (folder / "bundle.json").write_text(json.dumps(record))
    return folder


def test_bundle_for_another_latent_space(tmp_path):
    bundle = fake_bundle(tmp_path / "xl-bundle", "sdxl")
    line = error_line(*generate("--edge-bundle", str(bundle), "--out", str(tmp_path / "x.png")))
    assert f"bundle: {bundle} decodes the sdxl latent space" in line and "denoise in custom-" in line


def test_corrupt_bundle_record(tmp_path):
    bundle = fake_bundle(tmp_path / "bundle")
    (bundle / "bundle.json").write_text("{")
    line = error_line(*generate("--edge-bundle", str(bundle), "--out", str(tmp_path / "x.png")))
    assert f"bundle: cannot read {bundle / 'bundle.json'}" in line


def test_corrupt_safetensors_in_a_bundle(tmp_path):
    bundle = fake_bundle(tmp_path / "bundle")
    weights = bundle / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short, as by an interrupted copy
    line = error_line(*generate("--edge-bundle", str(bundle), "--out", str(tmp_path / "x.png")))
    assert f"cannot load the model at {bundle / 'unet'}" in line


def test_corrupt_model_config(tmp_path):
    edge = tmp_path / "edge-unet"
    shutil.copytree(SHAPES_EDGE_UNET, edge)
    (edge / "config.json").write_text("{")
    args = generate("--cloud-model", str(SHAPES / "cloud"), "--edge-model", str(edge), "--out", str(tmp_path / "x.png"))
    assert f"cannot load the model at {edge}: " in error_line(*args)


def test_evaluate_shapes_of_a_folder_without_a_pair(tmp_path):
    line = error_line("evaluate-shapes", "--pair", str(tmp_path / "nothing"), "--sweep-out", str(tmp_path / "sweep"))
    assert f"no trained pair at {tmp_path / 'nothing'}" in line


# Files the command reads and writes


@pytest.fixture
def prompt_files(tmp_path) -> dict[str, tuple[Path, str]]:
    """A wrong --prompts file of each kind, and what the error says about it."""
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    return {
        "missing": (tmp_path / "missing.txt", "No such file or directory"),
        "folder": (tmp_path, "Is a directory"),
        "empty": (tmp_path / "empty.txt", "has no prompts"),
        "binary": (tmp_path / "image.png", "is not a text file"),
    }


@pytest.mark.parametrize("kind", ["missing", "folder", "empty", "binary"])
def test_sweep_prompts_that_are_not_a_prompt_file(tmp_path, prompt_files, kind):
    path, reason = prompt_files[kind]
    args = ["sweep", "--switch-steps", "0", "--seeds", "0", "--prompts", str(path), "--out", str(tmp_path / "out")]
    line = error_line(*args)
    assert line.startswith("hybrid-sd: error: --prompts: ") and str(path) in line and reason in line


def test_compress_prompts_that_are_not_a_prompt_file(tmp_path, prompt_files):
    path, reason = prompt_files["binary"]
    line = error_line("compress", "prune", "--budget", "0.5", "--prompts", str(path), "--out", str(tmp_path / "b"))
    assert f"--prompts: '{path}' {reason}" in line


def test_output_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = error_line(*generate("--out", str(blocker / "image.png")))
    assert (
        line == f"hybrid-sd: error: --out: cannot write '{blocker / 'image.png'}': '{blocker}' is a file, not a folder"
    )
    line = error_line(
        *generate("--out", str(tmp_path / "x.png"), "--latents-out", str(blocker / "sub" / "l.safetensors"))
    )
    assert line.startswith("hybrid-sd: error: --latents-out: cannot write") and "Not a directory" in line
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    args = ["sweep", "--switch-steps", "0", "--seeds", "0", "--prompts", str(tmp_path / "prompts.txt")]
    assert error_line(*args, "--out", str(blocker)).endswith(f"'{blocker}' is a file, not a folder")


# Servers: ports, TLS files, tokens


@contextmanager
def taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 that something else listens on, the port before it free."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            port = sock.getsockname()[1]
            with socket.socket() as before:
                try:
                    before.bind(("127.0.0.1", port - 1))
                except OSError:
                    continue
            yield port
            return


def test_serve_edge_on_a_taken_port():
    with taken_port() as port:
        line = error_line("serve", "edge", "--port", str(port))
    assert line == (
        f"hybrid-sd: error: the edge worker cannot listen on port {port} of 127.0.0.1 (Address already in use);"
        " choose another with --port"
    )


@pytest.mark.parametrize("service", ["gateway", "edge worker"])
def test_cluster_up_names_the_taken_port_before_starting_anything(service):
    with taken_port() as port:
        gateway_port = port if service == "gateway" else port - 1
        started = time.monotonic()
        line = error_line("cluster", "up", "--port", str(gateway_port))
    assert line.startswith(f"hybrid-sd: error: the {service} cannot listen on port {port} of 127.0.0.1")
    assert "choose another --port" in line
    assert time.monotonic() - started < 30  # neither Ray nor a model was started


def test_tls_file_that_does_not_exist(tmp_path):
    line = error_line("serve", "edge", "--port", "0", "--tls-cert", "/no/cert.pem", "--tls-key", "/no/key.pem")
    assert line == "hybrid-sd: error: tls_cert '/no/cert.pem' is not a file"
    target = f"127.0.0.1:{free_port()}"
    line = error_line(*generate("--target", target, "--tls-ca", "/no/ca.pem", "--out", str(tmp_path / "x.png")))
    assert line == "hybrid-sd: error: tls_ca '/no/ca.pem': No such file or directory"
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    line = error_line(
        *generate("--target", target, "--tls-ca", str(tmp_path / "ca.pem"), "--out", str(tmp_path / "x.png"))
    )
    assert f"tls_ca '{tmp_path / 'ca.pem'}' is not a PEM certificate" in line


def test_empty_token(tmp_path, monkeypatch):
    line = error_line("serve", "edge", "--port", "0", "--token", "")
    assert line == "hybrid-sd: error: --token is empty: give the bearer token, or leave it out to turn auth off"
    line = error_line(
        *generate("--target", f"127.0.0.1:{free_port()}", "--token", " ", "--out", str(tmp_path / "x.png"))
    )
    assert "--token is empty" in line
    monkeypatch.setenv("HYBRID_SD_TOKEN", "")  # empty in the environment is unset: docker-compose's "auth off"
    assert build_parser().parse_args(["serve", "edge"]).token is None
