"""CLIP score (Hessel et al. 2021) of images against their prompts, as torchmetrics' CLIPScore defines it:
max(100 * cos(E_image, E_text), 0), in [0, 100]; here from a local transformers CLIP folder only."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from hybrid_sd.metrics.local import local_folder


class ClipScore:
    """A CLIP model and its processor, loaded once from the folder ``clip_model`` (``save_pretrained`` output,
    e.g. a local copy of openai/clip-vit-large-patch14); nothing is ever downloaded."""

    def __init__(self, clip_model: str | Path, device: str | torch.device = "cpu") -> None:
        folder = local_folder("clip_model", clip_model)
        if not (folder / "config.json").is_file():
            raise ValueError(f"clip_model: {folder} has no config.json; expected a transformers CLIP model folder")
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """The CLIP score of each image against the prompt at the same index."""
        if len(images) != len(prompts) or not images:
            raise ValueError(f"images and prompts must pair up, got {len(images)} and {len(prompts)}")
        # Prompts past the text model's context are truncated, as torchmetrics does.
        inputs = self.processor(
            text=list(prompts),
            images=[image.convert("RGB") for image in images],
            return_tensors="pt",
            padding=True,
            truncation=True,
        ).to(self.device)
        image_features = self.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text_features = self.model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).pooler_output
        cosine = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
        return (100 * cosine).clamp(min=0).tolist()
