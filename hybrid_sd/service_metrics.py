"""A server's Prometheus metrics (``/metrics`` on its HTTP face): calls by protocol, method and status, what
each generation it served measured (stage latencies, switch step, fallbacks, handoff bytes), and the inputs of
its switch-point policy."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from hybrid_sd.lane import ProgressCallback
from hybrid_sd.orchestrate import Generate
from hybrid_sd.request import GenerationRequest
from hybrid_sd.results import STAGES, CallOptions, GenerationResult
from hybrid_sd.switch_costs import COVERAGE

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
SWITCH_STEP_BUCKETS = (0, 1, 2, 4, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 100)
BYTES_BUCKETS = tuple(4**power * 1024 for power in range(10))  # 1 KiB to 256 MiB
CONTENT_TYPE = CONTENT_TYPE_LATEST
# The switch-point policy's inputs (SwitchPolicy.inputs), each a gauge hybrid_sd_switch_<name>, read at each scrape.
SWITCH_INPUTS = {
    "cloud_queue_depth": "Calls outstanding at the cloud, as the switch-point policy sees them",
    "cloud_occupancy": "Requests a new one would share each cloud UNet call with (itself included)",
    "cloud_step_seconds": "Estimated seconds of a cloud step at that occupancy (NaN: not yet known)",
    "edge_queue_depth": "Calls outstanding at the edge, as the switch-point policy sees them",
    "edge_occupancy": "Requests a new one would share each edge UNet call with (itself included)",
    "edge_step_seconds": "Estimated seconds of an edge step at that occupancy (NaN: not yet known)",
    "overhead_seconds": "Estimated seconds of a split request besides denoising: prompt, handoff, calls, decode",
    "safety_factor": f"What predictions are multiplied by, adapted so that {COVERAGE:.0%} of chosen requests finish"
    " within theirs",
    "chosen_switch_step": "The switch step the policy chose last (NaN: none yet)",
}


class ServiceMetrics:
    """One server's metrics, in a registry of its own: a gateway and an edge worker may share a process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hybrid_sd_requests",
            "Calls answered, by protocol (grpc, http), method (gRPC method or HTTP route) and status",
            ["protocol", "method", "status"],
            registry=self.registry,
        )
        self.in_flight = Gauge("hybrid_sd_requests_in_flight", "Generations being served", registry=self.registry)
        self.queue_depth = Gauge(
            "hybrid_sd_queue_depth",
            "Requests waiting for compute: on an edge worker, for its compute lane; on a gateway, calls"
            " outstanding at the denoiser replicas (Ray Serve's own metrics split queued from running)",
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "hybrid_sd_stage_seconds",
            "Seconds per stage of each generation served",
            ["stage"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.switch_step = Histogram(
            "hybrid_sd_switch_step",
            "Switch step of each generation served (cloud steps; 0 after an edge fallback)",
            buckets=SWITCH_STEP_BUCKETS,
            registry=self.registry,
        )
        self.edge_fallbacks = Counter(
            "hybrid_sd_edge_fallbacks",
            "Generations the edge finished alone, the cloud down or late",
            registry=self.registry,
        )
        self.handoff_bytes = Histogram(
            "hybrid_sd_handoff_bytes",
            "Handoff size of each generation with one",
            buckets=BYTES_BUCKETS,
            registry=self.registry,
        )

    def watch_queue(self, depth: Callable[[], int]) -> None:
        """Report ``depth()`` as the queue depth, read at each scrape."""
        self.queue_depth.set_function(depth)

    def watch_switch(self, inputs: Callable[[], dict[str, float]]) -> None:
        """Report the switch-point policy's ``inputs()`` (keys of :data:`SWITCH_INPUTS`), read at each scrape."""
        for name, description in SWITCH_INPUTS.items():
            gauge = Gauge(f"hybrid_sd_switch_{name}", description, registry=self.registry)
            gauge.set_function(lambda name=name: inputs()[name])

    def count(self, protocol: str, method: str, status: str) -> None:
        self.requests.labels(protocol, method, status).inc()

    def observe(self, result: GenerationResult) -> None:
        for stage in STAGES:
            self.stage_seconds.labels(stage).observe(result.timings.get(stage, 0.0))
        self.switch_step.observe(result.request.switch_step)
        if result.edge_fallback:
            self.edge_fallbacks.inc()
        if result.handoff_bytes:
            self.handoff_bytes.observe(result.handoff_bytes)

    def measured(self, generate: Generate) -> Generate:
        """``generate``, counted in flight and observed."""

        async def measured_generate(
            request: GenerationRequest,
            options: CallOptions,
            deadline: float | None = None,
            on_progress: ProgressCallback | None = None,
        ) -> GenerationResult:
            with self.in_flight.track_inprogress():
                result = await generate(request, options, deadline, on_progress)
            self.observe(result)
            return result

        return measured_generate

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)
