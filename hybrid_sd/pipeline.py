"""In-process hybrid generation: the cloud model's steps, the handoff, the edge model's steps."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import PIL.Image
import torch

from hybrid_sd.denoise import StepCallback
from hybrid_sd.edge_profile import EdgeProfile, for_edge
from hybrid_sd.pairs import ModelPair, load_pair, preset
from hybrid_sd.presets import DEFAULT_PAIR, PairSpec
from hybrid_sd.request import GenerationRequest
from hybrid_sd.schedulers import loop_index
from hybrid_sd.state import HybridState


@dataclass
class GenerationResult:
    image: PIL.Image.Image
    latents: torch.Tensor
    request: GenerationRequest  # resolved: the seed, size and scheduler actually used
    unet_evaluations: dict[str, int]  # {"cloud": n, "edge": m}
    handoff_bytes: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    def summary(self) -> dict:
        """What ``hybrid-sd generate --json`` prints."""
        return {
            "seed": self.request.seed,
            "switch_step": self.request.switch_step,
            "num_inference_steps": self.request.num_inference_steps,
            "scheduler": self.request.scheduler,
            "width": self.request.width,
            "height": self.request.height,
            "unet_evaluations": self.unet_evaluations,
            "handoff_bytes": self.handoff_bytes,
            "timings_s": {stage: round(seconds, 6) for stage, seconds in self.timings.items()},
        }


class HybridPipeline:
    """A cloud and an edge :class:`~hybrid_sd.denoiser.Denoiser` in one process, handing over
    through the same bytes a remote handoff uses (lean by the same rule)."""

    def __init__(self, pair: ModelPair):
        self.cloud = pair.cloud
        self.edge = pair.edge

    @classmethod
    def from_pair(
        cls, pair: str | PairSpec = DEFAULT_PAIR, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> HybridPipeline:
        spec = preset(pair) if isinstance(pair, str) else pair
        return cls(load_pair(spec, device, dtype))

    def check_inputs(self, request: GenerationRequest) -> GenerationRequest:
        """Validate everything up front; resolve switch step, seed, size and scheduler against the
        cloud model."""
        request = self.cloud.resolve(request)
        self.edge.check_size(request)
        return request

    def __call__(self, request: GenerationRequest, callback: StepCallback | None = None) -> GenerationResult:
        request = self.check_inputs(request)
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[stage] = timings.get(stage, 0.0) + now - clock
            clock = now

        # switch_step = 0: edge only, the cloud is not touched.
        first = self.cloud if request.switch_step > 0 else self.edge
        state = first.begin(request)
        lap("encode_prompt")
        switch = loop_index(request.switch_step, request.num_inference_steps, state.loop_length)
        handoff_bytes = 0
        if request.switch_step > 0:
            state = self.cloud.denoise(state, switch, callback)
            lap("cloud_denoise")
            payload = for_edge(state, EdgeProfile.of(self.edge)).to_bytes()  # lean, as a served handoff
            handoff_bytes = len(payload)
            state = HybridState.from_bytes(payload)
            lap("handoff")
        state = self.edge.denoise(state, state.loop_length, callback)
        lap("edge_denoise")
        pil_image = self.edge.to_image(state.latents)
        lap("decode")
        timings["total"] = sum(timings.values())
        return GenerationResult(
            image=pil_image,
            latents=state.latents,
            request=request,
            unet_evaluations={"cloud": switch, "edge": state.loop_length - switch},
            handoff_bytes=handoff_bytes,
            timings=timings,
        )
