"""The served system on loopback: a real edge worker and a real gateway with its Ray Serve denoiser
(Ray started locally), called over gRPC."""

from __future__ import annotations

import csv
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy
import PIL.Image
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cloud_worker.gateway import GatewayConfig, running_gateway
from edge_worker.server import EdgeConfig, running_edge
from hybrid_sd.limits import RequestLimits
from hybrid_sd.pipeline import HybridPipeline
from hybrid_sd.request import GenerationRequest
from hybrid_sd.results import STAGES
from hybrid_sd.v1 import hybrid_sd_pb2 as pb
from hybrid_sd.v1 import hybrid_sd_pb2_grpc as pb_grpc
from hybrid_sd.wire import request_to_pb, result_from_pb, tensor_from_pb, tensor_to_pb
from tests.conftest import OTHER_GUIDANCE_SCALE, OTHER_TIMESTEP_POWER
from tests.serving import BATCHED_LATENT_TOLERANCE, channel, free_port

STEPS = 6
# Long requests (900 steps) for the deadline and cancellation tests.
LONG_RUNS = RequestLimits(max_steps=1000)


@pytest.fixture(scope="module")
def cluster(loop, other_defaults_spec):
    """Edge worker and gateway, each pointing at the other, serving a pair whose edge resolves sizes and
    schedulers otherwise than its cloud would."""
    spec = other_defaults_spec
    gateway_port = free_port()
    edge, leave_edge = loop.enter(
        running_edge(EdgeConfig(spec, "tiny-sd1", port=0, cloud=f"127.0.0.1:{gateway_port}", limits=LONG_RUNS))
    )
    gateway, leave_gateway = loop.enter(
        running_gateway(
            GatewayConfig(
                "tiny-sd1",
                spec,
                f"127.0.0.1:{edge.port}",
                port=gateway_port,
                ray_num_cpus=2,
                limits=LONG_RUNS,
            )
        )
    )
    yield {"gateway": gateway.port, "edge": edge.port}
    leave_gateway()
    leave_edge()


@pytest.fixture(scope="module")
def engine(other_defaults_spec):
    return HybridPipeline.from_pair(other_defaults_spec)


def generate(port: int, timeout: float = 120, **fields) -> pb.GenerateResponse:
    fields.setdefault("output_format", pb.OUTPUT_FORMAT_LATENTS)
    return pb_grpc.HybridDiffusionStub(channel(port)).Generate(pb.GenerateRequest(**fields), timeout=timeout)


def in_process(engine: HybridPipeline, **fields) -> torch.Tensor:
    return engine(GenerationRequest(**fields)).latents


