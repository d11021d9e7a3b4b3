"""Edge fallback, auth, TLS and health before the models are loaded, on real edge workers."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import edge_worker.server
from edge_worker.server import EdgeConfig, running_edge
from hybrid_sd.credentials import Security
from hybrid_sd.limits import CHANNEL_OPTIONS
from hybrid_sd.v1 import hybrid_sd_pb2 as pb
from hybrid_sd.v1 import hybrid_sd_pb2_grpc as pb_grpc
from tests.serving import channel, free_port


def request(**fields) -> pb.GenerateRequest:
    defaults = dict(prompt="a circle", num_inference_steps=4, switch_step=2, seed=9, scheduler="euler")
    return pb.GenerateRequest(**{**defaults, **fields})


def test_edge_falls_back_when_the_cloud_is_down_only_if_allowed(loop, pair_specs):
    dead_cloud = f"127.0.0.1:{free_port()}"  # nothing listens there
    edge, leave = loop.enter(running_edge(EdgeConfig(pair_specs["sd1"], port=0, cloud=dead_cloud)))
    try:
        stub = pb_grpc.HybridDiffusionStub(channel(edge.port))
        response = stub.Generate(request(allow_edge_fallback=True), timeout=60)
        assert response.edge_fallback and response.switch_step == 0
        assert response.cloud_unet_evaluations == 0 and response.edge_unet_evaluations == 4
        assert response.image.startswith(b"\x89PNG")
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(request(allow_edge_fallback=False), timeout=60)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        # switch_step 0 never needs the cloud
        assert stub.Generate(pb.GenerateRequest(prompt="x", num_inference_steps=2, switch_step=0), timeout=60).image
    finally:
        leave()


def test_bearer_token(loop, pair_specs):
    edge, leave = loop.enter(running_edge(EdgeConfig(pair_specs["sd1"], port=0, security=Security(token="s3cret"))))
    try:
        stub = pb_grpc.HybridDiffusionStub(channel(edge.port))
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as error:
                stub.Generate(request(switch_step=0), timeout=30, metadata=metadata)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.Generate(request(switch_step=0), timeout=60, metadata=(("authorization", "Bearer s3cret"),))
        assert ok.edge_unet_evaluations == 4
        # probes need no token
        health = health_pb2_grpc.HealthStub(channel(edge.port)).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        leave()


def test_not_serving_until_the_model_is_loaded(loop, pair_specs, monkeypatch):
    release = threading.Event()
    real_load = edge_worker.server.load_edge

    def slow_load(*args, **kwargs):
        release.wait(60)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(edge_worker.server, "load_edge", slow_load)
    port = free_port()
    context = running_edge(EdgeConfig(pair_specs["sd1"], port=port))
    future = asyncio.run_coroutine_threadsafe(context.__aenter__(), loop.loop)  # blocks in the load
    health = health_pb2_grpc.HealthStub(channel(port))

    def status() -> int:
        return health.Check(health_pb2.HealthCheckRequest(), timeout=5, wait_for_ready=True).status

    assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as error:
        pb_grpc.HybridDiffusionStub(channel(port)).Generate(request(switch_step=0), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    release.set()
    future.result(60)
    try:
        assert status() == health_pb2.HealthCheckResponse.SERVING
    finally:
        loop.run(context.__aexit__(None, None, None))


def make_certificates(folder) -> dict[str, str]:
    """A CA, a server certificate for localhost, and a client certificate, made with openssl."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=hybrid-sd test CA",
    )
    for name in ("server", "client"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={'localhost' if name == 'server' else 'client'}",
        )
        (folder / f"{name}.ext").write_text("subjectAltName=DNS:localhost\n")
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
        )
    return {name: folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def test_mutual_tls(loop, pair_specs, tmp_path):
    files = make_certificates(tmp_path)
    security = Security(tls_cert=files["server.pem"], tls_key=files["server.key"], tls_client_ca=files["ca.pem"])
    edge, leave = loop.enter(running_edge(EdgeConfig(pair_specs["sd1"], port=0, security=security)))
    target = f"localhost:{edge.port}"
    try:
        with_client_cert = grpc.ssl_channel_credentials(
            files["ca.pem"].read_bytes(), files["client.key"].read_bytes(), files["client.pem"].read_bytes()
        )
        stub = pb_grpc.HybridDiffusionStub(grpc.secure_channel(target, with_client_cert, options=CHANNEL_OPTIONS))
        assert stub.Generate(request(switch_step=0), timeout=60).edge_unet_evaluations == 4
        without = grpc.ssl_channel_credentials(files["ca.pem"].read_bytes())
        stub = pb_grpc.HybridDiffusionStub(grpc.secure_channel(target, without, options=CHANNEL_OPTIONS))
        with pytest.raises(grpc.RpcError) as error:
            stub.Generate(request(switch_step=0), timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails
    finally:
        leave()


def test_graceful_shutdown_finishes_in_flight_requests(loop, pair_specs):
    edge, leave = loop.enter(running_edge(EdgeConfig(pair_specs["sd1"], port=0)))
    stub = pb_grpc.HybridDiffusionStub(channel(edge.port))
    call = stub.Generate.future(request(switch_step=0, num_inference_steps=60), timeout=120)
    time.sleep(0.5)  # the request is denoising
    leave()  # SIGTERM's path: stop taking calls, let in-flight ones finish
    assert call.result().edge_unet_evaluations == 60
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(request(switch_step=0), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
