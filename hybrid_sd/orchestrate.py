"""The one orchestration of a generation, over interchangeable cloud and edge halves.

In-process (:class:`~hybrid_sd.pipeline.HybridPipeline`) both halves are local; the gateway runs the
cloud half on Ray and the edge half over gRPC; an edge worker's own ``Generate`` runs the cloud half
over gRPC and the edge half locally. Either way: the request resolved by one rule (the edge's
defaults), steps [0, k) on the cloud, the handoff, steps [k, N) and the decode on the edge, or the
edge alone. See docs/design.md, "One generation path".
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from hybrid_sd.edge_profile import EdgeProfile
from hybrid_sd.errors import CloudUnavailableError, DeadlineExceededError
from hybrid_sd.lane import ProgressCallback
from hybrid_sd.limits import RequestLimits
from hybrid_sd.request import GenerationRequest
from hybrid_sd.results import STAGES, CallOptions, EdgeResult, GenerationResult, Handoff, OutputSpec
from hybrid_sd.switch_policy import SwitchChooser, resolve_switch

logger = logging.getLogger(__name__)


class CloudHalf(Protocol):
    async def denoise(
        self,
        request: GenerationRequest,
        edge: EdgeProfile | None,
        deadline: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Handoff:
        """Steps [0, switch_step) of ``request``, handed off for ``edge`` (a full handoff for None);
        raises CloudUnavailableError if unreachable. With ``on_progress``, reports every UNet evaluation."""


class EdgeHalf(Protocol):
    async def describe(self, deadline: float | None = None) -> EdgeProfile:
        """What the edge computes with and the defaults it fills in."""

    async def refine(
        self,
        start: Handoff | GenerationRequest,
        output: OutputSpec,
        deadline: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> EdgeResult:
        """The rest of the schedule after a handoff, or all of it for a request, and the decode."""


class Generate(Protocol):
    """A server's one generation (what its gRPC and HTTP faces both call): :func:`generate` with the server's
    halves, pair and limits bound."""

    async def __call__(
        self,
        request: GenerationRequest,
        options: CallOptions,
        deadline: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> GenerationResult: ...


@dataclass(frozen=True)
class ServerGeneration:
    """A server's one generation, :func:`generate` with its halves, pair, limits, cloud timeout and switch-point
    policy bound: what its gRPC and HTTP faces both call (a :class:`Generate`)."""

    cloud: CloudHalf | None
    edge: EdgeHalf
    served_pair: str | None = None
    limits: RequestLimits | None = None
    cloud_timeout: float | None = None  # seconds the cloud half may take, so that a fallback has time to run
    chooser: SwitchChooser | None = None  # chooses the switch step of auto_switch requests

    async def __call__(
        self,
        request: GenerationRequest,
        options: CallOptions,
        deadline: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> GenerationResult:
        return await generate(
            request,
            self.cloud,
            self.edge,
            options,
            deadline,
            self.cloud_timeout,
            on_progress,
            self.served_pair,
            self.limits,
            self.chooser,
        )


async def generate(
    request: GenerationRequest,
    cloud: CloudHalf | None,
    edge: EdgeHalf,
    options: CallOptions = CallOptions(),
    deadline: float | None = None,
    cloud_timeout: float | None = None,
    on_progress: ProgressCallback | None = None,
    served_pair: str | None = None,
    limits: RequestLimits | None = None,
    chooser: SwitchChooser | None = None,
) -> GenerationResult:
    """Generate one image. ``deadline`` is the caller's (wall clock); ``cloud_timeout`` seconds, if sooner,
    bounds the cloud half so that an edge fallback still has time to run. ``on_progress`` hears of
    every UNet evaluation on either side. A call naming a pair other than ``served_pair``, or over
    ``limits``, is refused before any work. ``chooser`` picks the switch step of an ``auto_switch``
    request (without one, such a request is refused) and learns from every result."""
    started = time.perf_counter()
    if options.pair and served_pair and options.pair != served_pair:
        raise ValueError(f"pair {options.pair!r} is not served here; this server runs {served_pair!r}")
    request.check()
    request, choice = resolve_switch(request, chooser)
    profile = await edge.describe(deadline)
    request = profile.fill(request.with_defaults())
    if limits is not None:
        limits.check(request)

    handoff: Handoff | None = None
    fell_back = False
    cloud_wall = 0.0
    if request.switch_step > 0:
        cloud_started = time.perf_counter()
        try:
            if cloud is None:
                raise CloudUnavailableError("no cloud denoiser is configured")
            cloud_deadline = None if cloud_timeout is None else time.time() + cloud_timeout
            limit = min((d for d in (deadline, cloud_deadline) if d is not None), default=None)
            handoff = await cloud.denoise(request, profile, limit, on_progress)
        except (CloudUnavailableError, DeadlineExceededError) as error:
            if not options.allow_edge_fallback or (deadline is not None and time.time() >= deadline):
                raise
            logger.warning("request %s: cloud failed (%s); finishing on the edge alone", options.request_id, error)
            fell_back = True
        cloud_wall = time.perf_counter() - cloud_started
    start = handoff if handoff is not None else _edge_only(request)
    edge_started = time.perf_counter()
    result = await edge.refine(start, options.output, deadline, on_progress)
    edge_wall = time.perf_counter() - edge_started
    timings = _timings(handoff, result, cloud_wall, edge_wall, time.perf_counter() - started)
    generated = GenerationResult(
        request=result.request,
        unet_evaluations={"cloud": handoff.unet_evaluations if handoff else 0, "edge": result.unet_evaluations},
        handoff_bytes=len(handoff.payload) if handoff else 0,
        timings=timings,
        image=result.image,
        image_data=result.image_data,
        mime_type=result.mime_type,
        latents=result.latents,
        cloud_replica=handoff.replica if handoff else "",
        cloud_node=handoff.node if handoff else "",
        edge_worker=result.worker,
        edge_fallback=fell_back,
        request_id=options.request_id,
        batch_sizes={"cloud": handoff.batch_sizes if handoff else [], "edge": result.batch_sizes},
        switch_choice=choice,
    )
    if chooser is not None:
        chooser.observe(generated)
    return generated


def _edge_only(request: GenerationRequest) -> GenerationRequest:
    return dataclasses.replace(request, switch_step=0)


def _timings(
    handoff: Handoff | None, result: EdgeResult, cloud_wall: float, edge_wall: float, total: float
) -> dict[str, float]:
    """Every stage of :data:`~hybrid_sd.results.STAGES`: each half's own, summed where both report
    one; ``handoff_transfer`` is the wall time of the two calls that neither half computed."""
    timings = dict.fromkeys(STAGES, 0.0)
    for stage, seconds in result.timings.items():
        timings[stage] += seconds
    transfer = max(0.0, edge_wall - sum(result.timings.values()))
    if handoff is not None:
        for stage, seconds in handoff.timings.items():
            timings[stage] += seconds
        transfer += max(0.0, cloud_wall - sum(handoff.timings.values()))
    timings["handoff_transfer"] = transfer
    timings["total"] = total
    return timings
