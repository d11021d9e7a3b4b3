"""In-process hybrid generation: the one orchestration with both halves in this process."""

from __future__ import annotations

import asyncio

import torch

from hybrid_sd.halves import LocalCloud, LocalEdge
from hybrid_sd.lane import ProgressCallback
from hybrid_sd.orchestrate import generate
from hybrid_sd.pairs import ModelPair, load_pair, preset
from hybrid_sd.presets import DEFAULT_PAIR, PairSpec
from hybrid_sd.request import GenerationRequest
from hybrid_sd.results import GenerationResult


class HybridPipeline:
    """A cloud and an edge :class:`~hybrid_sd.denoiser.Denoiser` in one process, composed by
    :func:`hybrid_sd.orchestrate.generate` as a server composes them, handing over through the same
    bytes (lean by the same rule)."""

    def __init__(self, pair: ModelPair):
        self.cloud = pair.cloud
        self.edge = pair.edge
        self._cloud_half = LocalCloud(pair.cloud)
        self._edge_half = LocalEdge(pair.edge)

    @classmethod
    def from_pair(
        cls, pair: str | PairSpec = DEFAULT_PAIR, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> HybridPipeline:
        spec = preset(pair) if isinstance(pair, str) else pair
        return cls(load_pair(spec, device, dtype))

    def check_inputs(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` validated and resolved as :meth:`__call__` resolves it: switch step and seed,
        then size and scheduler from the edge model (see ``EdgeProfile.fill``), checked against both."""
        request.check()
        profile = asyncio.run(self._edge_half.describe())
        request = self.cloud.resolve(profile.fill(request.with_defaults()))
        self.edge.check_size(request)
        return request

    def __call__(self, request: GenerationRequest, on_progress: ProgressCallback | None = None) -> GenerationResult:
        """Generate one image; ``on_progress`` hears of every UNet evaluation on either side."""
        return asyncio.run(generate(request, self._cloud_half, self._edge_half, on_progress=on_progress))
