"""The handoff contract: a run split at k, serialized to bytes in between and continued by a fresh
engine object, equals diffusers' one uninterrupted loop with the model switched at k, bit for bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hybrid_sd.denoiser import Denoiser
from hybrid_sd.edge_profile import EdgeProfile, for_edge
from hybrid_sd.pipeline import HybridPipeline
from hybrid_sd.request import GenerationRequest
from hybrid_sd.schedulers import loop_index, power_timesteps
from hybrid_sd.wire import state_from_payload, state_payload
from tests.conftest import load_reference
from tests.reference import reference_run

STEPS = 6
SCHEDULERS = ["ddim", "ddpm", "euler", "euler-a", "dpm++2m", "dpm++2m-sde", "deis", "unipc", "pndm", "lcm"]
SWITCH_STEPS = [0, 1, STEPS // 2, STEPS - 1, STEPS]


@pytest.fixture(scope="module")
def references(pair_specs):
    return {family: load_reference(spec.cloud) for family, spec in pair_specs.items()}


def split_run(pair, request: GenerationRequest) -> tuple[torch.Tensor, int]:
    """[0, k) on the cloud model, to bytes (lean: the edge encodes the prompt), then [k, N) on a
    freshly made edge Denoiser."""
    request = HybridPipeline(pair).check_inputs(request)
    first = pair.cloud if request.switch_step else pair.edge
    state = first.begin(request)
    switch = loop_index(request.switch_step, STEPS, state.loop_length)
    state = first.denoise(state, switch) if request.switch_step else state
    fresh_edge = Denoiser(pair.edge.pipe, pair.edge.name, pair.edge.latent_space)
    received = state_from_payload(state_payload(for_edge(state, EdgeProfile.of(fresh_edge))))
    assert not received.conditioning.has_embeddings  # both sides of these pairs share text encoders
    return fresh_edge.denoise(received, received.loop_length).latents, switch


@pytest.mark.parametrize("family", ["sd1", "sdxl", "shapes"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("switch_step", SWITCH_STEPS)
def test_split_equals_one_loop_switched_at_k(pairs, references, family, scheduler, switch_step):
    request = GenerationRequest(
        "a large red circle above a small blue square",
        negative_prompt="blurry",
        switch_step=switch_step,
        num_inference_steps=STEPS,
        seed=1234,
        width=64,
        height=64,
        scheduler=scheduler,
    )
    assert_split_equals_reference(pairs[family], references[family], request)


def assert_split_equals_reference(pair, reference, request: GenerationRequest) -> torch.Tensor:
    """The split run's final latents, checked equal to diffusers' loop switched at the same iteration."""
    latents, switch = split_run(pair, request)
    resolved = HybridPipeline(pair).check_inputs(request)
    expected = reference_run(reference, resolved, pair.cloud.pipe.unet, pair.edge.pipe.unet, switch)
    assert torch.equal(latents, expected), (latents - expected).abs().max()
    return latents


def test_power_timesteps_follow_the_formula_and_never_repeat():
    assert power_timesteps(20, 2.0) == [round(999 * (1 - i / 20) ** 2) for i in range(20)]
    many = power_timesteps(900, 1.5)  # rounding alone repeats 0, 1, 2, ... at the low-noise end
    assert all(a > b for a, b in zip(many, many[1:], strict=False)) and (many[0], many[-1]) == (999, 0)
    assert many[:100] == [round(999 * (1 - i / 900) ** 1.5) for i in range(100)]


@pytest.mark.parametrize("family", ["sd1", "shapes"])
@pytest.mark.parametrize("scheduler", ["dpm++2m", "dpm++2m-sde", "euler", "ddpm"])
@pytest.mark.parametrize("switch_step", [0, STEPS // 2])
def test_power_spaced_split_equals_diffusers_with_those_timesteps(pairs, references, family, scheduler, switch_step):
    """timestep_power samples at diffusers' custom ``timesteps=`` 999 (1 - i/N)^p, on both sides of the split."""
    pair = pairs[family]
    request = GenerationRequest("a small blue square", switch_step=switch_step, num_inference_steps=STEPS, seed=99)
    request = dataclasses.replace(request, width=64, height=64, scheduler=scheduler, timestep_power=1.5)
    resolved = HybridPipeline(pair).check_inputs(request)
    assert pair.cloud.begin(resolved).timesteps.tolist() == power_timesteps(STEPS, 1.5) == [999, 760, 544, 353, 192, 68]
    latents = assert_split_equals_reference(pair, references[family], request)
    other_spacing = split_run(pair, dataclasses.replace(request, timestep_power=2.0))[0]
    assert not torch.equal(latents, other_spacing)


@pytest.mark.parametrize("scheduler", ["dpm++2m", "euler-a"])
def test_edge_with_its_own_text_encoder_encodes_again(pairs, references, scheduler):
    """An edge whose text encoder differs ignores the carried embeddings and uses its own, exactly
    as a loop that switches both the UNet and the embeddings at k."""
    from hybrid_sd.tiny_models import build_tiny_pipeline

    cloud = pairs["sd1"].cloud
    other = build_tiny_pipeline("sd1", "small", seed=7)  # other text encoder weights
    edge = Denoiser(other, "tiny-sd1-small-seed7")
    assert edge.text_encoder_id != cloud.text_encoder_id
    request = cloud.resolve(
        GenerationRequest(
            "a green triangle",
            "blurry",
            switch_step=3,
            num_inference_steps=STEPS,
            seed=5,
            width=64,
            height=64,
            scheduler=scheduler,
        )
    )
    state = cloud.begin(request)
    state = cloud.denoise(state, 3)
    latents = edge.denoise(state_from_payload(state_payload(state)), STEPS).latents

    positive, negative = other.encode_prompt(request.prompt, "cpu", 1, True, request.negative_prompt)
    edge_embeds = {"prompt_embeds": torch.cat([negative, positive])}
    expected = reference_run(references["sd1"], request, cloud.pipe.unet, other.unet, 3, edge_embeds)
    assert torch.equal(latents, expected)
    # and it is not what the carried (cloud) embeddings would give
    carried = reference_run(references["sd1"], request, cloud.pipe.unet, other.unet, 3)
    assert not torch.equal(latents, carried)
