"""A Fréchet distance between sets of shapes images (like FID), in the feature space of a small CNN trained on the
shapes dataset instead of Inception, whose features know nothing of flat coloured shapes on white."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from hybrid_sd.shapes.dataset import COLORS, SHAPE_COUNTS, SHAPES, Scene

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "feature_net.safetensors"
TRAIN_COMMAND = "python -m hybrid_sd.shapes_pair.train_features --out hybrid_sd/shapes/weights/feature_net.safetensors"
IMAGE_SIZE = 64  # the side the net was trained at; other sizes are resized to it
FEATURE_DIM = 96
WIDTHS = (16, 32, 64, FEATURE_DIM)
LOOKS = [(kind, color) for kind in SHAPES for color in COLORS]  # one presence logit per (kind, colour)


class ShapesFeatureNet(nn.Module):
    """Four conv blocks and global average pooling to a 96-dim feature; the presence and count heads only train it."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i, width in enumerate(WIDTHS):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            if i < len(WIDTHS) - 1:  # 64 -> 8 pixels: the last block sees 38 pixels, more than a large shape
                layers.append(nn.MaxPool2d(2))
            channels = width
        self.body = nn.Sequential(*layers)
        self.presence = nn.Linear(FEATURE_DIM, len(LOOKS))
        self.count = nn.Linear(FEATURE_DIM, len(SHAPE_COUNTS))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The (N, FEATURE_DIM) features of a batch of images in [0, 1], shaped (N, 3, H, W)."""
        return self.body(x * 2 - 1).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Presence logits per (kind, colour) and logits over the shape count, for training and its check."""
        feats = self.embed(x)
        return self.presence(feats), self.count(feats)


def presence_target(scene: Scene) -> np.ndarray:
    """The multi-hot vector over LOOKS of the (kind, colour) pairs in a scene."""
    target = np.zeros(len(LOOKS), dtype=np.float32)
    for shape in scene.shapes:
        target[LOOKS.index((shape.kind, shape.color))] = 1
    return target


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """A (N, 3, IMAGE_SIZE, IMAGE_SIZE) float tensor in [0, 1] of RGB images, resized where they differ in size."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            # Box filtering averages a large generated image down much as the dataset's supersampling does.
            image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
        arrays.append(np.asarray(image, dtype=np.float32))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255


def load_feature_net(path: str | Path = DEFAULT_WEIGHTS) -> ShapesFeatureNet:
    """The feature net with the weights at `path`, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no shapes feature-net weights at {path}; train them with `{TRAIN_COMMAND}`")
    net = ShapesFeatureNet()
    net.load_state_dict(load_file(path))
    return net.eval()


@torch.no_grad()
def features(images: Sequence[Image.Image], net: ShapesFeatureNet, batch_size: int = 256) -> np.ndarray:
    """The (N, FEATURE_DIM) float64 features of `images`."""
    batches = [net.embed(to_tensor(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat(batches).double().numpy()


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """The square root of a symmetric positive semi-definite matrix."""
    values, vectors = np.linalg.eigh(matrix)
    # Rounding leaves eigenvalues of a singular covariance slightly negative.
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(real: np.ndarray, generated: np.ndarray) -> float:
    """The Fréchet distance between Gaussians fitted to two (N, D) feature sets."""
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(f"need two (N, D) feature sets of the same D, got {real.shape} and {generated.shape}")
    if len(real) < 2 or len(generated) < 2:
        raise ValueError("need at least two samples in each feature set to estimate a covariance")
    mu1, mu2 = real.mean(axis=0), generated.mean(axis=0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(generated, rowvar=False)
    # Tr sqrt(S1 S2) = Tr sqrt(sqrt(S1) S2 sqrt(S1)), whose argument is symmetric PSD, so eigh applies (no scipy).
    root1 = _sqrt_psd(s1)
    inner = root1 @ s2 @ root1
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    distance = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)
    return max(distance, 0.0)  # identical sets give rounding-level negatives


def shapes_fid(
    real_images: Sequence[Image.Image], generated_images: Sequence[Image.Image], net: ShapesFeatureNet
) -> float:
    """The Fréchet distance between real and generated images in the feature net's space."""
    return frechet_distance(features(real_images, net), features(generated_images, net))
