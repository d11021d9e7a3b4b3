"""hybrid-sd: edge-cloud collaborative diffusion with an exact split between a large and a small model."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hybrid_sd.pipeline import HybridPipeline
    from hybrid_sd.request import GenerationRequest
    from hybrid_sd.results import GenerationResult
    from hybrid_sd.state import HybridState

# Imported on first use (PEP 562), so that the command line answers --help and argument errors
# without loading torch and diffusers.
_EXPORTS = {
    "GenerationRequest": "hybrid_sd.request",
    "GenerationResult": "hybrid_sd.results",
    "HybridPipeline": "hybrid_sd.pipeline",
    "HybridState": "hybrid_sd.state",
}
__all__ = ["GenerationRequest", "GenerationResult", "HybridPipeline", "HybridState"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hybrid_sd' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
