"""The cluster as an outside client and an operator meet it: `hybrid-sd cluster up` processes on loopback,
every method found through server reflection and sent garbage, oversized and random requests; then the
servers still answer SERVING and a correct image."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import psutil
import pytest
import torch
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from hybrid_sd.pipeline import HybridPipeline
from hybrid_sd.request import GenerationRequest
from hybrid_sd.v1 import hybrid_sd_pb2 as pb
from hybrid_sd.v1 import hybrid_sd_pb2_grpc as pb_grpc
from hybrid_sd.wire import tensor_from_pb
from services.supervisor import session_processes
from tests.serving import channel, free_port
from tests.test_cli_serving import CLI

# Statuses a malformed or random request may get; UNKNOWN and INTERNAL mean the server did not understand
# its own failure.
ANSWERS_TO_RANDOM_REQUESTS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,  # health of an unknown service, reflection of an unknown symbol
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNIMPLEMENTED,  # Health.List: grpcio-health-checking's aio servicer has none
}
CALL_TIMEOUT = 30


def health(port: int) -> str:
    try:
        reply = health_pb2_grpc.HealthStub(channel(port)).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.RpcError as error:
        return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_serving(port: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while health(port) != "SERVING":
        assert time.monotonic() < deadline, f"127.0.0.1:{port} never became SERVING"
        time.sleep(0.5)


@dataclass(frozen=True)
class Method:
    path: str  # /package.Service/Method
    request_type: type[Message]
    server_streaming: bool
    client_streaming: bool


@pytest.fixture(scope="module")
def cluster(model_home, tmp_path_factory):
    """``cluster up`` with the default pair; ``sessions`` collects the session of every child it ran, to
    check that a stop leaves none of their processes (Ray's included)."""
    port, logs = free_port(), tmp_path_factory.mktemp("logs")
    command = [*CLI, "cluster", "up", "--port", str(port), "--torch-threads", "1", "--http-port", "0"]
    process = subprocess.Popen([*command, "--log-dir", str(logs)])
    running = {"gateway": port, "edge": port + 1, "process": process, "sessions": set()}
    try:
        for role in ("gateway", "edge"):
            wait_serving(running[role])
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)


def children(cluster) -> dict[str, psutil.Process]:
    """The cluster's edge worker and gateway processes, by role (each is its session's leader)."""
    found = {}
    for child in psutil.Process(cluster["process"].pid).children():
        command = " ".join(child.cmdline())
        role = "edge" if " serve edge " in command else "gateway" if " serve gateway " in command else None
        if role:
            found[role] = child
            cluster["sessions"].add(child.pid)
    return found


def reflected_methods(port: int) -> list[Method]:
    """Every method the server lists through reflection, with its request class built from the
    descriptors the server sends (as grpcurl would)."""
    database = ProtoReflectionDescriptorDatabase(channel(port))
    pool = descriptor_pool.DescriptorPool(database)
    methods = []
    for service_name in database.get_services():
        for method in pool.FindServiceByName(service_name).methods:
            methods.append(
                Method(
                    f"/{service_name}/{method.name}",
                    message_factory.GetMessageClass(method.input_type),
                    method.server_streaming,
                    method.client_streaming,
                )
            )
    return methods


def call_raw(port: int, method: Method, data: bytes) -> grpc.StatusCode:
    """Send ``data`` as the request bytes of ``method``; the status it ends with."""
    # Health.Watch streams until the client leaves: a valid request to it ends at its deadline.
    timeout = 2 if method.path == "/grpc.health.v1.Health/Watch" else CALL_TIMEOUT
    with channel(port) as open_channel:
        try:
            if method.client_streaming:
                call = open_channel.stream_stream(method.path)
                for _ in call(iter([data]), timeout=timeout):
                    pass
            elif method.server_streaming:
                for _ in open_channel.unary_stream(method.path)(data, timeout=timeout):
                    pass
            else:
                open_channel.unary_unary(method.path)(data, timeout=timeout)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def parses(request_type: type[Message], data: bytes) -> bool:
    try:
        request_type.FromString(data)
    except DecodeError:
        return False
    return True


def random_message(descriptor: Descriptor, rng: random.Random, depth: int = 0) -> Message:
    """A message with random values in random fields: huge and negative numbers, odd strings, unknown enums."""
    message = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if rng.random() < 0.4:
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 2 or field.message_type.GetOptions().map_entry:
                continue
            values = [random_message(field.message_type, rng, depth + 1) for _ in range(rng.randint(1, 2))]
            if field.is_repeated:
                getattr(message, field.name).extend(values)
            else:
                getattr(message, field.name).CopyFrom(values[0])
            continue
        values = [random_value(field, rng) for _ in range(rng.randint(1, 3))]
        if field.is_repeated:
            getattr(message, field.name).extend(values)
        else:
            setattr(message, field.name, values[0])
    return message