@pytest.mark.parametrize("entry", ["gateway", "edge"])
@pytest.mark.parametrize("scheduler", ["dpm++2m", "euler-a", "ddim"])
@pytest.mark.parametrize("switch_step", [0, STEPS // 2, STEPS])
def test_exact_across_the_wire(cluster, engine, entry, scheduler, switch_step):
    fields = dict(
        prompt="a large red circle above a small blue square",
        negative_prompt="blurry",
        switch_step=switch_step,
        num_inference_steps=STEPS,
        seed=77,
        scheduler=scheduler,
    )
    response = generate(cluster[entry], **fields)
    assert torch.equal(tensor_from_pb(response.latents, "latents"), in_process(engine, **fields))
    assert response.switch_step == switch_step and not response.edge_fallback
    assert response.cloud_unet_evaluations == switch_step
    assert response.edge_unet_evaluations == STEPS - switch_step
    assert (response.handoff_bytes > 0) == (switch_step > 0)
    assert bool(response.cloud_replica) == (switch_step > 0)
    assert response.edge_worker.startswith("edge@")


def test_image_response_and_stream(cluster):
    response = generate(
        cluster["gateway"],
        prompt="a circle",
        num_inference_steps=4,
        seed=1,
        output_format=pb.OUTPUT_FORMAT_PNG,
        include_latents=True,
    )
    assert response.mime_type == "image/png" and response.image.startswith(b"\x89PNG")
    assert response.latents.shape == [1, 4, 4, 4]  # the edge's 32 px
    assert response.timings.total >= response.timings.cloud_denoise > 0


@pytest.mark.parametrize("entry", ["gateway", "edge"])
def test_stream_reports_every_unet_evaluation(cluster, entry):
    events = list(
        pb_grpc.HybridDiffusionStub(channel(cluster[entry])).GenerateStream(
            pb.GenerateRequest(prompt="a circle", num_inference_steps=4, switch_step=2, seed=1, scheduler="pndm"),
            timeout=60,
        )
    )
    progress = [(event.progress.stage, event.progress.step, event.progress.total) for event in events[:-1]]
    # PLMS: 5 evaluations for 4 steps; switch step 2 ends after evaluation 3.
    assert progress == [("cloud_denoise", step, 5) for step in (1, 2, 3)] + [
        ("edge_denoise", 4, 5),
        ("edge_denoise", 5, 5),
    ]
    assert events[-1].HasField("result") and events[-1].result.image.startswith(b"\x89PNG")


def test_no_cross_talk_between_concurrent_requests(cluster, engine):
    """Sixteen at once through one batching replica: each gets its own result, the exact half bit for bit,
    the others within the batching tolerance, and the replica did batch them."""
    requests = [
        dict(
            prompt=f"shape number {i}",
            switch_step=i % (STEPS + 1),
            num_inference_steps=STEPS,
            seed=1000 + i,
            scheduler="euler-a",
            exact=i % 2 == 0,
        )
        for i in range(16)
    ]
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda fields: generate(cluster["gateway"], **fields), requests))
    for fields, response in zip(requests, responses, strict=True):
        assert response.seed == fields["seed"] and response.switch_step == fields["switch_step"]
        assert len(response.cloud_batch_sizes) == response.cloud_unet_evaluations
        latents, alone = tensor_from_pb(response.latents, "latents"), in_process(engine, **fields)
        if fields["exact"]:
            assert set(response.cloud_batch_sizes) <= {1}
            assert torch.equal(latents, alone)
        else:
            torch.testing.assert_close(latents, alone, rtol=0, atol=BATCHED_LATENT_TOLERANCE)
    assert max(size for response in responses for size in response.cloud_batch_sizes) > 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(switch_step=9), "switch_step must be in [0, 6], got 9"),
        (dict(num_inference_steps=0, switch_step=0), "num_inference_steps must be in [1, 1000]"),
        (dict(width=60), "width must be a multiple of 8"),
        (dict(scheduler="nope"), "scheduler 'nope' is unknown"),
        (dict(guidance_scale=math.nan), "guidance_scale must be a finite number"),
        (dict(timestep_power=0.5), "timestep_power must be in [1.0, 4.0], got 0.5"),
        (
            dict(scheduler="ddim", timestep_power=1.5),
            "timestep_power needs a scheduler that takes custom timesteps; DDIMScheduler does not",
        ),
        (
            dict(num_inference_steps=1000, switch_step=3, timestep_power=1.0),
            "timestep_power 1.0 over 1000 steps needs more distinct timesteps than EulerDiscreteScheduler's 1000",
        ),
        (dict(seed=2**63), "seed must be in"),
        (dict(pair="sdxl-vega"), "pair 'sdxl-vega' is not served here"),
        (
            dict(num_inference_steps=1000, switch_step=0, scheduler="pndm"),
            "num_inference_steps 1000 is too many for PNDMScheduler",
        ),
        (dict(prompt="x" * 5000), "prompt is 5000 bytes; this server takes at most 4096"),
        (dict(prompt="a " * 600), "prompt is 600 tokens; this server takes at most 512"),
        (dict(width=4096, height=2048), "width x height 4096x2048 = 8388608 pixels is over"),
        (dict(output_format=99), "output_format 99 is not one of"),
    ],
)
@pytest.mark.parametrize("entry", ["gateway", "edge"])
def test_bad_fields_are_invalid_argument(cluster, entry, fields, message):
    base = dict(prompt="a circle", num_inference_steps=STEPS, switch_step=3, seed=1)
    with pytest.raises(grpc.RpcError) as error:
        generate(cluster[entry], **{**base, **fields})
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()
    assert generate(cluster[entry], **base).switch_step == 3  # and the server serves the next one


