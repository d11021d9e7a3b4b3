"""LPIPS (Zhang et al. 2018) with the AlexNet backbone, as torchmetrics' LearnedPerceptualImagePatchSimilarity
computes it, without torchvision.

torchmetrics builds the backbone with torchvision, which downloads its ImageNet weights and whose PyPI
builds cannot load next to a CPU torch. Here the backbone is torchvision's ``alexnet().features``
rebuilt layer for layer, its weights read from the user's local copy of torchvision's checkpoint
(``alexnet-owt-7be5be79.pth``); the LPIPS linear heads are the ones torchmetrics ships (``lpips_models/alex.pth``).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from hybrid_sd.metrics.images import to_float
from hybrid_sd.metrics.local import load_into, load_state_dict

# LPIPS takes the ReLU outputs after these layers of alexnet().features.
TAPS = (1, 4, 7, 9, 11)
CHANNELS = (64, 192, 384, 256, 256)
# The ImageNet normalisation LPIPS applies to inputs in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def alexnet_features() -> nn.Sequential:
    """torchvision's ``alexnet().features``: same layers, same indices, so its state dict keys load."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(),
    )


class Lpips(nn.Module):
    """LPIPS distance between images: 0 for identical ones, larger for perceptually further ones."""

    def __init__(self) -> None:
        super().__init__()
        self.features = alexnet_features()
        self.lins = nn.ModuleList(nn.Conv2d(channels, 1, kernel_size=1, bias=False) for channels in CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, lpips_weights: str | Path) -> Lpips:
        """LPIPS on the AlexNet backbone in torchvision's checkpoint file ``lpips_weights`` (its
        ``classifier.*`` is not used) and torchmetrics' shipped linear heads."""
        backbone = load_state_dict("lpips_weights", lpips_weights)
        backbone = {
            key.removeprefix("features."): value for key, value in backbone.items() if key.startswith("features.")
        }
        lpips = cls()
        load_into(lpips.features, backbone, "lpips_weights", lpips_weights)
        heads = files("torchmetrics.functional.image") / "lpips_models" / "alex.pth"
        state = torch.load(heads, map_location="cpu", weights_only=True)
        for index, lin in enumerate(lpips.lins):
            lin.weight.copy_(state[f"lin{index}.model.1.weight"])
        return lpips

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The unit-normalised (over channels) activations at ``TAPS``."""
        taps = []
        for index, layer in enumerate(self.features[: TAPS[-1] + 1]):
            x = layer(x)
            if index in TAPS:
                taps.append(x / torch.sqrt(1e-8 + (x**2).sum(dim=1, keepdim=True)))
        return taps

    def forward(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """Per-pair distances (N,) of float images (N, 3, H, W) in [0, 1]."""
        taps = self._taps((2 * images - 1 - self.shift) / self.scale)
        reference_taps = self._taps((2 * references - 1 - self.shift) / self.scale)
        distances = [
            lin((tap - reference) ** 2).mean(dim=(2, 3))
            for lin, tap, reference in zip(self.lins, taps, reference_taps, strict=True)
        ]
        return torch.stack(distances).sum(dim=0).flatten()

    def score(self, images: Sequence[Image.Image], references: Sequence[Image.Image]) -> list[float]:
        """LPIPS of each image against the reference at the same index."""
        if len(images) != len(references):
            raise ValueError(f"images and references must pair up, got {len(images)} and {len(references)}")
        return self(to_float(images, "images"), to_float(references, "references")).tolist()