def random_value(field: FieldDescriptor, rng: random.Random):
    kind = field.type
    if kind == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if kind in (FieldDescriptor.TYPE_STRING,):
        return rng.choice(["", "a red square", "ddim", "x" * rng.randint(1, 5000), "\u00e9\u6f22\U0001f600", "{}"])
    if kind == FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.randint(0, 64))
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return rng.choice([0.0, -1.0, 7.5, 1e30, float("nan"), float("inf"), rng.uniform(-100, 100)])
    if kind == FieldDescriptor.TYPE_ENUM:
        return rng.choice([*(value.number for value in field.enum_type.values), 99, -5])
    unsigned = kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64)
    bits = 64 if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64) else 32
    low, high = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return max(low, min(high, rng.choice([0, 1, 3, 8, 64, 2**31 - 1, -1, high, low, rng.randint(-10, 100)])))


def methods_of_both(cluster) -> Iterator[tuple[str, int, Method]]:
    for role in ("gateway", "edge"):
        for method in reflected_methods(cluster[role]):
            yield role, cluster[role], method


def assert_still_serves_a_correct_image(cluster, pairs) -> None:
    fields = dict(prompt="a small red circle", switch_step=2, num_inference_steps=4, seed=7)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the cluster's (--torch-threads 1): bit-exactness needs the same kernels
    try:
        expected = HybridPipeline(pairs["shapes"])(GenerationRequest(**fields)).latents
    finally:
        torch.set_num_threads(threads)
    for role in ("gateway", "edge"):
        wait_serving(cluster[role], timeout=60)
        response = pb_grpc.HybridDiffusionStub(channel(cluster[role])).Generate(
            pb.GenerateRequest(**fields, output_format=pb.OUTPUT_FORMAT_LATENTS), timeout=60
        )
        assert torch.equal(tensor_from_pb(response.latents, "latents"), expected), role


def test_reflection_lists_every_service(cluster):
    services = {
        role: {method.path.split("/")[1] for method in reflected_methods(port)}
        for role, port in (("gateway", cluster["gateway"]), ("edge", cluster["edge"]))
    }
    assert {"hybrid_sd.v1.HybridDiffusion", "hybrid_sd.v1.CloudDenoiser", "grpc.health.v1.Health"} <= services[
        "gateway"
    ]
    assert {"hybrid_sd.v1.HybridDiffusion", "hybrid_sd.v1.EdgeRefiner"} <= services["edge"]
    assert all("grpc.reflection.v1alpha.ServerReflection" in names for names in services.values())


def test_random_bytes_to_every_method_are_invalid_argument(cluster, pairs):
    rng = random.Random(0)
    checked = 0
    for role, port, method in methods_of_both(cluster):
        for _ in range(4):
            data = rng.randbytes(rng.randint(1, 200))
            if parses(method.request_type, data):
                continue  # random bytes that happen to be a message: the random-field test's case
            started = time.monotonic()
            code = call_raw(port, method, data)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{role} {method.path}: {code.name}"
            assert time.monotonic() - started < 5, f"{role} {method.path} took too long to refuse garbage"
            checked += 1
    assert checked >= 30
    assert_still_serves_a_correct_image(cluster, pairs)


def test_random_field_values_to_every_method_never_break_a_server(cluster, pairs):
    rng = random.Random(1)
    seen: dict[grpc.StatusCode, int] = {}
    for role, port, method in methods_of_both(cluster):
        for _ in range(6):
            message = random_message(method.request_type.DESCRIPTOR, rng)
            code = call_raw(port, method, message.SerializeToString())
            assert code in ANSWERS_TO_RANDOM_REQUESTS, f"{role} {method.path} answered {code.name} to {message}"
            seen[code] = seen.get(code, 0) + 1
    assert seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) >= 20
    assert_still_serves_a_correct_image(cluster, pairs)


def served_processes(cluster) -> list[psutil.Process]:
    children(cluster)
    return session_processes(cluster["sessions"])


