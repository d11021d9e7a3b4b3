"""The parameters of one text-to-image request, validated once, up front."""

from __future__ import annotations

import dataclasses
import math
import secrets
from dataclasses import dataclass

MAX_STEPS = 1000
MAX_SEED = 2**63 - 1
DEFAULT_SWITCH_FRACTION = 0.4
MIN_TIMESTEP_POWER, MAX_TIMESTEP_POWER = 1.0, 4.0  # beyond 4, nearly every step sits at the low-noise end
DEFAULT_GUIDANCE_SCALE = 7.5  # Stable Diffusion's; a pair may recommend its own (PairSpec.guidance_scale)


@dataclass(frozen=True)
class GenerationRequest:
    """One request: ``switch_step`` denoising steps on the cloud model, the rest on the edge model.

    ``switch_step=None`` hands over after 40% of the steps (early steps fix the layout, which needs
    the large model), unless ``auto_switch`` lets the server choose. ``seed=None`` draws a random
    seed; ``width``/``height=None`` take the edge model's native size, ``scheduler=None`` its
    scheduler class and ``guidance_scale=None`` its pair's guidance (the edge runs on every path: see
    :meth:`hybrid_sd.edge_profile.EdgeProfile.fill`).
    """

    prompt: str
    negative_prompt: str | None = None
    switch_step: int | None = None
    num_inference_steps: int = 25
    guidance_scale: float | None = None
    guidance_rescale: float = 0.0
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    timestep_power: float | None = None
    preview_every: int = 0  # a preview every n UNet evaluations of a stream; 0: none (the image is the same)
    exact: bool = False  # UNet calls of its own, never batched with other requests: bit for bit as diffusers
    auto_switch: bool = False  # the server chooses switch_step (which must be unset) from its profile and load
    latency_target_s: float | None = None  # with auto_switch: the end-to-end seconds to meet

    def check(self) -> None:
        """Raise ``ValueError`` naming the first bad field; size and scheduler are checked later,
        against the loaded models."""
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string or None, got {type(self.negative_prompt).__name__}")
        _check_int("num_inference_steps", self.num_inference_steps, 1, MAX_STEPS)
        if self.switch_step is not None:
            _check_int("switch_step", self.switch_step, 0, self.num_inference_steps)
        if self.guidance_scale is not None:
            _check_finite("guidance_scale", self.guidance_scale, 0.0)
        _check_finite("guidance_rescale", self.guidance_rescale, 0.0, 1.0)
        if self.timestep_power is not None:
            _check_finite("timestep_power", self.timestep_power, MIN_TIMESTEP_POWER, MAX_TIMESTEP_POWER)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, 1, 16384)
        _check_int("preview_every", self.preview_every, 0, MAX_STEPS)
        if self.scheduler is not None and (not isinstance(self.scheduler, str) or not self.scheduler):
            raise ValueError(f"scheduler must be a non-empty string or None, got {self.scheduler!r}")
        for name in ("exact", "auto_switch"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.auto_switch and self.switch_step is not None:
            raise ValueError("switch_step must be unset with auto_switch: the server chooses it")
        if self.latency_target_s is not None:
            if not self.auto_switch:
                raise ValueError("latency_target_s needs auto_switch: it is what the choice of switch_step aims for")
            _check_finite("latency_target_s", self.latency_target_s, 0.0)
            if self.latency_target_s == 0:
                raise ValueError("latency_target_s must be positive, got 0")

    def with_defaults(self) -> GenerationRequest:
        """This request with a concrete switch step and seed (a fresh random one if unset)."""
        switch_step = self.switch_step
        if switch_step is None:
            switch_step = round(DEFAULT_SWITCH_FRACTION * self.num_inference_steps)
        seed = self.seed if self.seed is not None else secrets.randbelow(MAX_SEED + 1)
        return dataclasses.replace(self, switch_step=switch_step, seed=seed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> GenerationRequest:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown request field(s): {', '.join(unknown)}")
        return cls(**fields)


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def _check_finite(name: str, value: object, low: float, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
