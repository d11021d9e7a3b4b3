"""Step-level batching on a compute lane: requests that share UNet calls each get what they get alone,
within the stated tolerance (bit for bit with ``exact``); joins, cancellations and deadlines mid-batch."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
import pytest
import torch

from edge_worker.server import EdgeConfig, running_edge
from hybrid_sd.errors import DeadlineExceededError, QueueFullError, RunCancelledError
from hybrid_sd.halves import LocalCloud, LocalEdge, cloud_half, edge_half
from hybrid_sd.lane import ComputeLane
from hybrid_sd.request import GenerationRequest
from hybrid_sd.results import OutputSpec
from hybrid_sd.v1 import hybrid_sd_pb2 as pb
from hybrid_sd.v1 import hybrid_sd_pb2_grpc as pb_grpc
from hybrid_sd.wire import state_from_payload
from tests.serving import BATCHED_LATENT_TOLERANCE, channel

# Eight requests that differ in everything a request sets: seed, scheduler (deterministic, multistep and
# ancestral), guidance (with and without classifier-free), size and switch step.
MIXED = [
    GenerationRequest("a red circle", seed=1, num_inference_steps=8, switch_step=4, scheduler="ddim"),
    GenerationRequest("a blue square", seed=2, num_inference_steps=8, switch_step=6, scheduler="euler-a"),
    GenerationRequest("two triangles", seed=3, num_inference_steps=6, switch_step=3, guidance_scale=1.0),
    GenerationRequest("a green star", seed=4, num_inference_steps=8, switch_step=8, scheduler="dpm++2m"),
    GenerationRequest("a small moon", seed=5, num_inference_steps=8, switch_step=2, width=32, height=32),
    GenerationRequest("a yellow sun", seed=6, num_inference_steps=7, switch_step=5, guidance_scale=3.0),
    GenerationRequest("a grey cloud", seed=7, num_inference_steps=8, switch_step=4, scheduler="dpm++2m-sde"),
    GenerationRequest("a red square", seed=8, num_inference_steps=8, switch_step=7, scheduler="pndm"),
]


def _latents(handoff) -> torch.Tensor:
    return state_from_payload(handoff.payload).latents


async def _together(cloud: LocalCloud, requests: list[GenerationRequest]) -> list:
    return await asyncio.gather(*(cloud.denoise(request, None) for request in requests))


def test_mixed_requests_batched_equal_their_solo_runs(pairs):
    denoiser = pairs["sd1"].cloud
    alone = [cloud_half(denoiser, request, None) for request in MIXED]
    cloud = LocalCloud(denoiser, lane=ComputeLane(max_batch=8))
    batched = asyncio.run(_together(cloud, MIXED))
    shared = 0
    for request, solo, handoff in zip(MIXED, alone, batched, strict=True):
        assert handoff.unet_evaluations == solo.unet_evaluations
        assert len(handoff.batch_sizes) == solo.unet_evaluations
        torch.testing.assert_close(
            _latents(handoff), _latents(solo), rtol=0, atol=BATCHED_LATENT_TOLERANCE, msg=request.prompt
        )
        shared += max(handoff.batch_sizes, default=1) > 1
    # Sizes differ (64 and 32 px), CFG and not may share a call: most requests ran in batches of several.
    assert shared >= 6
    assert max(size for handoff in batched for size in handoff.batch_sizes) >= 4


def test_exact_requests_are_bit_for_bit_their_solo_runs(pairs):
    denoiser = pairs["sd1"].cloud
    exact = [dataclasses.replace(request, exact=True) for request in MIXED[:4]]
    cloud = LocalCloud(denoiser, lane=ComputeLane(max_batch=8))
    batched = asyncio.run(_together(cloud, [*exact, *MIXED[4:]]))
    for request, handoff in zip(exact, batched[:4], strict=True):
        assert set(handoff.batch_sizes) == {1}
        assert torch.equal(_latents(handoff), _latents(cloud_half(denoiser, request, None)))
    assert max(size for handoff in batched[4:] for size in handoff.batch_sizes) > 1


def test_edge_lane_batches_refines_too(pairs):
    """The edge worker's lane is the same code: refines of several handoffs share UNet calls."""
    cloud, edge = pairs["sd1"].cloud, pairs["sd1"].edge
    handoffs = [cloud_half(cloud, request, None) for request in MIXED[:4]]
    output = OutputSpec(decode=True, latents=True)
    alone = [edge_half(edge, handoff, output) for handoff in handoffs]
    local = LocalEdge(edge, lane=ComputeLane(max_batch=4))

    async def refine_all():
        return await asyncio.gather(*(local.refine(handoff, output) for handoff in handoffs))

    for solo, batched in zip(alone, asyncio.run(refine_all()), strict=True):
        torch.testing.assert_close(batched.latents, solo.latents, rtol=0, atol=BATCHED_LATENT_TOLERANCE)
        assert batched.image.size == solo.image.size
    assert max(size for result in asyncio.run(refine_all()) for size in result.batch_sizes) > 1


