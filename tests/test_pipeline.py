"""In-process generation: which model runs when, what the result reports, and input validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hybrid_sd.pipeline import HybridPipeline
from hybrid_sd.request import DEFAULT_GUIDANCE_SCALE, MAX_SEED, GenerationRequest
from hybrid_sd.results import STAGES

STEPS = 6


def count_forward_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    module.register_forward_hook(hook)
    return calls


@pytest.fixture(scope="module")
def counted(pairs):
    pair = pairs["sd1"]
    return HybridPipeline(pair), count_forward_calls(pair.cloud.pipe.unet), count_forward_calls(pair.edge.pipe.unet)


@pytest.mark.parametrize(
    ("scheduler", "switch_step", "cloud_calls", "edge_calls"),
    [
        ("dpm++2m", 0, 0, STEPS),
        ("dpm++2m", STEPS, STEPS, 0),
        ("dpm++2m", 2, 2, STEPS - 2),
        # PLMS makes one warm-up evaluation more, which belongs to the first step.
        ("pndm", 0, 0, STEPS + 1),
        ("pndm", 2, 3, STEPS - 2),
        ("pndm", STEPS, STEPS + 1, 0),
    ],
)
def test_unet_evaluations_per_side(counted, scheduler, switch_step, cloud_calls, edge_calls):
    pipeline, cloud_counter, edge_counter = counted
    cloud_counter[0] = edge_counter[0] = 0
    request = GenerationRequest("a circle", switch_step=switch_step, num_inference_steps=STEPS, scheduler=scheduler)
    result = pipeline(request)
    assert (cloud_counter[0], edge_counter[0]) == (cloud_calls, edge_calls)
    assert result.unet_evaluations == {"cloud": cloud_calls, "edge": edge_calls}
    assert (result.handoff_bytes > 0) == (switch_step > 0)
    assert (result.timings["cloud_denoise"] > 0) == (switch_step > 0)
    assert (result.timings["handoff_decode"] > 0) == (switch_step > 0)


def test_result_reports_resolved_request(pairs):
    pipeline = HybridPipeline(pairs["sd1"])
    result = pipeline(GenerationRequest("a circle", num_inference_steps=5))
    assert type(result.request.seed) is int and 0 <= result.request.seed <= MAX_SEED
    assert torch.equal(pipeline(result.request).latents, result.latents)  # the reported seed reproduces the run
    assert result.request.switch_step == 2  # 40% of 5
    assert (result.request.width, result.request.height) == (64, 64)  # sample_size 8 x VAE factor 8
    assert result.request.scheduler == "PNDMScheduler"
    assert result.request.guidance_scale == DEFAULT_GUIDANCE_SCALE == 7.5  # Stable Diffusion's
    assert result.image.size == (64, 64)
    summary = result.summary()
    assert summary["seed"] == result.request.seed
    assert tuple(summary["timings_s"]) == STAGES  # every stage, as a served response reports them
    stages = sum(v for k, v in result.timings.items() if k != "total")
    assert stages <= result.timings["total"] <= stages + 0.01  # the stages account for the wall time


def test_same_seed_same_image_and_random_seeds_differ(pairs):
    pipeline = HybridPipeline(pairs["sd1"])
    request = GenerationRequest("a circle", num_inference_steps=3, seed=11)
    assert torch.equal(pipeline(request).latents, pipeline(request).latents)
    unseeded = dataclasses.replace(request, seed=None)
    first, second = pipeline(unseeded), pipeline(unseeded)
    assert first.request.seed != second.request.seed
    assert not torch.equal(first.latents, second.latents)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"switch_step": -1}, "switch_step must be in [0, 25], got -1"),
        ({"switch_step": 26}, "switch_step must be in [0, 25], got 26"),
        ({"num_inference_steps": 0, "switch_step": 0}, "num_inference_steps must be in [1, 1000], got 0"),
        ({"width": 60}, "width must be a multiple of 8"),
        ({"height": 100}, "height must be a multiple of 8"),
        ({"scheduler": "no-such"}, "scheduler 'no-such' is unknown"),
        ({"scheduler": "HeunDiscreteScheduler"}, "scheduler 'HeunDiscreteScheduler' cannot be handed over exactly"),
        ({"scheduler": "DPMSolverSDEScheduler"}, "Brownian tree"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
        ({"seed": -5}, "seed must be in"),
        ({"switch_step": 2.5}, "switch_step must be an integer"),
        ({"prompt": None}, "prompt must be a string"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_field(pairs, fields, message):
    request = dataclasses.replace(GenerationRequest("a circle"), **fields)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        HybridPipeline(pairs["sd1"])(request)