def test_defaults_resolve_alike_on_every_path(loop, cluster, engine, other_defaults_spec):
    """A request naming no size, scheduler, guidance or spacing gets the edge model's (32 px, Euler; the cloud's are
    64 px, PLMS) and its pair's guidance scale (3) and timestep power (1.5) in-process, through the gateway,
    edge-initiated, and when the edge falls back alone."""
    fields = dict(prompt="a circle", num_inference_steps=STEPS, switch_step=3, seed=21)
    expected = engine(GenerationRequest(**fields))
    assert (expected.request.width, expected.request.scheduler) == (32, "EulerDiscreteScheduler")
    assert expected.request.guidance_scale == OTHER_GUIDANCE_SCALE
    assert expected.request.timestep_power == OTHER_TIMESTEP_POWER
    named_fields = dict(fields, guidance_scale=OTHER_GUIDANCE_SCALE, timestep_power=OTHER_TIMESTEP_POWER)
    named = engine(GenerationRequest(**named_fields)).latents
    assert torch.equal(named, expected.latents)
    assert not torch.equal(engine(GenerationRequest(**{**named_fields, "guidance_scale": 7.5})).latents, named)
    assert not torch.equal(engine(GenerationRequest(**{**named_fields, "timestep_power": 1.0})).latents, named)
    # A scheduler that takes no custom timesteps runs its own spacing: the pair's power is a default, not a demand.
    assert engine(GenerationRequest(**fields, scheduler="ddim")).request.timestep_power is None
    for entry in ("gateway", "edge"):
        response = generate(cluster[entry], **fields)
        assert (response.width, response.height, response.scheduler) == (32, 32, "EulerDiscreteScheduler")
        assert response.guidance_scale == OTHER_GUIDANCE_SCALE and response.timestep_power == OTHER_TIMESTEP_POWER
        assert torch.equal(tensor_from_pb(response.latents, "latents"), expected.latents)
    unreachable = EdgeConfig(other_defaults_spec, port=0, cloud=f"127.0.0.1:{free_port()}")
    edge, leave = loop.enter(running_edge(unreachable))
    try:
        response = generate(edge.port, allow_edge_fallback=True, **fields)
    finally:
        leave()
    assert response.edge_fallback and (response.width, response.scheduler) == (32, "EulerDiscreteScheduler")
    assert response.guidance_scale == OTHER_GUIDANCE_SCALE
    edge_only = engine(GenerationRequest(**{**fields, "switch_step": 0}))
    assert torch.equal(tensor_from_pb(response.latents, "latents"), edge_only.latents)


def test_in_process_and_served_report_alike(cluster, engine):
    """One stage vocabulary and one handoff size: what the in-process engine reports, a served
    response reports for the same request."""
    fields = dict(prompt="a red square", num_inference_steps=STEPS, switch_step=3, seed=8, scheduler="dpm++2m")
    in_process_result = engine(GenerationRequest(**fields))
    for entry in ("gateway", "edge"):
        served = result_from_pb(generate(cluster[entry], **fields), GenerationRequest(**fields))
        assert list(served.timings) == list(in_process_result.timings) == list(STAGES)
        assert served.handoff_bytes == in_process_result.handoff_bytes > 0
        for timings in (served.timings, in_process_result.timings):
            computed = ("encode_prompt", "cloud_denoise", "handoff_encode", "handoff_decode", "edge_denoise")
            assert all(timings[stage] > 0 for stage in computed), timings
            assert sum(v for stage, v in timings.items() if stage != "total") <= timings["total"] + 1e-6


