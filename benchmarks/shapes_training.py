"""Training throughput of the shapes pair's large stage (text encoder + large UNet, one optimiser step on
random latents): samples per second for float32 against bfloat16 autocast, channels-last memory format and
batch sizes, interleaved, medians. What ``hybrid-sd train-shapes --precision`` and ``--batch-size`` are
chosen from.

    .venv/bin/python benchmarks/shapes_training.py [--repeats 5] [--steps 4] [--batch-sizes 32,64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reporting import interleaved_times, print_table  # noqa: E402
from hybrid_sd.shapes_pair import pair_models  # noqa: E402
from hybrid_sd.shapes_pair.train_config import TrainConfig  # noqa: E402


def large_stage_step(batch_size: int, precision: str, channels_last: bool):
    """One optimiser step of the large stage on fixed random inputs, as a callable."""
    torch.manual_seed(0)
    tokenizer = pair_models.build_tokenizer()
    text_encoder = pair_models.build_text_encoder(TrainConfig.text_encoder, len(tokenizer)).train()
    unet = pair_models.build_large_unet().train()
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    parameters = [*text_encoder.parameters(), *unet.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    shape = (batch_size, pair_models.LATENT_CHANNELS, pair_models.LATENT_SIZE, pair_models.LATENT_SIZE)
    latents, noise = torch.randn(shape), torch.randn(shape)
    if channels_last:
        latents = latents.to(memory_format=torch.channels_last)
    ids = torch.randint(0, len(tokenizer), (batch_size, pair_models.MAX_TOKENS))
    timesteps = torch.randint(0, 1000, (batch_size,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            prediction = unet(latents, timesteps, text_encoder(ids)[0]).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="optimiser steps per timing")
    parser.add_argument("--batch-sizes", default="32,64")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/shapes_training.json"))
    args = parser.parse_args()
    variants = {
        (batch_size, precision, channels_last): large_stage_step(batch_size, precision, channels_last)
        for batch_size in map(int, args.batch_sizes.split(","))
        for precision in ("fp32", "bf16")
        for channels_last in (False, True)
    }
    times = interleaved_times(
        {str(key): step for key, step in variants.items()}, args.repeats, warmup=1, inner=args.steps
    )
    baseline = next(key for key in variants if key[1] == "fp32" and not key[2])
    baseline_rate = baseline[0] / statistics.median(times[str(baseline)])
    rows = []
    for key in variants:
        seconds = statistics.median(times[str(key)])
        rate = key[0] / seconds
        rows.append(
            {
                "stage": "large (text encoder + large UNet)",
                "batch_size": key[0],
                "precision": key[1],
                "channels_last": key[2],
                "step_s": seconds,
                "samples_per_s": rate,
                "speedup": rate / baseline_rate,
            }
        )
    print_table(
        f"shapes pair, large stage, {torch.get_num_threads()} threads, median of {args.repeats}",
        ("batch", "precision", "channels-last", "step s", "samples/s", "vs fp32 batch " + str(baseline[0])),
        [
            (r["batch_size"], r["precision"], r["channels_last"], r["step_s"], r["samples_per_s"], r["speedup"])
            for r in rows
        ],
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
