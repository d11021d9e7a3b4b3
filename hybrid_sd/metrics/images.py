"""PIL images to the tensors torchmetrics takes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def to_uint8(images: Sequence[Image.Image], argument: str) -> torch.Tensor:
    """RGB images of one size as a uint8 tensor (N, 3, H, W); ``argument`` names them in errors."""
    if not images:
        raise ValueError(f"{argument} must hold at least one image")
    arrays = [np.asarray(image.convert("RGB")) for image in images]
    sizes = {array.shape for array in arrays}
    if len(sizes) > 1:
        raise ValueError(f"{argument}: images must share one size, got {sorted(sizes)}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def to_float(images: Sequence[Image.Image], argument: str) -> torch.Tensor:
    """RGB images of one size as a float32 tensor (N, 3, H, W) in [0, 1]."""
    return to_uint8(images, argument).float() / 255
