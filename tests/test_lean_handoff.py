"""The lean handoff: a cloud that knows the edge's profile leaves out the prompt embeddings an edge
with the same text encoders computes itself (bit for bit), and sends latents in the edge's dtype."""

from __future__ import annotations

import json

import pytest
import torch

from edge_worker.server import EdgeConfig, running_edge
from hybrid_sd import orchestrate
from hybrid_sd.denoiser import Denoiser
from hybrid_sd.edge_profile import EdgeProfile, for_edge
from hybrid_sd.halves import LocalCloud
from hybrid_sd.pairs import load_edge
from hybrid_sd.pipeline import HybridPipeline
from hybrid_sd.presets import PairSpec
from hybrid_sd.request import GenerationRequest
from hybrid_sd.results import CallOptions, OutputSpec
from hybrid_sd.state import HybridState
from hybrid_sd.tiny_models import build_tiny_pipeline
from hybrid_sd.wire import state_from_payload, state_payload
from tests.serving import LoopThread, free_port, grpc_edge_client

PROMPT = "a large red circle above a small blue square"
EMBEDDINGS = {"conditioning.prompt_embeds", "conditioning.negative_prompt_embeds"}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def own_edges(pair_specs):
    """Each pair's edge loaded alone, as an edge worker loads it: its own copy of the text encoders."""
    return {family: load_edge(spec) for family, spec in pair_specs.items()}


@pytest.fixture(scope="module")
def other_encoders_spec(pair_specs, tmp_path_factory) -> PairSpec:
    """The tiny SD 1.x pair with an edge whose text encoders have other weights."""
    folder = tmp_path_factory.mktemp("other-encoders")
    build_tiny_pipeline("sd1", "small", seed=7).save_pretrained(folder)
    spec = pair_specs["sd1"]
    return PairSpec(spec.cloud, str(folder), spec.edge_vae, "sd1")


def mid_run(cloud: Denoiser, scheduler: str = "dpm++2m") -> HybridState:
    request = cloud.resolve(
        GenerationRequest(PROMPT, "blurry", switch_step=3, num_inference_steps=6, seed=8, scheduler=scheduler)
    )
    return cloud.denoise(cloud.begin(request), 3)


@pytest.mark.parametrize("family", ["sd1", "sdxl", "shapes"])
@pytest.mark.parametrize("negative", [None, "blurry"])
def test_edge_encodes_the_embeddings_the_cloud_leaves_out_bit_for_bit(pairs, own_edges, family, negative):
    cloud, edge = pairs[family].cloud, own_edges[family]
    assert edge.text_encoder_id == cloud.text_encoder_id
    state = cloud.begin(cloud.resolve(GenerationRequest(PROMPT, negative, num_inference_steps=4, seed=3)))
    received = state_from_payload(state_payload(for_edge(state, EdgeProfile.of(edge))))
    assert not received.conditioning.has_embeddings
    own = edge.conditioned(received).conditioning.tensors()
    carried = state.conditioning.tensors()
    assert own.keys() == carried.keys()
    for name, tensor in carried.items():
        assert own[name].dtype == tensor.dtype and torch.equal(own[name], tensor), name


def test_lean_handoff_carries_the_fingerprint_and_everything_but_the_embeddings(pairs, own_edges):
    cloud = pairs["sd1"].cloud
    state = mid_run(cloud)
    full_document, full = state.to_parts()
    lean_document, lean = for_edge(state, EdgeProfile.of(own_edges["sd1"])).to_parts()
    assert (full_document["conditioning"], lean_document["conditioning"]) == ("carried", "omitted")
    assert lean_document["text_encoder_id"] == cloud.text_encoder_id
    assert set(full) - set(lean) == EMBEDDINGS and set(lean) < set(full)
    assert all(torch.equal(lean[name], full[name]) for name in lean)
    # An edge with other text encoders still gets the embeddings (and encodes again, as it always has).
    _, other = for_edge(state, EdgeProfile("other-encoders", torch.float32)).to_parts()
    assert set(other) == set(full)


