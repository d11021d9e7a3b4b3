"""With the large model on both sides, or k = N, the engine is diffusers' own pipeline: the same
latents and the same decoded image, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybrid_sd.denoiser import Denoiser
from hybrid_sd.pairs import ModelPair
from hybrid_sd.pipeline import HybridPipeline
from hybrid_sd.request import GenerationRequest
from hybrid_sd.schedulers import make_scheduler
from tests.conftest import load_reference
from tests.reference import pipeline_kwargs


def diffusers_output(pipe, request: GenerationRequest, output_type: str):
    pipe.scheduler = make_scheduler(request.scheduler, pipe.scheduler)
    return pipe(**pipeline_kwargs(request), output_type=output_type).images


@pytest.mark.parametrize("family", ["sd1", "sdxl", "shapes"])
@pytest.mark.parametrize("scheduler", ["dpm++2m", "euler-a", "ddim"])
@pytest.mark.parametrize("switch_step", [3, 8])
def test_large_model_on_both_sides_is_diffusers(pair_specs, family, scheduler, switch_step):
    pipe = load_reference(pair_specs[family].cloud)
    large_only = HybridPipeline(ModelPair(Denoiser(pipe, "cloud"), Denoiser(pipe, "cloud-as-edge")))
    request = GenerationRequest(
        "a small green triangle left of a red circle",
        negative_prompt="low quality",
        switch_step=switch_step,
        num_inference_steps=8,
        guidance_scale=6.0,
        seed=99,
        width=64,
        height=48,
        scheduler=scheduler,
    )
    result = large_only(request)
    reference = load_reference(pair_specs[family].cloud)
    assert torch.equal(result.latents, diffusers_output(reference, result.request, "latent"))
    expected_image = diffusers_output(reference, result.request, "np")[0]
    produced = np.asarray(result.image)
    assert produced.shape == (48, 64, 3)
    assert np.array_equal(produced, (expected_image * 255).round().astype(np.uint8))


@pytest.mark.parametrize("family", ["sd1", "sdxl", "shapes"])
def test_k_equals_n_matches_the_cloud_pipeline(pairs, pair_specs, family):
    request = GenerationRequest("two blue squares", switch_step=5, num_inference_steps=5, seed=3, width=64, height=64)
    result = HybridPipeline(pairs[family])(request)
    reference = load_reference(pair_specs[family].cloud)
    assert torch.equal(result.latents, diffusers_output(reference, result.request, "latent"))