def test_an_oversized_prompt_is_refused_at_once_without_memory_growth(cluster, pairs):
    prompt = "a red square " * (60 * 1024 * 1024 // 13)  # 60 MB, under the 64 MiB message limit
    before = sum(process.memory_info().rss for process in served_processes(cluster))
    for role in ("gateway", "edge"):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as error:
            pb_grpc.HybridDiffusionStub(channel(cluster[role])).Generate(
                pb.GenerateRequest(prompt=prompt, num_inference_steps=4), timeout=60
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"prompt is {len(prompt)} bytes; this server takes at most 4096" in error.value.details()
        assert time.monotonic() - started < 10, role
    grown = sum(process.memory_info().rss for process in served_processes(cluster)) - before
    assert grown < 1024**3, f"the servers grew by {grown / 1024**2:.0f} MB"
    assert_still_serves_a_correct_image(cluster, pairs)


def long_request(**fields) -> pb.GenerateRequest:
    """About 5 s of the shapes cloud model on one thread."""
    return pb.GenerateRequest(prompt="a large green square", num_inference_steps=150, seed=3, **fields)


def wait_for_good_answer(port: int, limit_s: float = 180) -> None:
    started = time.monotonic()
    while True:
        try:
            pb_grpc.HybridDiffusionStub(channel(port)).Generate(
                pb.GenerateRequest(prompt="a small red circle", num_inference_steps=4, switch_step=2), timeout=30
            )
            return
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
            assert time.monotonic() - started < limit_s, "no good answer in time"
            time.sleep(0.5)


def kill_mid_request(gateway, request: pb.GenerateRequest, victim) -> float:
    """Kill ``victim()`` (a process) 1.5 s into ``request``; the request must answer UNAVAILABLE within 10 s.
    Returns when the kill happened."""
    call = gateway.Generate.future(request, timeout=120)
    time.sleep(1.5)  # in the denoising loop
    victim().kill()
    killed = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        call.result()
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - killed < 10
    return killed


def test_a_killed_replica_answers_unavailable_at_once_and_is_replaced(cluster, capsys):
    gateway = pb_grpc.HybridDiffusionStub(channel(cluster["gateway"]))

    def replica() -> psutil.Process:
        return next(p for p in served_processes(cluster) if "ServeReplica:hybrid-sd-cloud" in " ".join(p.cmdline()))

    killed = kill_mid_request(gateway, long_request(switch_step=150), replica)
    while health(cluster["gateway"]) != "NOT_SERVING":  # health follows the replicas
        assert time.monotonic() - killed < 15, "health said SERVING with no replica"
        time.sleep(0.2)
    with pytest.raises(grpc.RpcError) as error:  # refused at once, not queued until Ray replaces the replica
        gateway.Generate(pb.GenerateRequest(prompt="a red circle", num_inference_steps=4), timeout=60)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "no cloud denoiser replica" in error.value.details()
    fallback = gateway.Generate(
        pb.GenerateRequest(prompt="a red circle", num_inference_steps=8, switch_step=4, allow_edge_fallback=True),
        timeout=60,
    )
    assert fallback.edge_fallback and fallback.switch_step == 0 and fallback.cloud_unet_evaluations == 0
    wait_for_good_answer(cluster["gateway"])
    recovered = time.monotonic() - killed
    assert health(cluster["gateway"]) == "SERVING"
    with capsys.disabled():
        print(f"\nkilled replica -> next good answer: {recovered:.1f} s")


def test_a_killed_edge_is_restarted_and_the_gateway_keeps_serving(cluster, capsys):
    edge = children(cluster)["edge"]
    gateway = pb_grpc.HybridDiffusionStub(channel(cluster["gateway"]))
    # All on the edge, whose model is several times faster than the cloud's: at 16 times the native pixels, so
    # that it is still denoising when killed.
    killed = kill_mid_request(gateway, long_request(switch_step=0, width=256, height=256), lambda: edge)
    assert health(cluster["gateway"]) == "SERVING"  # the gateway stayed up
    wait_for_good_answer(cluster["gateway"])
    recovered = time.monotonic() - killed
    restarted = children(cluster)["edge"]
    assert restarted.pid != edge.pid and cluster["process"].poll() is None
    with capsys.disabled():
        print(f"\nkilled edge -> next good answer through the gateway: {recovered:.1f} s")


def test_sigterm_stops_the_cluster_and_leaves_no_process(cluster):
    children(cluster)
    assert session_processes(cluster["sessions"])  # Ray's processes among them
    cluster["process"].send_signal(signal.SIGTERM)
    assert cluster["process"].wait(timeout=120) == 0
    left = session_processes(cluster["sessions"])
    assert not left, [" ".join(process.cmdline())[:80] for process in left]
