"""The local cluster definition: docker-compose.yml (and the CPU-only override) as a real compose
validator resolves it, checked against the CLI contract (docs/design.md, "Topology").

No Docker engine is needed: ``docker-compose config`` validates the files against the Compose
schema, merges the override, interpolates ``${VAR:-default}`` and prints the result, which is what
these tests read. ``scripts/setup.sh`` installs ``docker-compose`` (Debian's, version 1.29); where it
is missing they skip, and the skip policy (``skip_policy.py``) fails the run naming them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml  # PyYAML: a dependency of ray[serve], transformers and huggingface_hub

from hybrid_sd.presets import DEFAULT_PAIR

ROOT = Path(__file__).resolve().parents[1]
BASE = "docker-compose.yml"
CPU = "docker-compose.cpu.yml"

# role -> the port its gRPC server listens on and publishes
GRPC_PORTS = {"gateway": 50051, "edge": 50052}
HTTP_PORTS = {"gateway": 8080, "edge": 8081}  # and /metrics
HYBRID_SD_SERVICES = {"cloud": "cloud", "gateway": "gateway", "edge": "edge"}  # service -> `serve` role
MODEL_HOME = "/models"
RAY_SERVICES = {"ray-head", "cloud", "gateway"}  # the Ray nodes (the gateway joins as one)
RAY_TOKEN_SECRET = "ray_auth_token"


def resolved_config(*files: str, env: dict[str, str] | None = None) -> dict:
    """``docker-compose -f FILE... config``, parsed. The variables the files interpolate are taken
    from ``env`` alone (neither the caller's environment nor a stray ``.env`` file leaks in), so
    defaults are what a bare checkout gets."""
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip(
            "docker-compose is not on PATH: run `bash scripts/setup.sh` as root, or apt-get install docker-compose"
        )
    clean = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("HYBRID_SD_", "COMPOSE_", "TORCH_INDEX_URL"))
    }
    clean.update(env or {})
    with tempfile.TemporaryDirectory() as scratch:
        empty_env_file = Path(scratch) / "empty.env"
        empty_env_file.write_text("")
        args = [compose, "--env-file", str(empty_env_file)]
        for name in files or (BASE,):
            args += ["-f", str(ROOT / name)]
        result = subprocess.run(
            [*args, "config"], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=120, check=False
        )
    if result.returncode != 0:
        pytest.fail(f"{' '.join(args)} config failed ({result.returncode}):\n{result.stderr}")
    return yaml.safe_load(result.stdout)


def default_services(config: dict) -> dict[str, dict]:
    """The services ``docker compose up`` starts without ``--profile``."""
    return {name: service for name, service in config["services"].items() if not service.get("profiles")}


def service_commands(*files: str, env: dict[str, str] | None = None) -> dict[str, tuple[list[str], dict[str, str]]]:
    """{service: (command, environment)} for every service ``up`` starts, from the resolved config
    of ``files`` (default: docker-compose.yml alone; pass BASE, CPU for the CPU-only cluster).

    For a test that runs each ``hybrid-sd serve ...`` command with ``--check`` once the CLI exists
    (not written here): take the services whose command starts with ``hybrid-sd``, append
    ``--check``, and run it with the environment merged over ``os.environ``. Point
    ``HYBRID_SD_HOME`` at a temporary folder instead of the container path ``/models``, and mind
    that the addresses (``ray-head:6379``, ``edge:50052``, ``gateway:50051``) are compose host
    names that do not resolve outside the cluster network. ``ray-head`` runs ``ray start``, which
    has no ``--check``.
    """
    config = resolved_config(*files, env=env)
    return {
        name: ([str(arg) for arg in service["command"]], {k: str(v) for k, v in service.get("environment", {}).items()})
        for name, service in default_services(config).items()
    }


def flag(command: list[str], name: str) -> str:
    """The value after ``name`` in a command list."""
    assert name in command, f"{name} missing from {command}"
    return str(command[command.index(name) + 1])


def volume_mounts(service: dict) -> set[tuple[str, str]]:
    """(source, target) of each mount; docker-compose 1.29 prints ``src:dst[:mode]`` strings,
    Compose v2 long-form mappings."""
    mounts = set()
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts.add((volume.get("source"), volume["target"]))
        else:
            source, target, *_ = volume.split(":")
            mounts.add((source, target))
    return mounts


def published_ports(service: dict) -> set[int]:
    ports = set()
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.add(int(port["published"]))
        else:  # [ip:]published:target[/proto]
            ports.add(int(str(port).split("/")[0].split(":")[-2]))
    return ports


def gpu_devices(service: dict) -> list[dict]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


@pytest.fixture(scope="module")
def config() -> dict:
    return resolved_config(BASE)


@pytest.fixture(scope="module")
def cpu_config() -> dict:
    return resolved_config(BASE, CPU)


def test_the_four_services(config):
    assert set(default_services(config)) == {"ray-head", "cloud", "gateway", "edge"}
    assert set(config["services"]) - set(default_services(config)) == {"prometheus"}  # --profile metrics


def test_prometheus_scrapes_both_http_ports(config):
    services = config["services"]
    assert services["prometheus"]["profiles"] == ["metrics"]
    scraped = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())["scrape_configs"][0]
    targets = scraped["static_configs"][0]["targets"]
    for name, port in HTTP_PORTS.items():
        assert int(flag(services[name]["command"], "--http-port")) == port and port in published_ports(services[name])
        assert f"{name}:{port}" in targets


def test_ray_head_command_and_healthcheck(config):
    head = config["services"]["ray-head"]
    assert head["command"][:3] == ["ray", "start", "--head"]
    assert "--port=6379" in head["command"] and "--block" in head["command"]
    assert head["healthcheck"]["test"][0] == "CMD" and head["healthcheck"]["test"][1] == "ray"
    assert not head["healthcheck"].get("disable")


@pytest.mark.parametrize("name", sorted(HYBRID_SD_SERVICES))
def test_hybrid_sd_service_command_and_healthcheck(config, name):
    service = config["services"][name]
    command = [str(arg) for arg in service["command"]]
    assert command[:3] == ["hybrid-sd", "serve", HYBRID_SD_SERVICES[name]]
    assert "--check" not in command
    healthcheck = service["healthcheck"]
    assert healthcheck["test"][0] == "CMD" and not healthcheck.get("disable")
    if name in GRPC_PORTS:
        port = GRPC_PORTS[name]
        assert command[command.index("--host") + 1] == "0.0.0.0"
        assert int(flag(command, "--port")) == port
        assert healthcheck["test"][1:] == ["hybrid-sd", "health", f"localhost:{port}"]
        assert port in published_ports(service)


def test_wiring_between_services(config):
    services = config["services"]
    gateway, edge, cloud = (services[name]["command"] for name in ("gateway", "edge", "cloud"))
    assert flag(gateway, "--edge") == "edge:50052"
    assert flag(gateway, "--ray-address") == "ray-head:6379"
    assert flag(cloud, "--ray-address") == "ray-head:6379"
    assert flag(edge, "--cloud") == "gateway:50051"  # edge-initiated requests reach the cloud
    # The gateway starts once the Ray head and the edge it hands over to report healthy.
    for dependency in ("ray-head", "edge"):
        assert services["gateway"]["depends_on"][dependency]["condition"] == "service_healthy"
    assert services["cloud"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    # The edge must not wait for the gateway: that would be a cycle.
    assert "gateway" not in services["edge"].get("depends_on", {})


def test_model_volume_on_every_service(config):
    assert "models" in config["volumes"]
    for name, service in default_services(config).items():
        assert ("models", MODEL_HOME) in volume_mounts(service), name
        assert service["environment"]["HYBRID_SD_HOME"] == MODEL_HOME, name


def test_one_image_for_every_service(config):
    images = {service["image"] for service in default_services(config).values()}
    assert len(images) == 1
    for service in default_services(config).values():
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        assert service["build"]["args"]["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"


@pytest.mark.parametrize("pair", [None, "tiny-sdxl"])
def test_pair_comes_from_the_environment(pair):
    env = {} if pair is None else {"HYBRID_SD_PAIR": pair}
    expected = pair or DEFAULT_PAIR  # the default when HYBRID_SD_PAIR is unset
    commands = service_commands(BASE, env=env)
    assert set(commands) == {"ray-head", "cloud", "gateway", "edge"}
    for name, (command, environment) in commands.items():
        assert environment["HYBRID_SD_PAIR"] == expected, name
        if "--pair" in command:
            assert flag(command, "--pair") == expected, name
    assert {name for name, (command, _) in commands.items() if "--pair" in command} == {"gateway", "edge"}


def test_security_settings_default_off():
    _, environment = service_commands(BASE)["gateway"]
    for name in ("HYBRID_SD_TOKEN", "HYBRID_SD_TLS_CERT", "HYBRID_SD_TLS_KEY", "HYBRID_SD_TLS_CLIENT_CA"):
        assert environment[name] == "", name
    _, environment = service_commands(BASE, env={"HYBRID_SD_TOKEN": "s3cret"})["edge"]
    assert environment["HYBRID_SD_TOKEN"] == "s3cret"


def test_cloud_reserves_nvidia_gpus(config):
    devices = gpu_devices(config["services"]["cloud"])
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia"
    assert "gpu" in devices[0]["capabilities"]
    assert devices[0]["count"] in ("all", -1)  # Compose v2 prints "all" as -1
    assert int(flag(config["services"]["gateway"]["command"], "--gpus-per-replica")) >= 1
    for name in ("ray-head", "gateway", "edge"):
        assert not gpu_devices(config["services"][name]), name


def test_cpu_override_starts_a_cluster_without_gpus(config, cpu_config):
    started = default_services(cpu_config)
    assert set(started) == {"ray-head", "cloud-cpu", "gateway", "edge"}
    assert cpu_config["services"]["cloud"]["profiles"] == ["gpu"]
    for name, service in started.items():
        assert not gpu_devices(service), name

    # cloud-cpu is the GPU node's service, repeated (anchors do not cross files), without GPUs.
    cloud, cloud_cpu = config["services"]["cloud"], started["cloud-cpu"]
    assert cloud_cpu["command"] == cloud["command"] + ["--num-gpus", "0"]
    for key in ("image", "build", "environment", "secrets", "volumes", "depends_on", "healthcheck", "shm_size"):
        assert cloud_cpu[key] == cloud[key], key

    # The gateway asks for CPU replicas and is otherwise unchanged.
    gateway, cpu_gateway = config["services"]["gateway"]["command"], started["gateway"]["command"]
    assert flag(cpu_gateway, "--gpus-per-replica") == "0"
    position = gateway.index("--gpus-per-replica") + 1
    assert cpu_gateway[:position] + cpu_gateway[position + 1 :] == gateway[:position] + gateway[position + 1 :]


def test_cpu_override_follows_the_pair_too():
    commands = service_commands(BASE, CPU, env={"HYBRID_SD_PAIR": "tiny-sdxl"})
    for name, (command, environment) in commands.items():
        assert environment["HYBRID_SD_PAIR"] == "tiny-sdxl", name
        if "--pair" in command:
            assert flag(command, "--pair") == "tiny-sdxl", name


def secret_sources(service: dict) -> set[str]:
    """The secrets mounted in a service; short (name) or long (source/target) syntax."""
    return {secret if isinstance(secret, str) else secret["source"] for secret in service.get("secrets", [])}


@pytest.mark.parametrize("files", [(BASE,), (BASE, CPU)], ids=["gpu", "cpu"])
def test_every_ray_node_gets_the_token_from_one_secret(files):
    """Ray's token authentication: every Ray process reads the one token file, the secret, at the
    path Ray's RAY_AUTH_TOKEN_PATH names, and RAY_AUTH_MODE=token makes joining nodes send it."""
    config = resolved_config(*files)
    assert set(config["secrets"]) == {RAY_TOKEN_SECRET}
    assert Path(config["secrets"][RAY_TOKEN_SECRET]["file"]) == ROOT / "ray_auth_token"
    ray_services = RAY_SERVICES - {"cloud"} | ({"cloud-cpu"} if CPU in files else {"cloud"})
    started = default_services(config)
    for name, service in started.items():
        if name not in ray_services:
            assert not secret_sources(service) and "RAY_AUTH_TOKEN_PATH" not in service["environment"], name
            continue
        assert secret_sources(service) == {RAY_TOKEN_SECRET}, name
        assert service["environment"]["RAY_AUTH_MODE"] == "token", name
        assert service["environment"]["RAY_AUTH_TOKEN_PATH"] == f"/run/secrets/{RAY_TOKEN_SECRET}", name
        assert "RAY_AUTH_TOKEN" not in service["environment"], name  # it would win over the file
    assert set(started) & ray_services == ray_services
