"""The plain values a generation is made of: what each half answers, the one result type, and the
one stage vocabulary, the same in-process and served (``hybrid_sd.wire`` encodes them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import PIL.Image
import torch

from hybrid_sd.edge_profile import EdgeProfile
from hybrid_sd.request import GenerationRequest

# Every stage a result reports, in seconds (StageTimings in the .proto): queue is the time spent
# waiting for compute lanes; handoff_transfer the time between the halves that neither computed.
STAGES = (
    "queue",
    "encode_prompt",
    "cloud_denoise",
    "handoff_encode",
    "handoff_transfer",
    "handoff_decode",
    "edge_denoise",
    "vae_decode",
    "total",
)

# The stages each half reports, in seconds; orchestrate adds handoff_transfer and total.
CLOUD_STAGES = ("queue", "encode_prompt", "cloud_denoise", "handoff_encode")
EDGE_STAGES = ("queue", "handoff_decode", "encode_prompt", "edge_denoise", "vae_decode")


@dataclass
class Handoff:
    """The cloud half's answer: the run's state as the wire's ``Handoff`` bytes, and how it was made."""

    payload: bytes  # format, state_json and tensors of a Handoff message; its length is the handoff's size
    unet_evaluations: int
    timings: dict[str, float]  # CLOUD_STAGES
    model: str = ""
    replica: str = ""
    node: str = ""
    batch_sizes: list[int] = field(default_factory=list)  # requests in each of its UNet calls


@dataclass(frozen=True)
class OutputSpec:
    """What the edge hands back: a decoded image (encoded as ``image_format`` for the wire, or kept
    as a PIL image), the final latents, or both."""

    decode: bool = True
    image_format: str | None = None  # a PIL format name ("PNG", "JPEG", "WEBP"); None: no encoding
    latents: bool = True


@dataclass
class EdgeResult:
    """The edge half's answer."""

    request: GenerationRequest  # resolved
    unet_evaluations: int
    timings: dict[str, float]  # EDGE_STAGES
    profile: EdgeProfile
    worker: str = ""
    batch_sizes: list[int] = field(default_factory=list)  # requests in each of its UNet calls
    image: PIL.Image.Image | None = None
    image_data: bytes = b""  # ``image`` encoded, where the output asked for a format
    mime_type: str = ""
    latents: torch.Tensor | None = None


@dataclass(frozen=True)
class CallOptions:
    """How a served call wants its answer, beside the request itself."""

    output: OutputSpec = OutputSpec()
    allow_edge_fallback: bool = False
    request_id: str = ""
    pair: str = ""  # the pair the caller expects; a server running another refuses the call


@dataclass(frozen=True)
class SwitchChoice:
    """How a server chose the switch step of an ``auto_switch`` request."""

    switch_step: int
    predicted_latency_s: float  # end-to-end, from the live step costs and queue
    quality: float | None  # the profile's quality (adherence) at switch_step, where it has one
    reason: str  # why this k: e.g. "meets target", "fastest", "cloud down"


@dataclass
class GenerationResult:
    """One generation, in-process or served."""

    request: GenerationRequest  # resolved: the seed, size, scheduler and switch step actually used
    unet_evaluations: dict[str, int]  # {"cloud": n, "edge": m}
    handoff_bytes: int  # the handoff's Handoff message (format, state_json, tensors); 0 without one
    timings: dict[str, float]  # STAGES
    image: PIL.Image.Image | None = None
    image_data: bytes = b""  # the image as the call's output format asked, where it did
    mime_type: str = ""
    latents: torch.Tensor | None = None
    cloud_replica: str = ""
    cloud_node: str = ""
    edge_worker: str = ""
    edge_fallback: bool = False
    request_id: str = ""
    # Requests in each UNet call of this one's steps, per side (1 everywhere: never batched).
    batch_sizes: dict[str, list[int]] = field(default_factory=lambda: {"cloud": [], "edge": []})
    switch_choice: SwitchChoice | None = None  # set where the server chose the switch step

    def summary(self) -> dict:
        """What ``hybrid-sd generate --json`` prints."""
        return {
            "seed": self.request.seed,
            "switch_step": self.request.switch_step,
            "num_inference_steps": self.request.num_inference_steps,
            "scheduler": self.request.scheduler,
            "guidance_scale": self.request.guidance_scale,
            "width": self.request.width,
            "height": self.request.height,
            "unet_evaluations": self.unet_evaluations,
            "handoff_bytes": self.handoff_bytes,
            "timings_s": {stage: round(seconds, 6) for stage, seconds in self.timings.items()},
            "cloud_replica": self.cloud_replica,
            "cloud_node": self.cloud_node,
            "edge_worker": self.edge_worker,
            "edge_fallback": self.edge_fallback,
            "batch_sizes": self.batch_sizes,
            "switch_choice": asdict(self.switch_choice) if self.switch_choice else None,
        }
