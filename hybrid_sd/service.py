"""The cloud's and the edge's halves of a served request (protobuf in, protobuf out), and the
single compute lane each worker runs them on, with deadlines and cancellation between steps."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from hybrid_sd.denoise import StepCallback
from hybrid_sd.denoiser import Denoiser
from hybrid_sd.edge_profile import EdgeProfile, for_edge
from hybrid_sd.errors import DeadlineExceededError, RunCancelledError
from hybrid_sd.rpc import ProgressCallback
from hybrid_sd.schedulers import loop_index
from hybrid_sd.v1 import hybrid_sd_pb2 as pb
from hybrid_sd.wire import (
    check_output_format,
    edge_profile_from_pb,
    edge_profile_to_pb,
    encode_image,
    handoff_from_pb,
    handoff_to_pb,
    request_from_pb,
    request_to_pb,
    tensor_to_pb,
)

T = TypeVar("T")


class ComputeLane:
    """Runs model work one request at a time on a worker thread, so the event loop stays free to
    take calls, health checks and cancellations. A cancelled or expired request stops at the next
    denoising step and frees the lane."""

    def __init__(self):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="denoise")

    async def run(
        self,
        work: Callable[[StepCallback], T],
        deadline: float | None,
        on_progress: ProgressCallback | None = None,
        stage: str = "",
    ) -> T:
        """Run ``work(callback)`` on the lane; ``on_progress`` hears of every UNet evaluation (as
        ``stage``), on the event loop."""
        stop = threading.Event()
        loop = asyncio.get_running_loop()

        def check(step: dict) -> None:
            """Called after every UNet evaluation, and with ``{}`` between stages."""
            if stop.is_set():
                raise RunCancelledError("request cancelled")
            if deadline is not None and time.time() > deadline:
                raise DeadlineExceededError("deadline exceeded during denoising")
            if on_progress is not None and step:
                progress = pb.Progress(stage=stage, step=step["step"] + 1, total=step["total"])
                loop.call_soon_threadsafe(on_progress, progress)

        def guarded() -> T:
            check({})  # a request whose deadline passed in the queue never starts
            return work(check)

        future = loop.run_in_executor(self._executor, guarded)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set()
            raise

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


async def with_progress(call: Callable[..., Awaitable[T]]) -> AsyncIterator[pb.Progress | T]:
    """Turn ``call(on_progress=...)`` into a stream: its progress events as they come, then its
    value (or its error)."""
    events: asyncio.Queue[pb.Progress] = asyncio.Queue()
    task = asyncio.ensure_future(call(on_progress=events.put_nowait))
    try:
        while True:
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
                continue
            getter.cancel()
            while not events.empty():
                yield events.get_nowait()
            yield task.result()
            return
    finally:
        task.cancel()


async def as_events(items: AsyncIterator[pb.Progress | T], event_type: type, final_field: str) -> AsyncIterator:
    """Wrap a progress-then-result stream in ``event_type``, a message with a oneof of
    ``progress`` and ``final_field``."""
    async for item in items:
        if isinstance(item, pb.Progress):
            yield event_type(progress=item)
        else:
            yield event_type(**{final_field: item})


def _between_stages(callback: StepCallback | None) -> None:
    """Let a cancelled or expired request stop between stages too (prompt encoding, denoising, decoding)."""
    if callback is not None:
        callback({})


def cloud_denoise(
    denoiser: Denoiser, message: pb.DenoiseRequest, replica: str, callback: StepCallback | None
) -> pb.Handoff:
    """Steps [0, switch_step) of a request on the large model; lean for the edge it names, if any
    (see :mod:`hybrid_sd.edge_profile`)."""
    edge = edge_profile_from_pb(message.edge_profile) if message.HasField("edge_profile") else None
    request = denoiser.resolve(request_from_pb(message.request))
    started = time.perf_counter()
    state = denoiser.begin(request)
    _between_stages(callback)
    encoded = time.perf_counter()
    end = loop_index(request.switch_step, request.num_inference_steps, state.loop_length)
    state = denoiser.denoise(state, end, callback)
    denoised = time.perf_counter()
    handoff = handoff_to_pb(state if edge is None else for_edge(state, edge))
    handoff.cloud_model = denoiser.name
    handoff.cloud_replica = replica
    handoff.cloud_unet_evaluations = end
    handoff.encode_prompt_seconds = encoded - started
    handoff.cloud_denoise_seconds = denoised - encoded
    return handoff


def edge_refine(
    denoiser: Denoiser, message: pb.RefineRequest, worker: str, callback: StepCallback | None
) -> pb.ImageResult:
    """The rest of the schedule and the decode on the small model; or, given a request rather
    than a handoff, the whole schedule (switch_step 0)."""
    check_output_format(message.output_format)
    result = pb.ImageResult(edge_worker=worker, edge_profile=edge_profile_to_pb(EdgeProfile.of(denoiser)))
    started = time.perf_counter()
    if message.HasField("handoff"):
        state = handoff_from_pb(message.handoff)
        denoiser.check_handoff(state)
        result.handoff_decode_seconds = time.perf_counter() - started
        started = time.perf_counter()
        state = denoiser.conditioned(state)  # the prompt, where the handoff left it out or has other encoders
        result.encode_prompt_seconds = time.perf_counter() - started
    else:
        request = denoiser.resolve(request_from_pb(message.request))
        state = denoiser.begin(request)
        result.encode_prompt_seconds = time.perf_counter() - started
    _between_stages(callback)
    started = time.perf_counter()
    start_index = state.step_index
    state = denoiser.denoise(state, state.loop_length, callback)
    result.edge_denoise_seconds = time.perf_counter() - started
    result.edge_unet_evaluations = state.loop_length - start_index
    result.request.CopyFrom(request_to_pb(state.request))
    _between_stages(callback)
    started = time.perf_counter()
    if message.output_format == pb.OUTPUT_FORMAT_LATENTS or message.include_latents:
        result.latents.CopyFrom(tensor_to_pb(state.latents))
    if message.output_format != pb.OUTPUT_FORMAT_LATENTS:
        result.image, result.mime_type = encode_image(denoiser.to_image(state.latents), message.output_format)
    result.vae_decode_seconds = time.perf_counter() - started
    return result
