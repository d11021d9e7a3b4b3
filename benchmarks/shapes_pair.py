"""Per-request time of the embedded shapes pair, in-process: the large model alone (k = N), the small model
alone (k = 0) and the hybrid at 40% of the steps, interleaved, medians of repeats; with the UNets' and
decoders' own times per call, so the ratios can be read against their FLOP ratios.

    .venv/bin/python benchmarks/shapes_pair.py --repeats 10 [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from hybrid_sd.pipeline import HybridPipeline
from hybrid_sd.request import GenerationRequest
from hybrid_sd.shapes_pair.evaluate import heldout_captions

try:  # run as a script, benchmarks/ is on sys.path; as ``python -m benchmarks.shapes_pair``, the root is
    from reporting import interleaved_times
except ModuleNotFoundError:
    from benchmarks.reporting import interleaved_times

STEPS = 20
RESULTS = Path(__file__).parent / "results" / "shapes_pair_{threads}threads.json"


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipeline = HybridPipeline.from_pair("shapes")
    cloud, edge = pipeline.cloud.pipe, pipeline.edge.pipe
    prompts = heldout_captions(args.repeats)
    modes = {"large only": STEPS, "hybrid 40%": round(0.4 * STEPS), "small only": 0}
    latents = torch.randn(2, 4, 16, 16)  # batch 2: classifier-free guidance
    context = torch.randn(2, cloud.tokenizer.model_max_length, cloud.unet.config.cross_attention_dim)
    timestep = torch.tensor([500, 500])
    parts = {
        "large UNet call (batch 2)": lambda: cloud.unet(latents, timestep, context),
        "small UNet call (batch 2)": lambda: edge.unet(latents, timestep, context),
        "VAE decode": lambda: cloud.vae.decode(latents[:1]),
        "tiny decode": lambda: edge.vae.decode(latents[:1]),
    }
    for k in modes.values():  # warm-up
        pipeline(GenerationRequest(prompts[0], switch_step=k, num_inference_steps=STEPS, seed=0))
    # Each round a new prompt and seed, the same for every mode.
    requests = {
        name: iter(
            [GenerationRequest(p, switch_step=k, num_inference_steps=STEPS, seed=i) for i, p in enumerate(prompts)]
        )
        for name, k in modes.items()
    }
    samples = interleaved_times({name: lambda r=r: pipeline(next(r)) for name, r in requests.items()}, args.repeats, 0)
    samples |= interleaved_times(parts, args.repeats, inner=5)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(f"shapes pair, {STEPS} steps, 64x64, {torch.get_num_threads()} threads, {args.repeats} repeats (medians)")
    print(f"{'what':<28} {'seconds':>10} {'vs large only':>14}")
    for name, value in medians.items():
        ratio = value / medians["large only"] if name in modes else None
        print(f"{name:<28} {value:>10.4f} {'' if ratio is None else f'{ratio:.2f}x':>14}")
    print(f"large/small UNet call: {medians['large UNet call (batch 2)'] / medians['small UNet call (batch 2)']:.2f}x;")
    print(f"VAE/tiny decode: {medians['VAE decode'] / medians['tiny decode']:.2f}x")
    results = Path(str(RESULTS).format(threads=torch.get_num_threads()))
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"steps": STEPS, "repeats": args.repeats, "medians_s": medians}, indent=2) + "\n")


if __name__ == "__main__":
    main()
