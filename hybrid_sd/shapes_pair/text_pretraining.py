"""Contrastive pretraining of the shapes pair's text encoder, CLIP's way, before the large UNet trains on it
frozen (as Stable Diffusion's UNet trains on a frozen CLIP). The encoder's pooled output is trained against a
small image tower on the training images, and each image is also scored against hard negatives, its caption
with the relation or two shapes' colours swapped (NegCLIP, Yuksekgonul et al., 2023): CLIP left to itself
reads captions as bags of words, and an encoder that does cannot tell the UNet where things go or which colour
is whose. The image tower and projections are thrown away after the stage.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from hybrid_sd.shapes.dataset import Scene, caption
from hybrid_sd.shapes_pair import pair_models
from hybrid_sd.shapes_pair.training_data import caption_ids, dataset_scenes, render_scenes, to_unit
from hybrid_sd.shapes_pair.training_loop import batch_at

if TYPE_CHECKING:
    from hybrid_sd.shapes_pair.train_pair import Run

BATCH_SIZE = 128  # images a step; contrastive losses want many negatives, and this encoder is cheap
EMBEDDING_WIDTH = 128
HELDOUT_SEED = 12_345  # held-out scenes the stage's accuracy is measured on (the training images use config.seed)
HELDOUT_SCENES = 1000
SWAPPED_RELATION = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}


def relation_swapped(scene: Scene) -> str | None:
    """The caption with the relation reversed ("above" for "below"); None for a scene without one."""
    if scene.relation is None:
        return None
    return caption(dataclasses.replace(scene, relation=SWAPPED_RELATION[scene.relation]))


def colours_swapped(scene: Scene) -> str | None:
    """The caption with the first two shapes' colours exchanged; None for one shape or two of one colour."""
    if len(scene.shapes) < 2 or scene.shapes[0].color == scene.shapes[1].color:
        return None
    first, second, *rest = scene.shapes
    shapes = (
        dataclasses.replace(first, color=second.color),
        dataclasses.replace(second, color=first.color),
        *rest,
    )
    return caption(dataclasses.replace(scene, shapes=shapes))


HARD_NEGATIVES = {"relation": relation_swapped, "colour": colours_swapped}


class ImageTower(nn.Module):
    """64x64 images to an embedding; flattened rather than pooled, so that where a shape stands survives."""

    def __init__(self, width: int = EMBEDDING_WIDTH):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(128, 32, 1),
            nn.Flatten(),
            nn.Linear(32 * (pair_models.IMAGE_SIZE // 8) ** 2, 256),
            nn.GELU(),
            nn.Linear(256, width),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class ContrastiveModel(nn.Module):
    """The text encoder, a projection of its pooled (end-token) output, the image tower and CLIP's learnt
    temperature (initialised to 1/0.07, at most 100)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder
        self.text_projection = nn.Linear(pair_models.TEXT_WIDTH, EMBEDDING_WIDTH, bias=False)
        self.image_tower = ImageTower()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def embed_texts(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projection(self.text_encoder(ids).pooler_output).float(), dim=-1)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_tower(images).float(), dim=-1)

    def loss(self, images: torch.Tensor, ids: torch.Tensor, negative_ids: torch.Tensor) -> torch.Tensor:
        """InfoNCE both ways over the batch's images and captions; the images also against ``negative_ids``."""
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
        image_embeddings = self.embed_images(images)
        text_embeddings = self.embed_texts(torch.cat([ids, negative_ids]))
        logits = scale * image_embeddings @ text_embeddings.T
        targets = torch.arange(len(images), device=images.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits[:, : len(images)].T, targets)) / 2


def negatives(scenes: list[Scene]) -> list[str]:
    """Every hard negative of ``scenes``, in order."""
    return [text for scene in scenes for swap in HARD_NEGATIVES.values() if (text := swap(scene)) is not None]


@torch.no_grad()
def heldout_accuracy(model: ContrastiveModel, tokenizer, device: torch.device) -> dict[str, float]:
    """For each kind of hard negative, the share of held-out scenes that have one whose image scores its true
    caption above it."""
    scenes = dataset_scenes(HELDOUT_SCENES, HELDOUT_SEED)
    image_embeddings = model.embed_images(to_unit(render_scenes(scenes)).to(device))
    true_embeddings = model.embed_texts(caption_ids(tokenizer, [caption(scene) for scene in scenes]).to(device))
    true_scores = (image_embeddings * true_embeddings).sum(-1)
    accuracy = {}
    for kind, swap in HARD_NEGATIVES.items():
        swapped = {index: text for index, scene in enumerate(scenes) if (text := swap(scene)) is not None}
        rows = list(swapped)
        swapped_embeddings = model.embed_texts(caption_ids(tokenizer, list(swapped.values())).to(device))
        swapped_scores = (image_embeddings[rows] * swapped_embeddings).sum(-1)
        accuracy[kind] = round(float((true_scores[rows] > swapped_scores).float().mean()), 4)
    return accuracy


def pretrain_text_encoder(
    run: Run, images: torch.Tensor, scenes: list[Scene], ids: torch.Tensor, tokenizer, text_encoder
) -> dict:
    """``run.config.text_steps`` contrastive steps of ``text_encoder`` on the training images, their captions'
    token ids ``ids`` and their scenes (for the hard negatives); the stage's statistics with the held-out
    hard-negative accuracy."""
    config, seed, device = run.config, run.config.seed + 4, run.device
    torch.manual_seed(seed)
    model = ContrastiveModel(text_encoder).to(device).train()
    batch_size = min(BATCH_SIZE, len(images))

    def loss_fn(step: int) -> torch.Tensor:
        index = batch_at(len(images), batch_size, step, seed)
        negative_ids = caption_ids(tokenizer, negatives([scenes[i] for i in index.tolist()]))
        with run.autocast():
            return model.loss(to_unit(images[index]).to(device), ids[index].to(device), negative_ids.to(device))

    stats = run.stage("text", config.text_steps, loss_fn, model, config.text_lr, ema=False, batch_size=batch_size)
    model.eval()
    return {**stats, "heldout_accuracy": heldout_accuracy(model, tokenizer, device), "heldout_scenes": HELDOUT_SCENES}