def test_edge_with_other_encoders_encodes_a_lean_handoff_itself(pairs, other_encoders_spec):
    """A stale profile (the cloud believed the edge had its encoders) costs nothing but bytes: the
    edge encodes with its own, exactly as it does with a full handoff."""
    cloud = pairs["sd1"].cloud
    edge = load_edge(other_encoders_spec)
    assert edge.text_encoder_id != cloud.text_encoder_id
    state = mid_run(cloud)
    stale = state_from_payload(state_payload(for_edge(state, EdgeProfile.of(cloud))))
    full = state_from_payload(state_payload(state))
    assert torch.equal(edge.denoise(stale, 6).latents, edge.denoise(full, 6).latents)


def test_a_half_precision_edge_gets_latents_and_history_in_its_dtype(pairs, pair_specs):
    cloud = pairs["sd1"].cloud
    edge = load_edge(pair_specs["sd1"], dtype=torch.float16)
    state = mid_run(cloud, "unipc")  # model_outputs and last_sample shaped like the latents, int timestep_list
    lean = for_edge(state, EdgeProfile.of(edge))
    assert lean.latents.dtype == torch.float16 and torch.equal(lean.latents, state.latents.half())
    assert [output.dtype for output in lean.sampler_state["model_outputs"]] == [torch.float16] * 2
    assert lean.sampler_state["last_sample"].dtype == torch.float16
    assert all(step.dtype == torch.int64 for step in lean.sampler_state["timestep_list"] if step is not None)
    assert torch.equal(lean.timesteps, state.timesteps)
    # A cast is deterministic: made by the cloud (lean) or by the edge on receipt (full), the same bits.
    from_lean = edge.denoise(state_from_payload(state_payload(lean)), 6).latents
    from_full = edge.denoise(state_from_payload(state_payload(state)), 6).latents
    assert from_lean.dtype == torch.float16 and torch.equal(from_lean, from_full)
    assert len(state_payload(lean)) < len(state_payload(state))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("drop embeddings", "handoff is missing tensor 'conditioning.prompt_embeds'"),
        ("omitted but carried", "says its conditioning is 'omitted' but carries"),
        ("unsaid", "handoff field 'conditioning' must be 'carried' or 'omitted', got None"),
    ],
)
def test_embeddings_may_be_missing_only_where_the_handoff_says_so(pairs, change, message):
    document, tensors = mid_run(pairs["sd1"].cloud).to_parts()
    if change == "drop embeddings":
        tensors = {name: tensor for name, tensor in tensors.items() if name not in EMBEDDINGS}
    elif change == "omitted but carried":
        document["conditioning"] = "omitted"
    else:
        del document["conditioning"]
    with pytest.raises(ValueError, match=message):
        HybridState.from_parts(json.loads(json.dumps(document)), tensors)


def test_gateway_learns_the_edge_profile_and_follows_a_restart(pairs, pair_specs, other_encoders_spec):
    """The gateway's edge client asks a new edge for its profile (lean), and after the edge comes back
    with other text encoders, its first answer updates the profile (full again); every result exact."""
    loop, port = LoopThread(), free_port()
    edge = loop.run(grpc_edge_client(f"127.0.0.1:{port}"))
    cloud = LocalCloud(pairs["sd1"].cloud)
    request = GenerationRequest(PROMPT, "blurry", switch_step=3, num_inference_steps=6, seed=11, scheduler="dpm++2m")
    latents_only = CallOptions(output=OutputSpec(decode=False))

    def served() -> tuple[int, torch.Tensor]:
        result = loop.run(orchestrate.generate(request, cloud, edge, latents_only), timeout=60)
        return result.handoff_bytes, result.latents

    try:
        _, leave = loop.enter(running_edge(EdgeConfig(pair_specs["sd1"], port=port)))
        try:
            lean_bytes, latents = served()
        finally:
            leave()
        assert torch.equal(latents, HybridPipeline(pairs["sd1"])(request).latents)
        _, leave = loop.enter(running_edge(EdgeConfig(other_encoders_spec, port=port)))
        try:
            stale_bytes, stale = served()  # the old profile: lean, and the edge encodes with its own
            full_bytes, fresh = served()  # the profile from that answer: the embeddings travel
        finally:
            leave()
    finally:
        loop.close()
    assert stale_bytes == lean_bytes < full_bytes
    other_pair = HybridPipeline.from_pair(other_encoders_spec)
    assert torch.equal(stale, fresh) and torch.equal(fresh, other_pair(request).latents)
