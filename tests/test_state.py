"""The handoff state on the wire: safetensors + JSON, exact round trips, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hybrid_sd import sampler_state
from hybrid_sd.errors import IncompatibleModelsError
from hybrid_sd.pipeline import HybridPipeline
from hybrid_sd.request import GenerationRequest
from hybrid_sd.state import HybridState
from hybrid_sd.v1 import hybrid_sd_pb2 as pb
from hybrid_sd.wire import state_from_payload, state_payload


def mid_run_state(pair, scheduler: str, steps: int = 6, switch: int = 3) -> HybridState:
    request = HybridPipeline(pair).check_inputs(
        GenerationRequest(
            "a red circle", "blurry", switch_step=switch, num_inference_steps=steps, seed=8, scheduler=scheduler
        )
    )
    return pair.cloud.denoise(pair.cloud.begin(request), switch)


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert type(a) is type(b) and a == b


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("scheduler", ["dpm++2m", "unipc", "pndm", "euler-a", "lcm"])
def test_round_trip_is_exact(pairs, family, scheduler):
    state = mid_run_state(pairs[family], scheduler)
    assert state.sampler_state, "a mid-run scheduler has state to carry"
    received = state_from_payload(state_payload(state))
    assert received.request == state.request
    assert received.scheduler_config == json.loads(json.dumps(state.scheduler_config))
    assert (received.step_index, received.latent_space, received.vae_scaling_factor) == (
        state.step_index,
        state.latent_space,
        state.vae_scaling_factor,
    )
    for name in ("latents", "timesteps", "generator_state"):
        assert_same(getattr(received, name), getattr(state, name))
    assert received.conditioning.text_encoder_id == state.conditioning.text_encoder_id
    assert received.conditioning.tensors().keys() == state.conditioning.tensors().keys()
    for name, tensor in state.conditioning.tensors().items():
        assert_same(received.conditioning.tensors()[name], tensor)
    assert received.sampler_state.keys() == state.sampler_state.keys()
    for name, value in state.sampler_state.items():
        assert_same(received.sampler_state[name], value)


def test_multistep_history_is_carried(pairs):
    state = mid_run_state(pairs["sd1"], "dpm++2m")
    assert state.sampler_state["lower_order_nums"] == 2
    assert state.sampler_state["_step_index"] == 3
    assert all(isinstance(output, torch.Tensor) for output in state.sampler_state["model_outputs"])
    plms = mid_run_state(pairs["sd1"], "pndm")
    assert plms.sampler_state["counter"] == 3 and len(plms.sampler_state["ets"]) == 2


def test_wire_format_is_a_handoff_message_of_json_and_raw_tensors(pairs):
    payload = state_payload(mid_run_state(pairs["sd1"], "euler-a"))
    message = pb.Handoff.FromString(payload)
    document = json.loads(message.state_json)
    assert message.format == document["format"] == "hybrid-sd.state/1"
    assert document["latent_space"] == "sd1"
    assert {"latents", "timesteps", "generator_state", "conditioning.prompt_embeds"} <= set(message.tensors)
    latents = message.tensors["latents"]
    assert latents.dtype == "float32" and list(latents.shape) == [1, 4, 8, 8] and len(latents.data) == 4 * 4 * 8 * 8
    assert b"\x80\x04" not in payload  # not a pickle


@pytest.mark.parametrize("payload", [b"\xff\xff", b"not a state", pb.Handoff(state_json="{").SerializeToString()])
def test_malformed_handoff_is_a_value_error(payload):
    with pytest.raises(ValueError, match="handoff"):
        state_from_payload(payload)


def test_wrong_format_version_is_refused():
    payload = pb.Handoff(format="other/9", state_json=json.dumps({"format": "other/9"})).SerializeToString()
    with pytest.raises(ValueError, match="handoff format must be 'hybrid-sd.state/1'"):
        state_from_payload(payload)


def test_state_that_cannot_travel_exactly_is_refused():
    with pytest.raises(ValueError, match="scheduler state 'sampler.noise_sampler' holds a object"):
        sampler_state.flatten({"noise_sampler": object()}, "sampler.")


def test_receiver_refuses_a_different_latent_space(pairs):
    state = mid_run_state(pairs["sd1"], "ddim")
    with pytest.raises(
        IncompatibleModelsError,
        match="handoff from '.*cloud' is in the 'sd1' latent space but '.*edge' denoises in 'sdxl'",
    ):
        pairs["sdxl"].edge.denoise(state, state.loop_length)


def test_receiver_refuses_other_timesteps(pairs):
    state = mid_run_state(pairs["sd1"], "ddim")
    state.timesteps = state.timesteps + 1
    with pytest.raises(ValueError, match="computes other timesteps"):
        pairs["sd1"].edge.denoise(state, state.loop_length)
