"""Choosing the switch step of an ``auto_switch`` request from a quality profile and the live costs (see
docs/design.md, "Choosing the switch point"). A server holds one :class:`SwitchPolicy`; :func:`resolve_switch`
applies it before a generation's cloud half, and each completed generation teaches it its costs."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Protocol

from hybrid_sd.request import DEFAULT_SWITCH_FRACTION, GenerationRequest
from hybrid_sd.results import GenerationResult, SwitchChoice
from hybrid_sd.switch_costs import CostModel, Load
from hybrid_sd.switch_profile import SwitchProfile

logger = logging.getLogger(__name__)

# Without a target, the default switch step holds while its predicted latency stays within this factor of
# what it takes a request alone (no queue); beyond, the choice aims at that bound.
LOAD_FACTOR = 1.5


class SwitchChooser(Protocol):
    def choose(self, request: GenerationRequest) -> SwitchChoice:
        """The switch step for an ``auto_switch`` request, and why."""

    def observe(self, result: GenerationResult) -> None:
        """Learn from a completed generation (any switch step, chosen or not)."""


def resolve_switch(
    request: GenerationRequest, chooser: SwitchChooser | None
) -> tuple[GenerationRequest, SwitchChoice | None]:
    """``request`` with its switch step chosen where it asks for ``auto_switch`` (auto_switch and the target
    cleared, as the halves require), and the choice; any other request unchanged, with None."""
    if not request.auto_switch:
        return request, None
    if chooser is None:
        raise ValueError(
            "auto_switch: this caller has no switch-point policy (in-process generation has none);"
            " set switch_step, or ask a gateway or edge worker, which choose it"
        )
    choice = chooser.choose(request)
    resolved = dataclasses.replace(request, switch_step=choice.switch_step, auto_switch=False, latency_target_s=None)
    return resolved, choice


class SwitchPolicy:
    """Chooses k from ``profile`` (quality against k; cold-start latencies) and the live costs: ``cloud_queued()``
    and ``edge_queued()``, the calls outstanding at each side as this server sees them; ``cloud_down()``, why
    the cloud cannot be used now (None when it can); ``slots``, the cloud's replicas."""

    def __init__(
        self,
        profile: SwitchProfile | None,
        cloud_queued: Callable[[], int],
        cloud_down: Callable[[], str | None],
        slots: int = 1,
        edge_queued: Callable[[], int] = lambda: 0,
    ):
        self.profile = profile
        self.cloud_queued, self.edge_queued, self.cloud_down, self.slots = cloud_queued, edge_queued, cloud_down, slots
        seed = profile.cold_step_costs() if profile else None
        self.costs = CostModel.seeded(*seed) if seed else CostModel()
        self.last: SwitchChoice | None = None

    def load(self) -> Load:
        return Load(self.cloud_queued(), self.edge_queued(), self.slots)

    def choose(self, request: GenerationRequest) -> SwitchChoice:
        """The largest k whose predicted latency meets the target (without one: the default 40% unless load
        pushes it past ``LOAD_FACTOR`` times its lone latency); none meeting it: the fastest k; the cloud
        down: 0."""
        steps = request.num_inference_steps
        default = round(DEFAULT_SWITCH_FRACTION * steps)
        load = self.load()
        self.costs.see(load)
        down = self.cloud_down()
        predicted = {k: self.costs.latency(k, steps, load) for k in range(steps + 1)}
        if down is not None:
            k, reason = 0, f"{down}: edge alone"
        elif any(latency is None for latency in predicted.values()):
            k, reason = default, "no measurements yet: default 40%"
        elif request.latency_target_s is not None:
            k, reason = _within(predicted, request.latency_target_s, "largest k meeting the target")
        else:
            k, reason = self._without_target(predicted, default, steps)
        quality = self.profile.quality_at(k, steps) if self.profile else None
        predicted_k = predicted[k] if predicted[k] is not None else 0.0
        choice = SwitchChoice(k, predicted_k, quality, reason)
        shown = "n/a" if quality is None else f"{quality:.3f}"
        logger.info(
            "switch step %d of %d (%s): predicted %.3f s, quality %s; queued cloud %d, edge %d",
            *(k, steps, reason, choice.predicted_latency_s, shown, load.cloud_queued, load.edge_queued),
        )
        self.last = choice
        return choice

    def _without_target(self, predicted: dict[int, float], default: int, steps: int) -> tuple[int, str]:
        """The default k while load keeps it within ``LOAD_FACTOR`` times its lone latency, else that bound's k."""
        bound = LOAD_FACTOR * self.costs.latency(default, steps, Load(cloud_slots=self.slots))
        if predicted[default] <= bound:
            return default, "default 40%"
        return _within(predicted, bound, f"load: largest k within {LOAD_FACTOR}x the lone latency at 40%")

    def observe(self, result: GenerationResult) -> None:
        self.costs.observe(result)

    def inputs(self) -> dict[str, float]:
        """What the choice reads now (NaN where unknown), for the server's metrics."""
        load = self.load()
        cloud_occupancy = self.costs.cloud.occupancy(load.cloud_queued, load.cloud_slots)
        edge_occupancy = self.costs.edge.occupancy(load.edge_queued, 1)
        return {
            "cloud_queue_depth": load.cloud_queued,
            "cloud_occupancy": cloud_occupancy,
            "cloud_step_seconds": _or_nan(self.costs.cloud.step_at(cloud_occupancy)),
            "edge_queue_depth": load.edge_queued,
            "edge_occupancy": edge_occupancy,
            "edge_step_seconds": _or_nan(self.costs.edge.step_at(edge_occupancy)),
            "overhead_seconds": _or_nan(self.costs.overhead[True].value),
            "safety_factor": self.costs.safety,
            "chosen_switch_step": math.nan if self.last is None else self.last.switch_step,
        }


def _within(predicted: dict[int, float], bound: float, reason: str) -> tuple[int, str]:
    """The largest k predicted within ``bound``, else the fastest (the larger k on a tie)."""
    feasible = [k for k, latency in predicted.items() if latency <= bound]
    if feasible:
        return max(feasible), reason
    return min(predicted, key=lambda k: (predicted[k], -k)), "fastest: no k meets the target"


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value