def test_join_cancel_and_deadline_mid_batch_leave_the_others_unchanged(pairs):
    denoiser = pairs["sd1"].cloud
    long = [GenerationRequest(f"shape {i}", seed=i, num_inference_steps=40, switch_step=40) for i in range(4)]
    joiner = GenerationRequest("late joiner", seed=9, num_inference_steps=12, switch_step=6)
    alone = [cloud_half(denoiser, request, None) for request in (*long[:2], joiner)]
    cloud = LocalCloud(denoiser, lane=ComputeLane(max_batch=8))

    async def scenario():
        steps = {i: 0 for i in range(4)}
        started = asyncio.Event()

        def counting(i: int):
            def on_progress(progress) -> None:
                steps[i] = progress.step
                if progress.step >= 3:
                    started.set()

            return on_progress

        keep = [asyncio.create_task(cloud.denoise(long[i], None, None, counting(i))) for i in range(2)]
        cancelled = asyncio.create_task(cloud.denoise(long[2], None, None, counting(2)))
        late = asyncio.create_task(cloud.denoise(long[3], None, time.time() + 3600, counting(3)))
        await started.wait()  # every request is mid-run
        joined = asyncio.create_task(cloud.denoise(joiner, None))
        cancelled.cancel()
        late_again = asyncio.create_task(cloud.denoise(long[3], None, time.time() + 0.05))
        results = await asyncio.gather(*keep, joined, cancelled, late, late_again, return_exceptions=True)
        return results, steps

    (first, second, joined, cancelled, late, late_again), steps = asyncio.run(scenario())
    assert isinstance(cancelled, asyncio.CancelledError) and steps[2] < 40
    assert not isinstance(late, Exception)  # a far deadline does not stop a request
    assert isinstance(late_again, DeadlineExceededError | RunCancelledError)
    for solo, batched in zip(alone, (first, second, joined), strict=True):
        torch.testing.assert_close(_latents(batched), _latents(solo), rtol=0, atol=BATCHED_LATENT_TOLERANCE)
    # The joiner came in while the others were mid-run, and shared their calls.
    assert min(joined.batch_sizes) >= 2 and max(first.batch_sizes) >= 3


def test_a_full_lane_refuses_at_once_and_serves_the_rest(pairs):
    cloud = LocalCloud(pairs["sd1"].cloud, lane=ComputeLane(max_batch=1, max_waiting=1))
    running = GenerationRequest("on the lane", seed=1, num_inference_steps=40, switch_step=40)
    waiting = GenerationRequest("waiting", seed=2, num_inference_steps=4, switch_step=2)

    async def scenario():
        on_lane = asyncio.Event()
        first = asyncio.create_task(cloud.denoise(running, None, None, lambda progress: on_lane.set()))
        await on_lane.wait()
        second = asyncio.create_task(cloud.denoise(waiting, None))
        await asyncio.sleep(0)  # the second is submitted and waits: the lane holds one at a time
        with pytest.raises(QueueFullError, match="the compute lane is full: 1 requests on it and 1 waiting"):
            await cloud.denoise(waiting, None)
        return await asyncio.gather(first, second)

    first, second = asyncio.run(scenario())
    assert set(first.batch_sizes) == set(second.batch_sizes) == {1}  # each served, one at a time


def test_a_full_edge_lane_answers_resource_exhausted(loop, pair_specs):
    config = EdgeConfig(pair_specs["sd1"], port=0, max_batch=1, max_queued=1)
    server, leave = loop.enter(running_edge(config))
    stub = pb_grpc.HybridDiffusionStub(channel(server.port))
    try:
        long = stub.GenerateStream(pb.GenerateRequest(prompt="a long run", num_inference_steps=150, switch_step=0))
        next(event for event in long if event.HasField("progress"))  # it is on the lane
        calls = [
            stub.Generate.future(pb.GenerateRequest(prompt=f"short {i}", num_inference_steps=2, switch_step=0))
            for i in range(2)
        ]
        outcomes = []
        for call in calls:
            try:
                outcomes.append(call.result(timeout=120).switch_step)
            except grpc.RpcError as error:
                outcomes.append((error.code(), "the compute lane is full" in error.details()))
        long.cancel()
    finally:
        leave()
    # One waits for the lane and is served; the one after it is refused at once, naming why.
    assert sorted(outcomes, key=str) == sorted([0, (grpc.StatusCode.RESOURCE_EXHAUSTED, True)], key=str)


def test_lane_arguments_are_checked():
    with pytest.raises(ValueError, match="max_batch"):
        ComputeLane(max_batch=0)
    with pytest.raises(ValueError, match="batch wait"):
        ComputeLane(batch_wait_s=-1)
    with pytest.raises(ValueError, match="max_waiting"):
        ComputeLane(max_waiting=-1)
