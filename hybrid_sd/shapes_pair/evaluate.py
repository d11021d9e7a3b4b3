"""Measure a trained shapes pair and write its model card.

A switch-step sweep over held-out captions (adherence per attribute, per-stage latency, cloud UNet
evaluations), the Fréchet distance of each k's images to the real renders of the same scenes in the shipped
feature space, FLOPs per step of each UNet and decoder, and file sizes. ``evaluation.json`` holds it all;
``README.md`` (the model card) puts it with ``training.json``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from hybrid_sd.bundle import Bundle, folder_bytes, pair_edge_bundle
from hybrid_sd.flop_count import flop_counter
from hybrid_sd.pairs import embedded_spec
from hybrid_sd.pipeline import HybridPipeline
from hybrid_sd.request import GenerationRequest
from hybrid_sd.schedulers import pipeline_timesteps
from hybrid_sd.shapes.adherence import score_batch
from hybrid_sd.shapes.dataset import Scene, ShapesDataset, caption, render
from hybrid_sd.shapes.features import features, frechet_distance, load_feature_net
from hybrid_sd.sweep import SweepConfig, run_sweep

HELDOUT_SEED = 2000  # scenes seen neither in training (seed 0) nor by the feature net's held-out set (1000)
ATTRIBUTES = ("count", "color", "shape", "size", "relation", "overall")
DIFFUSERS_BATCH = 16  # captions per diffusers pipeline call


def heldout_scenes(count: int, seed: int = HELDOUT_SEED) -> list[Scene]:
    """The first ``count`` scenes of the dataset at ``seed`` with captions not seen before in it."""
    dataset = ShapesDataset(100 * count, seed=seed)
    scenes: dict[str, Scene] = {}
    index = 0
    while len(scenes) < count:
        scene = dataset.scene(index)
        scenes.setdefault(caption(scene), scene)
        index += 1
    return list(scenes.values())


def heldout_captions(count: int) -> list[str]:
    return [caption(scene) for scene in heldout_scenes(count)]


def heldout_images(count: int, seed: int = HELDOUT_SEED) -> list[Image.Image]:
    return [render(scene) for scene in heldout_scenes(count, seed)]


class HeldoutSet:
    """Held-out captions with the feature-net features of their real renders: generates images for the
    captions and scores images against both (adherence per attribute, Fréchet distance)."""

    def __init__(self, count: int) -> None:
        scenes = heldout_scenes(count)
        self.captions = [caption(scene) for scene in scenes]
        self.net = load_feature_net()
        self.real_features = features([render(scene) for scene in scenes], self.net)

    def generate(self, pipeline: HybridPipeline, switch_step: int, steps: int, seed: int = 0) -> list[Image.Image]:
        return [
            pipeline(GenerationRequest(text, switch_step=switch_step, num_inference_steps=steps, seed=seed)).image
            for text in self.captions
        ]

    def score(self, images: list[Image.Image]) -> dict:
        """``adherence`` (score_batch's means) and ``frechet_distance`` of images in caption order."""
        return {
            "adherence": score_batch(images, self.captions),
            "frechet_distance": frechet_distance(self.real_features, features(images, self.net)),
        }


@torch.no_grad()
def flops_per_call(module: torch.nn.Module, *inputs) -> int:
    """Floating-point operations of one forward call (matmuls, convolutions and attention)."""
    with flop_counter() as counter:
        module(*inputs)
    return counter.get_total_flops()


def weight_folders(bundle: Bundle | None) -> tuple[str, ...]:
    """A pair's weight folders, relative to it, given its edge bundle (None: train-shapes' own layout)."""
    return ("cloud", "edge/unet", "edge/vae") if bundle else ("cloud", "edge-unet", "edge-vae")


def model_costs(pipeline: HybridPipeline, bundle: Bundle | None = None) -> dict:
    """FLOPs per UNet evaluation (batch 1; classifier-free guidance doubles it) and per decode, and parameters.
    A bundle's edge UNet is costed from its card: the float architecture's MACs (int8 kernels do the same
    multiply-accumulates, which the FLOP counter does not see)."""
    cloud, edge = pipeline.cloud.pipe, pipeline.edge.pipe
    unet_config = cloud.unet.config
    latents = torch.zeros(1, unet_config.in_channels, unet_config.sample_size, unet_config.sample_size)
    context = torch.zeros(1, cloud.tokenizer.model_max_length, unet_config.cross_attention_dim)
    timestep = torch.tensor([500])

    def parameters(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    return {
        "large_unet": {
            "flops": flops_per_call(cloud.unet, latents, timestep, context),
            "params": parameters(cloud.unet),
        },
        "small_unet": (
            {"flops": 2 * bundle.card["macs_per_unet_step"], "params": bundle.card["unet_params"]}
            if bundle is not None
            else {"flops": flops_per_call(edge.unet, latents, timestep, context), "params": parameters(edge.unet)}
        ),
        "vae_decoder": {
            "flops": flops_per_call(lambda z: cloud.vae.decode(z), latents),
            "params": parameters(cloud.vae.decoder) + parameters(cloud.vae.post_quant_conv),
        },
        "tiny_decoder": {
            "flops": flops_per_call(lambda z: edge.vae.decode(z), latents),
            "params": parameters(edge.vae.decoder),
        },
        "text_encoder": {"params": parameters(cloud.text_encoder)},
    }


def evaluate(
    pair_dir: Path,
    sweep_dir: Path,
    prompts: int = 64,
    num_inference_steps: int = 20,
    switch_steps: tuple[int, ...] = (0, 4, 8, 12, 16, 20),
    seed: int = 0,
) -> dict:
    """Sweep the pair at ``pair_dir`` into ``sweep_dir`` at its own guidance scale and timestep spacing; return
    the evaluation and write it to ``pair_dir/evaluation.json``."""
    spec = embedded_spec(pair_dir)
    guidance_scale = spec.guidance_scale
    pipeline = HybridPipeline.from_pair(spec)
    bundle = pair_edge_bundle(pair_dir)
    heldout = HeldoutSet(prompts)
    config = SweepConfig(
        switch_steps=list(switch_steps),
        prompts=heldout.captions,
        seeds=[seed],
        num_inference_steps=num_inference_steps,
        scheduler=None,
        guidance_scale=guidance_scale,
        out=sweep_dir,
    )
    summary = run_sweep(config, pipeline)
    # diffusers' pipeline at the pair's timesteps, as the engine samples
    spacing = pipeline_timesteps(pipeline.cloud.pipe.scheduler, num_inference_steps, spec.timestep_power)
    with open(config.out / "results.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    per_k = {}
    for k in config.ks:
        chosen = sorted((row for row in rows if int(row["switch_step"]) == k), key=lambda row: int(row["prompt_index"]))
        images = [Image.open(config.out / row["image"]).convert("RGB") for row in chosen]
        per_k[str(k)] = {
            **heldout.score(images),
            "median_total_s": float(np.median([float(row["t_total_s"]) for row in chosen])),
            "cloud_unet_evaluations": int(chosen[0]["cloud_unet_evaluations"]),
        }
    evaluation = {
        # How hybrid-sd compress made the edge: its card, with each action's settings and wall time.
        "edge_bundle": {**bundle.card, "history": bundle.history} if bundle is not None else None,
        "prompts": prompts,
        "heldout_seed": HELDOUT_SEED,
        "seed": seed,
        "num_inference_steps": num_inference_steps,
        "scheduler": type(pipeline.cloud.pipe.scheduler).__name__,
        "guidance_scale": guidance_scale,
        "timestep_power": spec.timestep_power,
        "switch_steps": per_k,
        # Where the decoder is the large model's own: how much of FD the edge's tiny decoder adds at k = N.
        "large_full_vae": heldout.score(
            diffusers_large_alone(
                pipeline.cloud.pipe, heldout.captions, num_inference_steps, guidance_scale, seed, **spacing
            )
        ),
        # The floor: a second real sample of the same size against the first.
        "frechet_distance_real_vs_real": frechet_distance(
            heldout.real_features, features(heldout_images(prompts, 3000), heldout.net)
        ),
        "costs": model_costs(pipeline, bundle),
        "bytes": {name: folder_bytes(pair_dir / name) for name in weight_folders(bundle)},
        "summary": {k: entry["metrics"]["adherence"] for k, entry in summary["switch_steps"].items()},
    }
    (pair_dir / "evaluation.json").write_text(json.dumps(evaluation, indent=2) + "\n")
    plot_adherence_and_fd(evaluation, config.out / "adherence_fd_vs_k.png")
    return evaluation


@torch.no_grad()
def diffusers_large_alone(
    pipe: StableDiffusionPipeline,
    captions: list[str],
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    **pipe_kwargs,
) -> list[Image.Image]:
    """The large model alone through diffusers' own pipeline ``pipe`` (the pair's cloud model as loaded),
    decoded by its full VAE; ``pipe_kwargs`` go to each call (e.g. ``timesteps``, which takes precedence)."""
    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(captions), DIFFUSERS_BATCH):
        batch = captions[start : start + DIFFUSERS_BATCH]
        generators = [torch.Generator().manual_seed(seed) for _ in batch]  # each image's noise as if alone
        images += pipe(
            batch,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            **pipe_kwargs,
        ).images
    return images


def plot_adherence_and_fd(evaluation: dict, path: Path) -> None:
    """Adherence per attribute and overall (left) and Fréchet distance (right) against k."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    entries = sorted((int(k), entry) for k, entry in evaluation["switch_steps"].items())
    ks = [k for k, _ in entries]
    figure = Figure(figsize=(10, 4), layout="constrained")
    adherence, distance = figure.subplots(1, 2)
    for name in ATTRIBUTES:
        values = [entry["adherence"][name] for _, entry in entries]
        if None not in values:
            adherence.plot(ks, values, marker="o", linewidth=3 if name == "overall" else 1, label=name)
    adherence.set(xlabel="switch step k (cloud steps)", ylabel="adherence", ylim=(-0.05, 1.05))
    adherence.set_title(f"Adherence on {evaluation['prompts']} held-out captions")
    adherence.legend()
    distance.plot(ks, [entry["frechet_distance"] for _, entry in entries], marker="o")
    floor = evaluation["frechet_distance_real_vs_real"]
    distance.axhline(floor, linestyle="--", color="grey", label=f"real vs real ({floor:.1f})")
    distance.set(xlabel="switch step k (cloud steps)", ylabel="Fréchet distance", title="FD to real renders")
    distance.set_ylim(bottom=0)
    distance.legend()
    figure.savefig(path, dpi=100)


def gap_recovered(evaluation: dict, k: int, metric: str = "adherence") -> float | None:
    """The share of the gap between the small model alone and the large one alone that the hybrid at ``k``
    closes, in overall adherence (``"adherence"``) or in Fréchet distance (``"frechet_distance"``); None
    where the two score the same."""

    def value(entry: dict) -> float:
        return entry["adherence"]["overall"] if metric == "adherence" else entry[metric]

    values = {int(step): value(entry) for step, entry in evaluation["switch_steps"].items()}
    small, large = values[0], values[evaluation["num_inference_steps"]]
    return None if large == small else (values[k] - small) / (large - small)
