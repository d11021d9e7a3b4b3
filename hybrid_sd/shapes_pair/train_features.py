"""Train the shapes feature net on (kind, colour) presence and shape count, on images rendered on the fly."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from hybrid_sd.shapes.dataset import SHAPE_COUNTS, ShapesDataset, render
from hybrid_sd.shapes.features import (
    DEFAULT_WEIGHTS,
    FEATURE_DIM,
    WIDTHS,
    ShapesFeatureNet,
    presence_target,
    to_tensor,
)

HELDOUT_SEED = 1000  # far from the training seed and from the seeds the tests sample
HELDOUT_IMAGES = 1000


def batch(dataset: ShapesDataset, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, presence targets and count classes of items [start, start + size) of `dataset`."""
    scenes = [dataset.scene(i) for i in range(start, start + size)]
    presence = torch.from_numpy(np.stack([presence_target(scene) for scene in scenes]))
    counts = torch.tensor([SHAPE_COUNTS.index(len(scene.shapes)) for scene in scenes])
    return to_tensor([render(scene) for scene in scenes]), presence, counts


@torch.no_grad()
def evaluate(net: ShapesFeatureNet, seed: int, images: int) -> dict[str, float]:
    """Exact-set and per-label presence accuracy and count accuracy on `images` fresh images of `seed`."""
    net.eval()
    x, presence, counts = batch(ShapesDataset(images, seed=seed), 0, images)
    presence_logits, count_logits = net(x)
    predicted = (presence_logits > 0).float()
    return {
        "presence_exact": float((predicted == presence).all(dim=1).float().mean()),
        "presence_label": float((predicted == presence).float().mean()),
        "count": float((count_logits.argmax(dim=1) == counts).float().mean()),
    }


def train(out_path: str | Path, steps: int = 2000, batch_size: int = 64, seed: int = 0, lr: float = 3e-3) -> dict:
    """Train a feature net, save it to `out_path` (safetensors) with a JSON sidecar, and return the sidecar."""
    torch.manual_seed(seed)
    net = ShapesFeatureNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    # Cosine decay lets the late steps settle instead of bouncing at the full learning rate.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    dataset = ShapesDataset(steps * batch_size, seed=seed)  # every step sees new images
    presence_loss, count_loss = nn.BCEWithLogitsLoss(), nn.CrossEntropyLoss()
    started = time.monotonic()
    net.train()
    progress = tqdm(range(steps), desc="train feature net")
    for step in progress:
        x, presence, counts = batch(dataset, step * batch_size, batch_size)
        presence_logits, count_logits = net(x)
        loss = presence_loss(presence_logits, presence) + count_loss(count_logits, counts)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
    train_seconds = time.monotonic() - started
    heldout = evaluate(net, HELDOUT_SEED, HELDOUT_IMAGES)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in net.state_dict().items()}, out_path)
    sidecar = {
        "config": {
            "steps": steps,
            "batch_size": batch_size,
            "seed": seed,
            "lr": lr,
            "widths": list(WIDTHS),
            "feature_dim": FEATURE_DIM,
        },
        "heldout": {"seed": HELDOUT_SEED, "images": HELDOUT_IMAGES, **heldout},
        "train_seconds": round(train_seconds, 1),
    }
    out_path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    print(json.dumps(sidecar["heldout"]))
    return sidecar


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train(args.out, args.steps, args.batch_size, args.seed)


if __name__ == "__main__":
    main()
