"""Adherence and FD of the shipped shapes pair's large model alone against the guidance scale: diffusers' own
``StableDiffusionPipeline`` with the full VAE at the pair's timestep spacing, on the held-out captions, one row
per (guidance, seed). It is the measurement behind the pair's guidance scale
(``hybrid_sd.shapes_pair.pair_models.GUIDANCE_SCALE``).

    .venv/bin/python benchmarks/shapes_guidance.py --guidance 2,3,5,7.5,10 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from hybrid_sd.pairs import embedded_spec, load_pipeline
from hybrid_sd.presets import EMBEDDED_PRESETS
from hybrid_sd.schedulers import pipeline_timesteps
from hybrid_sd.shapes_pair.evaluate import HeldoutSet, diffusers_large_alone

STEPS = 20
RESULTS = Path(__file__).parent / "results" / "shapes_guidance.json"
COLUMNS = ("count", "color", "shape", "size", "relation", "overall")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--guidance", default="2,3,5,7.5,10", help="comma-separated guidance scales")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated image seeds")
    parser.add_argument("--prompts", type=int, default=64, help="held-out captions")
    parser.add_argument("--pair", type=Path, default=EMBEDDED_PRESETS["shapes"], help="a shapes pair folder")
    args = parser.parse_args()
    scales = [float(value) for value in args.guidance.split(",")]
    seeds = [int(value) for value in args.seeds.split(",")]
    heldout = HeldoutSet(args.prompts)
    cloud = load_pipeline(str(args.pair / "cloud"), torch.float32)
    spacing = pipeline_timesteps(cloud.scheduler, STEPS, embedded_spec(args.pair).timestep_power)  # the pair's
    rows = []
    for scale, seed in tqdm([(scale, seed) for scale in scales for seed in seeds], desc="guidance x seed"):
        scores = heldout.score(diffusers_large_alone(cloud, heldout.captions, STEPS, scale, seed, **spacing))
        rows.append({"guidance": scale, "seed": seed, **scores["adherence"], "fd": scores["frechet_distance"]})
    print(f"{args.pair}, large model alone (diffusers, full VAE), {args.prompts} held-out captions, {STEPS} steps")
    print("guidance | " + " | ".join(COLUMNS) + " | FD   (means over seeds " + args.seeds + ")")
    for scale in scales:
        mine = [row for row in rows if row["guidance"] == scale]
        means = [statistics.mean(row[name] for row in mine) for name in (*COLUMNS, "fd")]
        print(f"{scale:8} | " + " | ".join(f"{value:.3f}" for value in means[:-1]) + f" | {means[-1]:.1f}")
    RESULTS.parent.mkdir(exist_ok=True)
    record = {"pair": str(args.pair), "steps": STEPS, "prompts": args.prompts, "rows": rows}
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
