"""Fréchet Inception Distance (Heusel et al. 2017) with torchmetrics' FrechetInceptionDistance."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance

from hybrid_sd.metrics.images import to_uint8
from hybrid_sd.metrics.inception import FIDInceptionV3

BATCH_SIZE = 32


def load_fid(fid_weights: str | Path, feature: int = 2048) -> FrechetInceptionDistance:
    """A FrechetInceptionDistance on the Inception weights in the file ``fid_weights`` (torch-fidelity's
    ``weights-inception-2015-12-05-6726825d.pth``) and its ``feature``-channel layer (2048: standard FID);
    update it with uint8 (N, 3, H, W) batches."""
    return FrechetInceptionDistance(feature=FIDInceptionV3.from_file(fid_weights, feature))


def frechet_inception_distance(
    real: Sequence[Image.Image], generated: Sequence[Image.Image], fid_weights: str | Path, feature: int = 2048
) -> float:
    """FID between two sets of images, each of at least two images of one size."""
    for name, images in (("real", real), ("generated", generated)):
        if len(images) < 2:
            raise ValueError(f"{name} must hold at least two images for FID, got {len(images)}")
    metric = load_fid(fid_weights, feature)
    for images, is_real in ((real, True), (generated, False)):
        for start in range(0, len(images), BATCH_SIZE):
            batch = images[start : start + BATCH_SIZE]
            metric.update(to_uint8(batch, "real" if is_real else "generated"), real=is_real)
    return float(metric.compute())
