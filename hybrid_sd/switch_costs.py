"""The live costs of a generation's parts, learnt from completed generations: what the switch-point policy
(:mod:`hybrid_sd.switch_policy`) predicts a request's end-to-end latency from. Pure arithmetic, no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hybrid_sd.results import GenerationResult

EWMA_WEIGHT = 0.3  # the newest measurement's weight in each estimate
HANDOFF_STAGES = ("handoff_encode", "handoff_transfer", "handoff_decode")


@dataclass
class Estimate:
    """An exponentially weighted mean of measurements; a seed stands in until the first one replaces it."""

    value: float | None = None
    measured: bool = False

    def update(self, sample: float) -> None:
        self.value = sample if not self.measured else self.value + EWMA_WEIGHT * (sample - self.value)
        self.measured = True


@dataclass
class CostModel:
    """Seconds per part of a generation, each an exponentially weighted estimate:

    - ``cloud_step[b]``: one cloud denoising step whose UNet calls held ``b`` requests (step-level batching);
    - ``edge_step``: one edge denoising step;
    - ``handoff``: encoding the state, the transfer between the halves (serialization, network, Ray) and decoding it;
    - ``fixed``: what every path pays once: prompt encoding (both sides) and the VAE decode;
    - ``cloud_steps``: the cloud steps of recent requests, how long each queued request holds a replica.

    ``largest_batch`` is the most requests seen in one cloud UNet call: the replica's batch capacity as far as
    anything has shown it (1 until batching is seen)."""

    cloud_step: dict[int, Estimate] = field(default_factory=dict)
    edge_step: Estimate = field(default_factory=Estimate)
    handoff: Estimate = field(default_factory=lambda: Estimate(0.0))
    fixed: Estimate = field(default_factory=lambda: Estimate(0.0))
    cloud_steps: Estimate = field(default_factory=Estimate)
    largest_batch: int = 1

    @classmethod
    def seeded(cls, cloud_step: float, edge_step: float) -> CostModel:
        """A cold-start model: these per-step costs (at one request a call) until measurements replace them."""
        return cls(cloud_step={1: Estimate(cloud_step)}, edge_step=Estimate(edge_step))

    @property
    def measured(self) -> bool:
        """Whether any generation has been observed (else the estimates are seeds, or absent)."""
        return self.edge_step.measured or any(estimate.measured for estimate in self.cloud_step.values())

    def observe(self, result: GenerationResult) -> None:
        """Fold a completed generation's timings into the estimates (a fallback's cloud part is not a cost)."""
        timings, request = result.timings, result.request
        k, edge_steps = request.switch_step, request.num_inference_steps - request.switch_step
        if edge_steps > 0 and timings.get("edge_denoise", 0.0) > 0:
            self.edge_step.update(timings["edge_denoise"] / edge_steps)
        self.fixed.update(timings.get("encode_prompt", 0.0) + timings.get("vae_decode", 0.0))
        if k == 0 or result.edge_fallback:
            return
        sizes = result.batch_sizes.get("cloud") or [1]  # no sizes reported: never batched
        occupancy = max(1, round(sum(sizes) / len(sizes)))
        self.cloud_step.setdefault(occupancy, Estimate()).update(timings.get("cloud_denoise", 0.0) / k)
        self.largest_batch = max(self.largest_batch, *sizes)
        self.handoff.update(sum(timings.get(stage, 0.0) for stage in HANDOFF_STAGES))
        self.cloud_steps.update(k)

    def cloud_step_at(self, occupancy: int) -> float | None:
        """Seconds a cloud step takes with ``occupancy`` requests a UNet call: the estimate there if measured, else
        the nearest measured occupancy's scaled by ``(occupancy / nearest) ** batch_exponent()``."""
        costs = {b: estimate.value for b, estimate in self.cloud_step.items() if estimate.value is not None}
        if not costs:
            return None
        if occupancy in costs:
            return costs[occupancy]
        nearest = min(costs, key=lambda b: abs(b - occupancy))
        return costs[nearest] * (occupancy / nearest) ** self.batch_exponent()

    def batch_exponent(self) -> float:
        """How a cloud step's cost grows with occupancy, ``cost ∝ occupancy ** exponent``: the least-squares slope
        of log cost against log occupancy over the measured occupancies, in [0, 1] (0: batching is free; 1: no
        gain). With fewer than two occupancies measured, 1: no batching gain is assumed until one is seen."""
        points = [(math.log(b), math.log(e.value)) for b, e in self.cloud_step.items() if e.value]
        if len(points) < 2:
            return 1.0
        mean_x = sum(x for x, _ in points) / len(points)
        mean_y = sum(y for _, y in points) / len(points)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
        return min(1.0, max(0.0, slope))

    def occupancy(self, queued: int, slots: int) -> int:
        """Requests a new one would share each cloud UNet call with (itself included): the ``queued`` calls and
        it, spread over ``slots`` replicas, up to the largest batch seen."""
        return min(self.largest_batch, math.ceil((queued + 1) / slots))

    def queue_wait(self, queued: int, slots: int, default_steps: float) -> float:
        """Expected seconds before a new cloud call starts: the calls beyond what the replicas' running batches
        hold wait for whole batches, each about ``cloud_steps`` steps (``default_steps`` before any is measured)
        at the full-batch step cost."""
        capacity = slots * self.largest_batch
        overflow = max(0, queued + 1 - capacity)
        step = self.cloud_step_at(self.largest_batch) or 0.0
        steps = self.cloud_steps.value if self.cloud_steps.value is not None else default_steps
        return overflow / capacity * steps * step

    def latency(self, k: int, steps: int, queued: int, slots: int) -> float | None:
        """Predicted end-to-end seconds of ``k`` cloud steps of ``steps`` with ``queued`` calls outstanding at the
        cloud: ``fixed + (steps - k) * edge_step``, plus for ``k > 0``: ``queue_wait + k * cloud_step_at(occupancy)
        + handoff``. None while a needed step cost is unknown."""
        edge_step = self.edge_step.value
        if edge_step is None and k < steps:
            return None
        total = self.fixed.value + (steps - k) * (edge_step or 0.0)
        if k == 0:
            return total
        cloud_step = self.cloud_step_at(self.occupancy(queued, slots))
        if cloud_step is None:
            return None
        return total + self.queue_wait(queued, slots, k) + k * cloud_step + self.handoff.value
