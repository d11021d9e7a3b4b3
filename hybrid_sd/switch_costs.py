"""The live costs of a generation's parts, learnt from completed generations: what the switch-point policy
(:mod:`hybrid_sd.switch_policy`) predicts a request's end-to-end latency from. Pure arithmetic, no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hybrid_sd.results import GenerationResult

EWMA_WEIGHT = 0.3  # the newest measurement's weight in each estimate
# What a request computes besides denoising. The waits (for a lane, in Ray's queue, on the network: the
# handoff_transfer stage) are not among them: the queue model predicts those, the calibration the rest. A wait
# counted as overhead would keep the cloud looking slow long after a burst, for nothing measures it again
# while the policy avoids the cloud.
OVERHEAD_STAGES = ("encode_prompt", "handoff_encode", "handoff_decode", "vae_decode")
# Predictions are scaled by a factor adapted online so that this share of chosen requests finish within their
# prediction (adaptive conformal inference, Gibbs and Candes 2021): each one late multiplies it by
# exp(RATE * COVERAGE), each one on time by exp(-RATE * (1 - COVERAGE)), so it settles where one in
# 1 / (1 - COVERAGE) is late. A burst raises it a step per late request, not to its worst ratio at once.
COVERAGE = 0.95
CALIBRATION_RATE = 0.1
SAFETY_RANGE = (0.5, 4.0)  # below 1: the model has been pessimistic (e.g. the profile's cold-start costs)


@dataclass
class Estimate:
    """An exponentially weighted mean of measurements; a seed stands in until the first one replaces it."""

    value: float | None = None
    measured: bool = False

    def update(self, sample: float) -> None:
        self.value = sample if not self.measured else self.value + EWMA_WEIGHT * (sample - self.value)
        self.measured = True


@dataclass
class SideCosts:
    """One side's denoising (the cloud's replicas or an edge worker), each a step-level batching lane:

    - ``step[b]``: seconds of one denoising step whose UNet calls held ``b`` requests;
    - ``steps``: the steps recent requests ran on this side, how long each holds a place in a batch;
    - ``outstanding_seen``: the calls outstanding here as the recent choices found them; arrivals at random
      see the time average (PASTA), so this counts the requests a new one will share its batches with, those
      that join while it runs included. Sampled at every choice, it cannot go stale while requests come, as a
      mean of past batch sizes does when the policy stops sending requests to this side;
    - ``largest_batch``: the most requests seen in one UNet call, the lane's capacity as far as anything has
      shown it (1 until batching is seen)."""

    step: dict[int, Estimate] = field(default_factory=dict)
    steps: Estimate = field(default_factory=Estimate)
    outstanding_seen: Estimate = field(default_factory=lambda: Estimate(0.0))
    largest_batch: int = 1

    @classmethod
    def seeded(cls, step: float) -> SideCosts:
        return cls(step={1: Estimate(step)})

    def observe(self, seconds: float, steps: int, batch_sizes: list[int]) -> None:
        """A request's ``steps`` steps on this side took ``seconds``, its UNet calls holding ``batch_sizes``
        requests (none reported: never batched)."""
        sizes = batch_sizes or [1]
        mean_size = sum(sizes) / len(sizes)
        self.step.setdefault(max(1, round(mean_size)), Estimate()).update(seconds / steps)
        self.largest_batch = max(self.largest_batch, *sizes)
        self.steps.update(steps)

    def step_at(self, occupancy: int) -> float | None:
        """Seconds a step takes with ``occupancy`` requests a UNet call: the estimate there if measured, else
        the nearest measured occupancy's scaled by ``(occupancy / nearest) ** batch_exponent()``."""
        costs = {b: estimate.value for b, estimate in self.step.items() if estimate.value is not None}
        if not costs:
            return None
        if occupancy in costs:
            return costs[occupancy]
        nearest = min(costs, key=lambda b: abs(b - occupancy))
        return costs[nearest] * (occupancy / nearest) ** self.batch_exponent()

    def batch_exponent(self) -> float:
        """How a step's cost grows with occupancy, ``cost ∝ occupancy ** exponent``: the least-squares slope of
        log cost against log occupancy over the measured occupancies, in [0, 1] (0: batching is free; 1: no
        gain). With fewer than two occupancies measured, 1: no batching gain is assumed until one is seen."""
        points = [(math.log(b), math.log(e.value)) for b, e in self.step.items() if e.value]
        if len(points) < 2:
            return 1.0
        mean_x = sum(x for x, _ in points) / len(points)
        mean_y = sum(y for _, y in points) / len(points)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
        return min(1.0, max(0.0, slope))

    def occupancy(self, queued: int, slots: int) -> int:
        """Requests a new one would share each UNet call with (itself included): the ``queued`` calls and it,
        spread over ``slots`` lanes, or as many as the choices have found on average if more (under a steady
        load a request meets more than are outstanding when it arrives), up to the largest batch seen."""
        now = math.ceil((queued + 1) / slots)
        usual = round((self.outstanding_seen.value + 1) / slots)
        return min(self.largest_batch, max(now, usual))

    def queue_wait(self, queued: int, slots: int, default_steps: float) -> float:
        """Expected seconds before a new call starts: the calls beyond what the lanes' running batches hold
        wait for whole batches, each about ``steps`` steps (``default_steps`` before any is measured) at the
        full-batch step cost."""
        capacity = slots * self.largest_batch
        overflow = max(0, queued + 1 - capacity)
        step = self.step_at(self.largest_batch) or 0.0
        steps = self.steps.value if self.steps.value is not None else default_steps
        return overflow / capacity * steps * step

    def seconds(self, steps: int, queued: int, slots: int) -> float | None:
        """Predicted seconds of ``steps`` steps here with ``queued`` calls outstanding: the wait for a place,
        then the steps at the occupancy it joins. None while no step cost is known."""
        step = self.step_at(self.occupancy(queued, slots))
        if step is None:
            return None
        return self.queue_wait(queued, slots, steps) + steps * step


