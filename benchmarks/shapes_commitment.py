"""How much of its final image a shapes pair's large model has committed to by the switch step: the adherence of
its data prediction after k of N steps (what the latents it would hand over already say, decoded by its full VAE)
against the adherence of its finished image, on the held-out captions. A hybrid at k can recover no more of the
gap than the large model has decided by then; a model that decides late leaves the edge to decide.

Rows per pair: the pair's own timestep spacing, then each ``--powers`` p as custom timesteps
t_i = 999 (1 - i/N)^p, which spend fewer steps at high noise (p = 1 is uniform trailing spacing).

    .venv/bin/python benchmarks/shapes_commitment.py --pairs hybrid_sd/shapes/pair,out/pair-ct/trained --powers 1.5,2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler
from reporting import print_table
from tqdm import tqdm

from hybrid_sd.pairs import load_pipeline
from hybrid_sd.request import DEFAULT_SWITCH_FRACTION
from hybrid_sd.schedulers import power_timesteps
from hybrid_sd.shapes.adherence import score_batch
from hybrid_sd.shapes_pair.evaluate import diffusers_large_alone, heldout_captions
from hybrid_sd.shapes_pair.pair_models import GUIDANCE_SCALE

RESULTS = Path(__file__).parent / "results" / "shapes_commitment.json"
SHOWN = ("color", "relation", "overall")


def commitment(pipe, captions: list[str], steps: int, switch: int, seed: int, timesteps: list[int] | None) -> dict:
    """Adherence of the data prediction after ``switch`` steps and of the final image, and the timestep the
    switch falls on."""
    scheduler = pipe.scheduler
    if not (isinstance(scheduler, DPMSolverMultistepScheduler) and scheduler.config.algorithm_type == "dpmsolver++"):
        raise ValueError(f"needs DPM-Solver++ (its history holds data predictions), got {type(scheduler).__name__}")
    predicted = []

    def keep_prediction(pipe, index, timestep, kwargs):
        if index + 1 == switch:
            latents = scheduler.model_outputs[-1] / pipe.vae.config.scaling_factor
            predicted.extend(pipe.image_processor.postprocess(pipe.vae.decode(latents).sample, output_type="pil"))
        return kwargs

    final = diffusers_large_alone(
        pipe, captions, steps, GUIDANCE_SCALE, seed, timesteps=timesteps, callback_on_step_end=keep_prediction
    )
    return {
        "switch_timestep": int(scheduler.timesteps[switch]),
        "at_switch": score_batch(predicted, captions),
        "final": score_batch(final, captions),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", default="hybrid_sd/shapes/pair", help="comma-separated folders holding cloud/")
    parser.add_argument("--powers", default="1.5,2", help="comma-separated spacing powers p (besides the pair's own)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--switch", type=int, help="the switch step k (default: 40%% of the steps)")
    parser.add_argument("--prompts", type=int, default=64, help="held-out captions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    switch = round(DEFAULT_SWITCH_FRACTION * args.steps) if args.switch is None else args.switch
    captions = heldout_captions(args.prompts)
    spacings: list[tuple[str, list[int] | None]] = [("pair's", None)]
    spacings += [(f"power {p}", power_timesteps(args.steps, float(p))) for p in args.powers.split(",") if p]
    rows = []
    for folder in args.pairs.split(","):
        pipe = load_pipeline(str(Path(folder) / "cloud"), torch.float32)
        for name, timesteps in tqdm(spacings, desc=folder):
            measured = commitment(pipe, captions, args.steps, switch, args.seed, timesteps)
            rows.append({"pair": folder, "spacing": name, "timesteps": timesteps, **measured})
    header = ["pair", "spacing", f"t at k={switch}"]
    header += [f"{name} at k" for name in SHOWN] + [f"{name} final" for name in SHOWN] + ["committed"]
    print_table(
        f"large model alone, data prediction after {switch} of {args.steps} DPM-Solver++ steps (full VAE),"
        f" {args.prompts} held-out captions, seed {args.seed}, guidance {GUIDANCE_SCALE}",
        header,
        [
            [row["pair"], row["spacing"], row["switch_timestep"]]
            + [row["at_switch"][name] for name in SHOWN]
            + [row["final"][name] for name in SHOWN]
            + [row["at_switch"]["overall"] / row["final"]["overall"]]
            for row in rows
        ],
    )
    RESULTS.parent.mkdir(exist_ok=True)
    record = {"steps": args.steps, "switch": switch, "prompts": args.prompts, "seed": args.seed, "rows": rows}
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
