"""Does a shapes pair's large model place its shapes where the caption says, or where the seed says? The large
model alone (diffusers' own pipeline, full VAE) draws the same two shapes under each of the four relations, seed
by seed. A model that reads the layout out of its starting noise draws one layout per seed whatever the relation:
the shipped pair, trained on Stable Diffusion's noise schedule, does for 93% of them (``TrainConfig.schedule``).
Then the README's first prompt as ``cluster up --generate`` draws it (the hybrid at the default request), seeds
0 to 9: how many are right in every attribute by the scorer; for a folder without an edge (``train-shapes
--cloud-only``), as the large model alone draws it at that request. And in seconds, why: how far one word of
the README prompt moves the text encoder's output and the large UNet's prediction of the image (see
``caption_sensitivity``).

    .venv/bin/python benchmarks/shapes_layout.py --pairs hybrid_sd/shapes/pair,out/pair-v3/pair --seeds 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from tqdm import tqdm

from hybrid_sd.pairs import embedded_spec, load_pipeline
from hybrid_sd.pipeline import HybridPipeline
from hybrid_sd.presets import PairSpec
from hybrid_sd.request import DEFAULT_SWITCH_FRACTION, GenerationRequest
from hybrid_sd.schedulers import pipeline_timesteps
from hybrid_sd.shapes.adherence import centroids_in_relation, detect, score
from hybrid_sd.shapes.dataset import RELATIONS
from hybrid_sd.shapes_pair.evaluate import ATTRIBUTES, diffusers_large_alone
from hybrid_sd.shapes_pair.pair_models import GUIDANCE_SCALE

STEPS = 20
README_PROMPT = "a large red circle above a small blue square"
README_SEEDS = 10
RESULTS = Path(__file__).parent / "results" / "shapes_layout.json"
# One word of README_PROMPT swapped per attribute, for caption_sensitivity.
SWAPS = {
    "relation": ("above", "below"),
    "colour": ("red", "green"),
    "shape": ("circle", "square"),
    "size": ("large", "small"),
}
NOISE_LEVELS = (999, 500)  # timesteps at which the UNet's prediction is compared: the layout's and the details'
# (first shape, second shape): distinct colours, so that each is found by its colour alone.
SCENES = (
    (("large", "red", "circle"), ("small", "blue", "square")),
    (("small", "green", "triangle"), ("large", "yellow", "diamond")),
    (("large", "purple", "square"), ("small", "black", "circle")),
    (("small", "blue", "diamond"), ("large", "red", "triangle")),
)


def placement(image, first_color: str, second_color: str) -> tuple[bool, ...] | None:
    """Which relations the first shape stands in to the second (in RELATIONS' order), by the scorer's rule;
    None unless both are found."""
    found = {detection.color: detection for detection in detect(image)}
    if first_color not in found or second_color not in found:
        return None
    return tuple(centroids_in_relation(found[first_color], found[second_color], relation) for relation in RELATIONS)


def measure(pair: Path, seeds: int, guidance: float) -> dict:
    """Per relation, how often the layout holds it; and how often a seed gives one layout for all four."""
    cloud = load_pipeline(str(pair / "cloud"), torch.float32)
    spec = embedded_spec(pair)
    spacing = pipeline_timesteps(cloud.scheduler, STEPS, spec.timestep_power)  # the pair's
    cases = [(scene, relation) for scene in SCENES for relation in RELATIONS]
    captions = [f"a {' '.join(first)} {relation} a {' '.join(second)}" for (first, second), relation in cases]
    placements: dict[tuple[int, int], tuple[bool, ...] | None] = {}
    for seed in tqdm(range(seeds), desc=f"{pair} seeds"):
        images = diffusers_large_alone(cloud, captions, STEPS, guidance, seed, **spacing)
        for case, (((first, second), _), image) in enumerate(zip(cases, images, strict=True)):
            placements[case, seed] = placement(image, first[1], second[1])
    per_relation = {}
    for index, relation in enumerate(RELATIONS):
        found = [
            where[index] for (case, _), where in placements.items() if cases[case][1] == relation and where is not None
        ]
        per_relation[relation] = sum(found) / len(found) if found else None
    one_layout = []
    for scene_index in range(len(SCENES)):
        for seed in range(seeds):
            layouts = [placements[scene_index * len(RELATIONS) + r, seed] for r in range(len(RELATIONS))]
            if None not in layouts:
                one_layout.append(len(set(layouts)) == 1)
    return {
        "pair": str(pair),
        "caption_sensitivity": caption_sensitivity(cloud),
        "readme_prompt": readme_prompt(spec, cloud, guidance),
        "relation_holds": per_relation,
        "same_layout_for_every_relation": sum(one_layout) / len(one_layout) if one_layout else None,
        "both_found": sum(where is not None for where in placements.values()) / len(placements),
    }


def caption_sensitivity(cloud, samples: int = 64) -> dict:
    """Per attribute, README_PROMPT against it with that attribute's word swapped: the distance between the text
    encoder's outputs (mean over tokens) and the RMS change of the UNet's image prediction (the predicted
    latents) on the same pure noise at each of NOISE_LEVELS. A model that reads an attribute moves with it."""

    def encoded(caption: str) -> torch.Tensor:
        return cloud.encode_prompt(caption, "cpu", 1, False)[0]

    config = cloud.unet.config
    noise = torch.randn(
        samples, config.in_channels, config.sample_size, config.sample_size, generator=torch.Generator().manual_seed(0)
    )
    alphas = cloud.scheduler.alphas_cumprod
    v_prediction = cloud.scheduler.config.prediction_type == "v_prediction"
    base = encoded(README_PROMPT)
    # Noise alone, no image under it: what the caption alone makes the UNet predict at each level.
    latents = {t: (1 - alphas[t]).sqrt() * noise for t in NOISE_LEVELS}
    base_predictions = {t: cloud.unet(latents[t], t, base.expand(samples, -1, -1)).sample for t in NOISE_LEVELS}
    rows = {}
    for attribute, (word, other) in SWAPS.items():
        swapped = encoded(README_PROMPT.replace(word, other, 1))
        moved = {"text_encoder": float((swapped - base).norm(dim=-1).mean())}
        for t in NOISE_LEVELS:
            change = cloud.unet(latents[t], t, swapped.expand(samples, -1, -1)).sample - base_predictions[t]
            # To predicted latents: x0 = (x_t - sqrt(1 - a) eps) / sqrt(a), or sqrt(a) x_t - sqrt(1 - a) v.
            scale = (1 - alphas[t]).sqrt() if v_prediction else ((1 - alphas[t]) / alphas[t]).sqrt()
            moved[f"prediction_t{t}"] = float(change.pow(2).mean().sqrt() * scale)
        rows[attribute] = moved
    return rows


def readme_prompt(spec: PairSpec, cloud, guidance: float) -> dict:
    """README_PROMPT at the default request, seeds 0 to README_SEEDS - 1, through the hybrid, or through the large
    model alone (diffusers' pipeline ``cloud``) for a pair folder without an edge: the seeds right in every
    attribute, and each attribute's mean."""
    request = GenerationRequest(README_PROMPT)
    if Path(spec.edge).exists():
        hybrid, through = HybridPipeline.from_pair(spec), "hybrid"
        images = [hybrid(dataclasses.replace(request, seed=seed)).image for seed in range(README_SEEDS)]
    else:
        through = "large alone"
        spacing = pipeline_timesteps(cloud.scheduler, request.num_inference_steps, spec.timestep_power)
        images = [
            diffusers_large_alone(cloud, [README_PROMPT], request.num_inference_steps, guidance, seed, **spacing)[0]
            for seed in range(README_SEEDS)
        ]
    scores = [score(image, README_PROMPT) for image in images]
    means = {name: sum(getattr(s, name) for s in scores) / len(scores) for name in ATTRIBUTES if name != "overall"}
    return {"through": through, "fully_right": sum(s.overall == 1.0 for s in scores), "seeds": len(scores), **means}


def _fraction(value: float | None) -> str:
    """A fraction to two places; "—" where no image had both shapes to measure it on."""
    return "—" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", default="hybrid_sd/shapes/pair", help="comma-separated shapes pair folders")
    parser.add_argument("--seeds", type=int, default=16, help="seeds per caption (0 to N-1)")
    parser.add_argument("--guidance", type=float, default=GUIDANCE_SCALE, help="classifier-free guidance scale")
    args = parser.parse_args()
    rows = [measure(Path(pair), args.seeds, args.guidance) for pair in args.pairs.split(",")]
    print(f"large model alone, {len(SCENES)} pairs of shapes x {len(RELATIONS)} relations x {args.seeds} seeds,")
    print(f"{STEPS} steps, guidance {args.guidance}; relation by centroids, over images where both shapes are found")
    steps = GenerationRequest(README_PROMPT).num_inference_steps
    hybrid = f"{steps} steps, k = {round(DEFAULT_SWITCH_FRACTION * steps)}"
    print(f"and {README_PROMPT!r} through the hybrid ({hybrid}; the large model alone for a folder without an edge),")
    print(f"seeds 0-{README_SEEDS - 1}: fully right")
    print("pair | " + " | ".join(RELATIONS) + " | one layout for all four relations | both found | README prompt")
    for row in rows:
        held = " | ".join(_fraction(row["relation_holds"][relation]) for relation in RELATIONS)
        readme = f"{row['readme_prompt']['fully_right']} of {README_SEEDS} ({row['readme_prompt']['through']})"
        print(
            f"{row['pair']} | {held} | {_fraction(row['same_layout_for_every_relation'])} | {row['both_found']:.2f}"
            f" | {readme}"
        )
    print(f"\n{README_PROMPT!r} with one word swapped: how far the text encoder's output and the large UNet's")
    print("predicted latents (RMS, on noise alone) move")
    print("pair | attribute (swap) | text encoder | " + " | ".join(f"prediction at t = {t}" for t in NOISE_LEVELS))
    for row in rows:
        for attribute, moved in row["caption_sensitivity"].items():
            swap = " -> ".join(SWAPS[attribute])
            cells = " | ".join(f"{moved[f'prediction_t{t}']:.3f}" for t in NOISE_LEVELS)
            print(f"{row['pair']} | {attribute} ({swap}) | {moved['text_encoder']:.2f} | {cells}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"steps": STEPS, "guidance": args.guidance, "rows": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
