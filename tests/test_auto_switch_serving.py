"""auto_switch through a served cluster on loopback: the server's choice is the switch step it ran, with the
profile's quality, and the image is the one an explicit request at that step makes."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request

import pytest
import torch

from cloud_worker.gateway import GatewayConfig, running_gateway
from edge_worker.server import EdgeConfig, running_edge
from hybrid_sd.cli import main
from hybrid_sd.presets import EMBEDDED_PRESETS
from hybrid_sd.rpc_clients import GrpcCloudClient, open_channel
from hybrid_sd.switch_profile import load_profile
from hybrid_sd.v1 import hybrid_sd_pb2 as pb
from hybrid_sd.v1 import hybrid_sd_pb2_grpc as pb_grpc
from hybrid_sd.wire import tensor_from_pb
from tests.serving import channel, free_port

STEPS = 4
PROFILE = load_profile(EMBEDDED_PRESETS["shapes"] / "evaluation.json")


@pytest.fixture(scope="module")
def cluster(loop, pair_specs):
    """Edge worker and gateway of the tiny SD 1.x pair, both choosing from the shapes pair's profile."""
    spec, gateway_port = pair_specs["sd1"], free_port()
    edge_config = EdgeConfig(spec, "tiny-sd1", port=0, cloud=f"127.0.0.1:{gateway_port}", switch_profile=PROFILE)
    edge, leave_edge = loop.enter(running_edge(edge_config))
    gateway_config = GatewayConfig(
        "tiny-sd1",
        spec,
        f"127.0.0.1:{edge.port}",
        port=gateway_port,
        ray_num_cpus=2,
        http_port=0,
        switch_profile=PROFILE,
    )
    gateway, leave_gateway = loop.enter(running_gateway(gateway_config))
    yield {"gateway": gateway.port, "edge": edge.port, "gateway_http": gateway.http_port}
    leave_gateway()
    leave_edge()


def generate(port: int, **fields) -> pb.GenerateResponse:
    request = pb.GenerateRequest(
        prompt="a red circle",
        num_inference_steps=STEPS,
        seed=5,
        scheduler="euler",
        output_format=pb.OUTPUT_FORMAT_PNG,
        include_latents=True,
        **fields,
    )
    return pb_grpc.HybridDiffusionStub(channel(port)).Generate(request, timeout=120)


@pytest.mark.parametrize("entry", ["gateway", "edge"])
@pytest.mark.parametrize("target", [None, 1e6])
def test_the_chosen_step_is_the_one_run(cluster, entry, target):
    chosen = generate(cluster[entry], auto_switch=True, latency_target_s=target)
    choice = chosen.switch_choice
    assert chosen.HasField("switch_choice") and choice.switch_step == chosen.switch_step
    if target is not None:  # every k meets it: the most cloud steps
        assert (choice.switch_step, choice.reason) == (STEPS, "largest k meeting the target")
    assert choice.quality == pytest.approx(PROFILE.quality_at(choice.switch_step, STEPS))
    assert choice.predicted_latency_s > 0
    assert chosen.cloud_unet_evaluations == choice.switch_step and not chosen.edge_fallback
    explicit = generate(cluster[entry], switch_step=choice.switch_step)
    assert not explicit.HasField("switch_choice")
    assert chosen.image == explicit.image
    assert torch.equal(tensor_from_pb(chosen.latents, "latents"), tensor_from_pb(explicit.latents, "latents"))


def test_the_gateway_exposes_its_choice_and_inputs(cluster):
    choice = generate(cluster["gateway"], auto_switch=True, latency_target_s=1e6).switch_choice
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster['gateway_http']}/metrics", timeout=30) as response:
        text = response.read().decode()
    assert f"hybrid_sd_switch_chosen_switch_step {float(choice.switch_step)}" in text
    assert "hybrid_sd_switch_cloud_queue_depth 0.0" in text  # nothing outstanding once answered
    assert re.search(r"^hybrid_sd_switch_edge_step_seconds \d", text, re.MULTILINE)  # measured: not NaN


def test_generate_auto_on_the_command_line(cluster, capsys, tmp_path):
    args = ["generate", "--prompt", "a red circle", "--steps", str(STEPS), "--out", str(tmp_path / "x.png"), "--json"]
    args += ["--target", f"127.0.0.1:{cluster['gateway']}", "--switch-step", "auto", "--latency-target", "1e6"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["switch_step"] == summary["switch_choice"]["switch_step"] == STEPS
    assert summary["switch_choice"]["reason"] == "largest k meeting the target"


def test_an_edge_without_a_cloud_chooses_the_edge_alone(loop, pair_specs):
    edge, leave = loop.enter(running_edge(EdgeConfig(pair_specs["sd1"], port=0, switch_profile=PROFILE)))
    try:
        response = generate(edge.port, auto_switch=True, latency_target_s=1e6)
    finally:
        leave()
    assert (response.switch_step, response.switch_choice.reason) == (0, "no cloud configured: edge alone")
    assert response.switch_choice.quality == pytest.approx(PROFILE.quality[0])


def test_a_cloud_nobody_answers_turns_unreachable(loop):
    async def reachable_after_trying() -> bool:
        cloud = GrpcCloudClient(open_channel(f"127.0.0.1:{free_port()}"))  # nothing listens there
        for _ in range(50):
            if not cloud.reachable:
                return False
            await asyncio.sleep(0.1)
        return True

    assert loop.run(reachable_after_trying()) is False