@dataclass
class Load:
    """Calls outstanding (queued or running) at each side as a chooser sees them, and the cloud's replicas."""

    cloud_queued: int = 0
    edge_queued: int = 0
    cloud_slots: int = 1


@dataclass
class CostModel:
    """Seconds per part of a generation, each an exponentially weighted estimate: ``cloud`` and ``edge``
    denoising (:class:`SideCosts`) and the ``overhead`` a request computes besides denoising: prompt
    encoding, the decode and, where the cloud takes part, the handoff's encoding and decoding
    (``overhead[True]``; edge alone: ``overhead[False]``). ``safety`` calibrates the predictions: what they
    are multiplied by, adapted to how many chosen requests finished within theirs (``COVERAGE``)."""

    cloud: SideCosts = field(default_factory=SideCosts)
    edge: SideCosts = field(default_factory=SideCosts)
    overhead: dict[bool, Estimate] = field(default_factory=lambda: {False: Estimate(0.0), True: Estimate(0.0)})
    safety: float = 1.0

    @classmethod
    def seeded(cls, cloud_step: float, edge_step: float) -> CostModel:
        """A cold-start model: these per-step costs (at one request a call) until measurements replace them."""
        return cls(cloud=SideCosts.seeded(cloud_step), edge=SideCosts.seeded(edge_step))

    def observe(self, result: GenerationResult) -> None:
        """Fold a completed generation's timings into the estimates (a fallback's cloud part is not a cost)."""
        timings, request = result.timings, result.request
        k, edge_steps = request.switch_step, request.num_inference_steps - request.switch_step
        if edge_steps > 0 and timings.get("edge_denoise", 0.0) > 0:
            self.edge.observe(timings["edge_denoise"], edge_steps, result.batch_sizes.get("edge", []))
        self.overhead[k > 0].update(sum(timings.get(stage, 0.0) for stage in OVERHEAD_STAGES))
        if k > 0 and not result.edge_fallback:
            self.cloud.observe(timings.get("cloud_denoise", 0.0), k, result.batch_sizes.get("cloud", []))
        choice = result.switch_choice
        if choice is not None and choice.predicted_latency_s > 0 and not result.edge_fallback:
            late = timings.get("total", 0.0) > choice.predicted_latency_s
            factor = self.safety * math.exp(CALIBRATION_RATE * (late - (1 - COVERAGE)))
            self.safety = min(SAFETY_RANGE[1], max(SAFETY_RANGE[0], factor))

    def see(self, load: Load) -> None:
        """Note the calls outstanding at each side as a choice finds them."""
        self.cloud.outstanding_seen.update(load.cloud_queued)
        self.edge.outstanding_seen.update(load.edge_queued)

    def latency(self, k: int, steps: int, load: Load) -> float | None:
        """Predicted end-to-end seconds of ``k`` cloud steps of ``steps`` under ``load``: the overhead, plus
        for ``k > 0`` the cloud's wait and steps, plus for ``k < steps`` the edge's wait and steps, times
        ``safety``. None while a needed step cost is unknown."""
        total = self.overhead[k > 0].value
        if k > 0:
            cloud = self.cloud.seconds(k, load.cloud_queued, load.cloud_slots)
            if cloud is None:
                return None
            total += cloud
        if k < steps:
            edge = self.edge.seconds(steps - k, load.edge_queued, 1)
            if edge is None:
                return None
            total += edge
        return total * self.safety
