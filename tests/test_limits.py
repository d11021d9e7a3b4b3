"""Bounded cost per request (hybrid_sd.limits), schedules refused up front, and no image from NaN latents."""

from __future__ import annotations

import pytest
import torch

from hybrid_sd.denoiser import Denoiser
from hybrid_sd.errors import NonFiniteLatentsError
from hybrid_sd.limits import RequestLimits
from hybrid_sd.pipeline import HybridPipeline
from hybrid_sd.request import GenerationRequest


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        (dict(prompt="x" * 4097), "prompt is 4097 bytes; this server takes at most 4096"),
        (dict(prompt="a", negative_prompt="é" * 2049), "negative_prompt is 4098 bytes"),
        (dict(prompt="a", num_inference_steps=151), "num_inference_steps 151 is over this server's limit of 150"),
        (dict(prompt="a", width=2048, height=2056), "width x height 2048x2056 = 4210688 pixels is over"),
        (dict(prompt="a", width=1024, height=1024, num_inference_steps=149), None),
        (dict(prompt="a", width=1024, height=1032, num_inference_steps=150), "width x height x num_inference_steps"),
    ],
)
def test_limits_name_the_field_and_the_limit(request_fields, message):
    request = GenerationRequest(**request_fields)
    if message is None:
        RequestLimits().check(request)
        return
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        RequestLimits().check(request)


def test_limits_refuse_nonsense_configuration():
    with pytest.raises(ValueError, match="max_steps must be a positive integer"):
        RequestLimits(max_steps=0)


def test_a_denoiser_with_limits_counts_tokens_and_checks_the_size_it_fills_in(pairs):
    denoiser: Denoiser = pairs["sd1"].cloud
    limited = Denoiser(denoiser.pipe, denoiser.name)
    limited.limits = RequestLimits(max_prompt_tokens=8, max_pixels=denoiser.default_size**2 - 1)
    with pytest.raises(ValueError, match="prompt is 9 tokens; this server takes at most 8"):
        limited.resolve(GenerationRequest("a " * 9, width=8, height=8))
    with pytest.raises(ValueError, match="pixels is over"):  # width and height from the model's default
        limited.resolve(GenerationRequest("a square"))
    assert denoiser.resolve(GenerationRequest("a " * 9)).prompt == "a " * 9  # in-process: no limits


@pytest.mark.parametrize(
    ("family", "scheduler", "steps", "message"),
    [
        # The tiny pair's leading spacing with steps_offset 1 repeats a timestep at 1000 steps.
        ("sd1", "dpm++2m", 1000, "num_inference_steps 1000 repeats timestep 1 in DPMSolverMultistepScheduler"),
        ("sd1", "unipc", 1000, "repeats timestep 1 in UniPCMultistepScheduler"),
        ("sd1", "deis", 1000, "repeats timestep 1 in DEISMultistepScheduler"),
        # The shapes pair's trailing spacing and its timestep_power (kept strictly decreasing) run all 1000.
        ("shapes", "dpm++2m", 1000, None),
        ("shapes", "unipc", 1000, None),
        ("shapes", "euler", 1000, None),
        ("shapes", "pndm", 1000, None),  # PLMS repeats a timestep on purpose
        ("sd1", "pndm", 1000, "num_inference_steps 1000 is too many for PNDMScheduler"),
    ],
)
def test_schedules_that_cannot_run_are_refused_before_any_work(pairs, family, scheduler, steps, message):
    request = GenerationRequest("a square", num_inference_steps=steps, scheduler=scheduler)
    if message is None:
        assert pairs[family].cloud.resolve(request).num_inference_steps == steps
        return
    with pytest.raises(ValueError, match=message):
        pairs[family].cloud.resolve(request)


def test_nan_latents_are_an_error_naming_the_step_not_an_image(pairs):
    pair = pairs["sd1"]
    unet = pair.edge.pipe.unet
    calls = [0]

    def poison_the_fourth_call(module, args, output):
        calls[0] += 1
        if calls[0] == 4:
            return (torch.full_like(output[0], torch.nan),)
        return output

    handle = unet.register_forward_hook(poison_the_fourth_call)
    try:
        with pytest.raises(NonFiniteLatentsError, match=r"NaN or Inf at step 4 of 6 \(timestep \d+, DDIMScheduler\)"):
            HybridPipeline(pair)(GenerationRequest("a square", switch_step=0, num_inference_steps=6, scheduler="ddim"))
    finally:
        handle.remove()
