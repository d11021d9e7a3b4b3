"""The data every training stage of the shapes pair reads: rendered scenes as image tensors, and captions as
token ids."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from hybrid_sd.shapes.dataset import Scene, ShapesDataset, render


def render_scenes(scenes: list[Scene], desc: str | None = None) -> torch.Tensor:
    """The scenes' images as uint8 [N, 3, H, W] (with a progress bar where ``desc`` names it)."""
    images = [np.asarray(render(scene)) for scene in tqdm(scenes, desc=desc, disable=desc is None)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def dataset_scenes(count: int, seed: int) -> list[Scene]:
    """The first ``count`` scenes of the shapes dataset of ``seed``."""
    dataset = ShapesDataset(count, seed=seed)
    return [dataset.scene(index) for index in range(count)]


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def caption_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids as the pipelines make them: padded to the tokenizer's maximum length."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