HANDOFF_FIELDS = dict(prompt="a red square", switch_step=3, num_inference_steps=STEPS, seed=4, scheduler="dpm++2m")


def real_handoff(cluster) -> pb.Handoff:
    """A full handoff: a DenoiseRequest that names no edge profile."""
    request = request_to_pb(GenerationRequest(**HANDOFF_FIELDS))
    return pb_grpc.CloudDenoiserStub(channel(cluster["gateway"])).Denoise(pb.DenoiseRequest(request=request))


def test_served_handoffs_are_lean(cluster, engine):
    """Either entry point tells the cloud the edge's profile: the prompt embeddings stay home, and
    the in-process engine hands over by the same rule."""
    full = real_handoff(cluster)
    assert json.loads(full.state_json)["conditioning"] == "carried"
    embeddings = sum(len(tensor.data) for name, tensor in full.tensors.items() if name.startswith("conditioning."))
    in_process = engine(GenerationRequest(**HANDOFF_FIELDS)).handoff_bytes
    for entry in ("gateway", "edge"):
        response = generate(cluster[entry], **HANDOFF_FIELDS)
        assert response.handoff_bytes < full.ByteSize() - embeddings
        assert response.handoff_bytes == in_process  # one measure of the handoff, on every path


def corrupt(handoff: pb.Handoff, how: str) -> pb.Handoff:
    bad = pb.Handoff()
    bad.CopyFrom(handoff)
    state = json.loads(bad.state_json)
    latents = tensor_from_pb(bad.tensors["latents"], "latents")
    if how == "byte count":
        bad.tensors["latents"].data = bad.tensors["latents"].data[:-4]
    elif how == "nan":
        bad.tensors["latents"].CopyFrom(tensor_to_pb(latents.clone().index_fill_(3, torch.tensor([0]), math.nan)))
    elif how == "inf":
        bad.tensors["latents"].CopyFrom(tensor_to_pb(latents.clone().fill_(math.inf)))
    elif how == "latent shape":
        bad.tensors["latents"].CopyFrom(tensor_to_pb(torch.zeros(1, 4, 4, 8)))
    elif how == "step index":
        state["step_index"] = 99
    elif how == "scheduler":
        state["scheduler_config"]["_class_name"] = "NoSuchScheduler"
    elif how == "json":
        bad.state_json = "{not json"
        return bad
    elif how == "latent space":
        state["latent_space"] = "sdxl"
    bad.state_json = json.dumps(state)
    return bad


