"""Scheduler aliases and the classes the engine hands over exactly (data only, no imports)."""

from __future__ import annotations

from typing import Any

# alias -> (diffusers class name, config overrides). "dpm++sde" names the stochastic DPM-Solver++
# variant: the multistep SDE solver, whose noise comes from the request's generator.
SCHEDULER_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "deis": ("DEISMultistepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}

# Classes whose whole state is plain tensors and numbers, verified bit-exact across a handoff by
# tests/test_exact_split.py. Anything else is refused rather than run approximately.
EXACT_HANDOFF_SCHEDULERS = frozenset(name for name, _ in SCHEDULER_ALIASES.values())

# Why some well-known schedulers are refused, for the error message.
REFUSAL_REASONS = {
    "DPMSolverSDEScheduler": "its noise comes from a torchsde Brownian tree whose state cannot be "
    "carried over the wire; use 'dpm++2m-sde'",
    "HeunDiscreteScheduler": "a second-order step spans two UNet evaluations, so a switch can fall inside one step",
    "KDPM2DiscreteScheduler": "a second-order step spans two UNet evaluations",
    "KDPM2AncestralDiscreteScheduler": "a second-order step spans two UNet evaluations",
    "LMSDiscreteScheduler": "its coefficients need scipy and have not been verified for handoff",
}
