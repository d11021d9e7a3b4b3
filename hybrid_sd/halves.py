"""The two halves of a generation, on plain values: the cloud's steps ``[0, k)`` ending in a
handoff, and the edge's steps ``[k, N)`` and the decode (or, given a request, the whole schedule).

``LocalCloud`` and ``LocalEdge`` run them on a :class:`~hybrid_sd.lane.ComputeLane` in this process:
in :class:`~hybrid_sd.pipeline.HybridPipeline`, in a Ray replica, in an edge worker. The remote
implementations of the same interface (``hybrid_sd.rpc_clients``, ``cloud_worker.deployment``)
carry the same values over gRPC and Ray; :func:`hybrid_sd.orchestrate.generate` composes either.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from functools import partial

import PIL.Image

from hybrid_sd.denoise import StepCallback, Steps, run_alone
from hybrid_sd.denoiser import Denoiser
from hybrid_sd.edge_profile import EdgeProfile, for_edge
from hybrid_sd.lane import ComputeLane, ProgressCallback
from hybrid_sd.previews import with_previews
from hybrid_sd.request import GenerationRequest
from hybrid_sd.results import CLOUD_STAGES, EDGE_STAGES, EdgeResult, Handoff, OutputSpec
from hybrid_sd.schedulers import loop_index
from hybrid_sd.wire import state_from_payload, state_payload


class _Laps:
    """Seconds per stage, each lap ending where the next begins."""

    def __init__(self, stages: tuple[str, ...]):
        self.timings = dict.fromkeys(stages, 0.0)
        self._clock = time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] += now - self._clock
        self._clock = now


def _between_stages(callback: StepCallback | None) -> None:
    """Let a cancelled or expired request stop between stages too (prompt encoding, denoising, decoding)."""
    if callback is not None:
        callback({})


def cloud_half(
    denoiser: Denoiser, request: GenerationRequest, edge: EdgeProfile | None, callback: StepCallback | None = None
) -> Handoff:
    """Steps [0, switch_step) of ``request`` on the large model; lean for ``edge`` if given (see
    :mod:`hybrid_sd.edge_profile`), else a full handoff in this model's dtype."""
    return run_alone(cloud_steps(denoiser, request, edge, callback))


def cloud_steps(
    denoiser: Denoiser, request: GenerationRequest, edge: EdgeProfile | None, callback: StepCallback | None = None
) -> Steps[Handoff]:
    """:func:`cloud_half` with its denoising loop left to a driver (a compute lane batches it)."""
    laps = _Laps(CLOUD_STAGES)
    request = denoiser.resolve(request)
    state = denoiser.begin(request)
    laps("encode_prompt")
    _between_stages(callback)
    end = loop_index(request.switch_step, request.num_inference_steps, state.loop_length)
    state = yield from denoiser.denoise_steps(state, end, with_previews(callback, denoiser, request.preview_every))
    laps("cloud_denoise")
    payload = state_payload(state if edge is None else for_edge(state, edge))
    laps("handoff_encode")
    return Handoff(payload, end, laps.timings, model=denoiser.name)


def edge_half(
    denoiser: Denoiser,
    start: Handoff | GenerationRequest,
    output: OutputSpec,
    callback: StepCallback | None = None,
) -> EdgeResult:
    """The rest of the schedule after ``start``'s handoff and the decode on the small model; or,
    given a request rather than a handoff, the whole schedule (switch_step 0)."""
    return run_alone(edge_steps(denoiser, start, output, callback))


def edge_steps(
    denoiser: Denoiser,
    start: Handoff | GenerationRequest,
    output: OutputSpec,
    callback: StepCallback | None = None,
) -> Steps[EdgeResult]:
    """:func:`edge_half` with its denoising loop left to a driver (a compute lane batches it)."""
    laps = _Laps(EDGE_STAGES)
    if isinstance(start, Handoff):
        state = state_from_payload(start.payload)
        denoiser.check_handoff(state)
        laps("handoff_decode")
        state = denoiser.conditioned(state)  # the prompt, where the handoff left it out or has other encoders
    else:
        state = denoiser.begin(denoiser.resolve(start))
    laps("encode_prompt")
    _between_stages(callback)
    start_index = state.step_index
    previews = with_previews(callback, denoiser, state.request.preview_every)
    state = yield from denoiser.denoise_steps(state, state.loop_length, previews)
    laps("edge_denoise")
    _between_stages(callback)
    result = EdgeResult(state.request, state.loop_length - start_index, laps.timings, EdgeProfile.of(denoiser))
    if output.latents:
        result.latents = state.latents
    if output.decode:
        result.image = denoiser.to_image(state.latents)
        if output.image_format is not None:
            result.image_data, result.mime_type = encode_image(result.image, output.image_format)
    laps("vae_decode")
    return result


def encode_image(image: PIL.Image.Image, image_format: str) -> tuple[bytes, str]:
    """``image`` as ``image_format`` (a PIL format name) bytes, and their MIME type."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue(), PIL.Image.MIME[image_format]


@dataclass
class LocalCloud:
    """The cloud half on a model in this process, one request at a time on its compute lane."""

    denoiser: Denoiser
    replica: str = ""
    node: str = ""
    lane: ComputeLane = field(default_factory=ComputeLane)

    async def denoise(
        self,
        request: GenerationRequest,
        edge: EdgeProfile | None,
        deadline: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Handoff:
        work = partial(cloud_steps, self.denoiser, request, edge)
        ran = await self.lane.run(work, deadline, on_progress, "cloud_denoise")
        handoff = ran.value
        handoff.timings["queue"], handoff.batch_sizes = ran.queued_s, ran.batch_sizes
        handoff.replica, handoff.node = self.replica, self.node
        return handoff


@dataclass
class LocalEdge:
    """The edge half on a model in this process, one request at a time on its compute lane."""

    denoiser: Denoiser
    worker: str = ""
    lane: ComputeLane = field(default_factory=ComputeLane)

    async def describe(self, deadline: float | None = None) -> EdgeProfile:
        return EdgeProfile.of(self.denoiser)

    async def refine(
        self,
        start: Handoff | GenerationRequest,
        output: OutputSpec,
        deadline: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> EdgeResult:
        work = partial(edge_steps, self.denoiser, start, output)
        ran = await self.lane.run(work, deadline, on_progress, "edge_denoise")
        result = ran.value
        result.timings["queue"], result.batch_sizes = ran.queued_s, ran.batch_sizes
        result.worker = self.worker
        return result