@pytest.mark.parametrize(
    ("how", "code", "message"),
    [
        ("byte count", grpc.StatusCode.INVALID_ARGUMENT, "bytes do not match shape"),
        ("nan", grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
        ("inf", grpc.StatusCode.INVALID_ARGUMENT, "NaN or Inf"),
        ("latent shape", grpc.StatusCode.INVALID_ARGUMENT, "handoff latents have shape (1, 4, 4, 8)"),
        ("step index", grpc.StatusCode.INVALID_ARGUMENT, "step_index must be in [0, 6], got 99"),
        ("scheduler", grpc.StatusCode.INVALID_ARGUMENT, "scheduler 'NoSuchScheduler' is unknown"),
        ("json", grpc.StatusCode.INVALID_ARGUMENT, "state_json is not JSON"),
        ("latent space", grpc.StatusCode.FAILED_PRECONDITION, "'sdxl' latent space"),
    ],
)
def test_edge_refuses_a_corrupt_handoff(cluster, how, code, message):
    handoff = real_handoff(cluster)
    refiner = pb_grpc.EdgeRefinerStub(channel(cluster["edge"]))
    with pytest.raises(grpc.RpcError) as error:
        refiner.Refine(pb.RefineRequest(handoff=corrupt(handoff, how)), timeout=60)
    assert error.value.code() == code
    assert message in error.value.details()
    assert refiner.Refine(pb.RefineRequest(handoff=handoff), timeout=60).edge_unet_evaluations == 3


def test_health_and_reflection(cluster):
    for port in cluster.values():
        status = health_pb2_grpc.HealthStub(channel(port)).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    reply = next(
        reflection_pb2_grpc.ServerReflectionStub(channel(cluster["edge"])).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
    )
    names = {service.name for service in reply.list_services_response.service}
    assert {"hybrid_sd.v1.EdgeRefiner", "hybrid_sd.v1.HybridDiffusion", "grpc.health.v1.Health"} <= names


def test_deadline_exceeded_then_next_request_at_once(cluster):
    with pytest.raises(grpc.RpcError) as error:
        generate(cluster["gateway"], timeout=0.5, prompt="slow", num_inference_steps=900, switch_step=500, seed=2)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    started = time.monotonic()
    generate(cluster["gateway"], prompt="fast", num_inference_steps=2, seed=3)
    # A 900-step request takes over 10 s here; the workers stopped it within a step or two.
    assert time.monotonic() - started < 5


def test_cancel_mid_denoise_frees_the_worker(cluster):
    stub = pb_grpc.HybridDiffusionStub(channel(cluster["edge"]))
    call = stub.Generate.future(pb.GenerateRequest(prompt="slow", num_inference_steps=900, switch_step=0, seed=2))
    time.sleep(1.0)  # well into the edge's denoising loop
    call.cancel()
    started = time.monotonic()
    generate(cluster["edge"], prompt="fast", num_inference_steps=2, switch_step=0, seed=3)
    assert time.monotonic() - started < 5
    assert call.cancelled()


def test_edge_falls_back_when_the_cloud_is_late(loop, cluster, pair_specs):
    late_cloud = EdgeConfig(pair_specs["sd1"], port=0, cloud=f"127.0.0.1:{cluster['gateway']}", cloud_timeout=0.3)
    edge, leave = loop.enter(running_edge(late_cloud))
    try:
        slow = dict(prompt="a circle", num_inference_steps=150, switch_step=150, seed=5, scheduler="euler")
        response = generate(edge.port, allow_edge_fallback=True, **slow)
        assert response.edge_fallback and response.switch_step == 0 and response.edge_unet_evaluations == 150
        with pytest.raises(grpc.RpcError) as error:
            generate(edge.port, **slow)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        leave()


def test_sweep_against_the_live_cluster(cluster, engine, tmp_path):
    from hybrid_sd.sweep import SweepConfig, remote_runner, run_sweep

    prompts = ["a small green triangle", "a large red circle above a small blue square"]
    config = SweepConfig([0, 2], prompts, [3], 4, "euler", None, tmp_path)  # the pair's guidance, as the engine's
    summary = run_sweep(config, remote_runner(f"127.0.0.1:{cluster['gateway']}"), progress=False)
    with open(tmp_path / "results.csv") as file:
        rows = list(csv.DictReader(file))
    assert sorted((int(row["prompt_index"]), int(row["switch_step"])) for row in rows) == [
        (0, 0),
        (0, 2),
        (0, 4),
        (1, 0),
        (1, 2),
        (1, 4),
    ]
    assert all(int(row["cloud_unet_evaluations"]) == int(row["switch_step"]) for row in rows)
    assert set(summary["switch_steps"]) == {"0", "2", "4"}
    for row in rows:  # the served image is the in-process engine's, pixel for pixel
        request = GenerationRequest(
            prompts[int(row["prompt_index"])],
            switch_step=int(row["switch_step"]),
            num_inference_steps=4,
            seed=3,
            scheduler="euler",
        )
        expected = numpy.asarray(engine(request).image)
        assert numpy.array_equal(numpy.asarray(PIL.Image.open(tmp_path / row["image"]).convert("RGB")), expected)
    for name in ("summary.json", "quality_vs_k.png", "cost_vs_k.png", "grid.png", "report.md"):
        assert (tmp_path / name).exists()
