"""The model card (README.md) of a trained shapes pair, written from its training.json and evaluation.json."""

from __future__ import annotations

import json
from pathlib import Path

from hybrid_sd.shapes_pair.evaluate import ATTRIBUTES, gap_recovered
from hybrid_sd.shapes_pair.train_config import TEXT_ENCODERS, TrainConfig

TRAIN_COMMAND = "hybrid-sd train-shapes --out hybrid_sd/shapes/pair --sweep-out out/shapes-eval"
MAKE_COMMAND = "bash scripts/make_shapes_pair.sh out/shapes-pair"  # the edge made by hybrid-sd compress


def _number(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _percent(share: float | None) -> str:
    return "none (no gap)" if share is None else f"{100 * share:.0f}%"


def _architecture_table(evaluation: dict, config: dict) -> list[str]:
    costs, sizes, bundle = evaluation["costs"], evaluation["bytes"], evaluation.get("edge_bundle")
    edge = ("small UNet (edge)", "UNet2DConditionModel, channels 32/48/64, attention at 8², 4²")
    tiny = "AutoencoderTiny (TAESD blocks), 16 channels, blocks 3/2/1"
    if bundle is not None:
        actions = [step["action"] for step in bundle["history"]]
        edge = ("edge UNet", f"an edge bundle `hybrid-sd compress` made ({', '.join(actions)}; see Compression)")
        widths = [step["width"] for step in bundle["history"] if step["action"] == "tiny-vae"]
        if widths:
            tiny = f"AutoencoderTiny (TAESD blocks), {widths[-1]} channels, from `hybrid-sd compress tiny-vae`"
    rows = [
        ("large UNet (cloud)", "UNet2DConditionModel, channels 64/128/128, attention at 16², 8², 4²", "large_unet"),
        (*edge, "small_unet"),
        ("VAE decoder", "AutoencoderKL, channels 16/32/64, 4x down-sampling, 4 latent channels", "vae_decoder"),
        ("tiny decoder (edge)", tiny, "tiny_decoder"),
        ("text encoder (shared)", TEXT_ENCODERS[config.get("text_encoder", TrainConfig.text_encoder)], "text_encoder"),
    ]
    lines = ["| model | architecture | parameters | MFLOPs per call (batch 1) |", "| --- | --- | --- | --- |"]
    for name, architecture, key in rows:
        flops = costs[key].get("flops")
        megaflops = "—" if flops is None else f"{flops / 1e6:.0f}"
        lines.append(f"| {name} | {architecture} | {costs[key]['params'] / 1e6:.2f}M | {megaflops} |")
    ratio = costs["large_unet"]["flops"] / costs["small_unet"]["flops"]
    decoder_ratio = costs["vae_decoder"]["flops"] / costs["tiny_decoder"]["flops"]
    megabytes = ", ".join(f"`{name}/` {size / 1e6:.1f} MB" for name, size in sizes.items())
    lines += [
        "",
        f"The edge UNet takes {ratio:.1f}x fewer FLOPs per step than the large one; the tiny decoder"
        f" {decoder_ratio:.1f}x fewer than the VAE decoder. Classifier-free guidance runs each UNet at batch 2."
        f" FLOPs count matmuls, convolutions and attention. Weights on disk: {megabytes}.",
    ]
    return lines


# The large stage's loss under each noise schedule (TrainConfig.schedule; cards before it: Stable Diffusion's).
_LOSSES = {
    "stable-diffusion": "epsilon loss on Stable Diffusion's schedule with Min-SNR-5 weighting",
    "zero-terminal-snr": "v-prediction loss on Stable Diffusion's betas rescaled to zero terminal SNR (Lin et al.,"
    " 2024) with Min-SNR-5 weighting of SNR + 1",
    "cosine-zero-terminal-snr": "v-prediction loss on the cosine schedule (Nichol & Dhariwal, 2021) rescaled to"
    " zero terminal SNR with Min-SNR-5 weighting of SNR + 1",
}


# What the large stage trains (TrainConfig.freeze_text_encoder; cards before it trained both).
def _large_stage_modules(config: dict, stages: dict) -> str:
    """What the large stage trained: the UNet with the text encoder, or alone on a frozen one."""
    start = "the text stage left it" if "text" in stages else "initialised"
    if config.get("freeze_text_encoder", False):
        return f"large UNet alone, on the text encoder as {start} (frozen)"
    return "text encoder and large UNet together" + (", from the text stage's encoder" if "text" in stages else "")


def _accuracies(stages: dict) -> str:
    """The text stage's held-out hard-negative accuracies, e.g. "relation 98.6%, colour 99.1%"."""
    accuracy = stages.get("text", {}).get("heldout_accuracy", {})
    return ", ".join(f"{kind} {share:.1%}" for kind, share in accuracy.items())


def _training_lines(training: dict) -> list[str]:
    config, stages = training["config"], training["stages"]
    minutes = training["total_seconds"] / 60
    device = training.get("device", f"cpu ({training['torch_threads']} threads)")  # cards before --device
    precision = config.get("precision", "fp32")
    lines = [
        f"Seeded (seed {config['seed']}), on {device}, forward passes in {precision}, in {minutes:.0f}"
        f" minutes all told ({', '.join(f'{k} {v}' for k, v in training['versions'].items())}).",
        "",
        "| stage | what | steps x batch (samples) | time | final loss |",
        "| --- | --- | --- | --- | --- |",
        f"| render | {config['images']} captioned 64x64 images of the shapes dataset (seed {config['seed']}) | — |"
        f" {stages['render']['seconds']:.0f} s | — |",
    ]
    described = {
        "vae": f"AutoencoderKL, L1 + {config['vae_kl_weight']:g} KL; {config['vae_crop_steps']} steps on 32x32 crops,"
        f" {config['vae_full_steps']} on whole images; latents scaled by {training['scaling_factor']} to unit variance",
        "text": "text encoder, contrastively (CLIP's InfoNCE both ways against a small image tower, thrown away"
        " after), with each caption's relation- and colour-swapped twins as hard negatives; true caption preferred"
        f" on held-out scenes: {_accuracies(stages)}",
        "large": f"{_large_stage_modules(config, stages)},"
        f" {_LOSSES[config.get('schedule', 'stable-diffusion')]},"
        f" 10% captions dropped for guidance, EMA {config['ema_decay']}",
        "small": "small UNet from scratch: MSE to the large UNet's prediction plus the diffusion loss (output"
        " distillation), frozen text encoder",
        "tiny": "AutoencoderTiny: decoder to the VAE decoder's and the real images (L1), encoder to the VAE's scaled"
        " means (MSE)",
    }
    for name, text in described.items():
        if name not in stages:  # a cloud-only run (the edge made by hybrid-sd compress)
            continue
        stage = stages[name]
        batch_size = stage.get("batch_size", config["batch_size"])  # cards before per-stage batch sizes
        lines.append(
            f"| {name} | {text} | {stage['steps']} x {batch_size} ({stage['steps'] * batch_size})"
            f" | {stage['seconds'] / 60:.1f} min |"
            f" {stage['final_loss']:.4f} |"
        )
    return lines


def _compression_lines(bundle: dict) -> list[str]:
    """The compress actions that made the edge bundle, with their settings and times."""
    lines = [
        "The edge is an edge bundle (`edge/`) that `hybrid-sd compress` made from the large UNet, as Hybrid-SD"
        " does; each action's settings and wall time (on the same machine, model loading included):",
        "",
        "| action | settings | time |",
        "| --- | --- | --- |",
    ]
    for step in bundle["history"]:
        settings = ", ".join(f"{key} {value}" for key, value in step.items() if key not in ("action", "seconds"))
        lines.append(f"| {step['action']} | {settings} | {step.get('seconds', 0) / 60:.1f} min |")
    lines += [
        "",
        f"The UNet keeps {bundle['unet_params'] / 1e6:.2f}M parameters and {bundle['macs_per_unet_step'] / 1e6:.0f}M"
        " MACs per step.",
    ]
    if "quantized_layers" in bundle:
        lines[-1] += (
            f" {bundle['quantized_layers']} of its layers run {bundle['mode']} on the {bundle['kernel']} kernels;"
            f" {len(bundle['kept_in_float'])} stay in float (`edge/calibration.json` says why, layer by layer)."
        )
    return lines


def _quality_lines(evaluation: dict) -> list[str]:
    steps = evaluation["num_inference_steps"]
    power = evaluation.get("timestep_power")  # absent from evaluations written before the setting existed
    spacing = f" at timesteps 999 (1 - i/{steps})^{power} (the pair's `serving.json`)" if power is not None else ""
    lines = [
        f"{evaluation['prompts']} held-out captions (dataset seed {evaluation['heldout_seed']}), image seed"
        f" {evaluation['seed']}, {steps} steps of {evaluation['scheduler']}{spacing}, guidance"
        f" {evaluation['guidance_scale']}."
        " k is the number of steps on the large model; k = 0 is the edge model alone, k = "
        f"{steps} the large one alone. Adherence is the deterministic scorer of `hybrid_sd.shapes.adherence`;"
        " FD is the Fréchet distance to the real renders of the same scenes in the shipped feature net's space"
        f" (a second real sample scores {evaluation['frechet_distance_real_vs_real']:.1f}).",
        "",
        "| k | " + " | ".join(ATTRIBUTES) + " | FD | cloud UNet evals | median latency |",
        "| --- " * (len(ATTRIBUTES) + 4) + "|",
    ]
    for k, entry in sorted(evaluation["switch_steps"].items(), key=lambda item: int(item[0])):
        adherence = " | ".join(_number(entry["adherence"][name]) for name in ATTRIBUTES)
        lines.append(
            f"| {k} | {adherence} | {entry['frechet_distance']:.1f} | {entry['cloud_unet_evaluations']} |"
            f" {entry['median_total_s']:.2f} s |"
        )
    full_vae = evaluation.get("large_full_vae")
    if full_vae is not None:
        lines += [
            "",
            f"The large model alone through diffusers' own `StableDiffusionPipeline`, decoded by its full VAE rather"
            f" than the edge's tiny decoder: overall adherence {full_vae['adherence']['overall']:.3f} (colour"
            f" {full_vae['adherence']['color']:.3f}, count {full_vae['adherence']['count']:.3f}), FD"
            f" {full_vae['frechet_distance']:.1f}.",
        ]
    hybrid_k = round(0.4 * steps)
    if str(hybrid_k) in evaluation["switch_steps"]:
        lines += [
            "",
            f"Against the edge model alone, the hybrid at k = {hybrid_k} (40% of the steps) closes"
            f" {_percent(gap_recovered(evaluation, hybrid_k, 'frechet_distance'))} of the gap to the large model"
            f" alone in FD and {_percent(gap_recovered(evaluation, hybrid_k))} of the gap in overall adherence.",
        ]
    return lines


def write_model_card(pair_dir: Path) -> Path:
    """Write ``pair_dir/README.md`` and return its path."""
    training = json.loads((pair_dir / "training.json").read_text())
    evaluation = json.loads((pair_dir / "evaluation.json").read_text())
    bundle = evaluation.get("edge_bundle")
    if bundle is None:
        edge_text = "the small one and the tiny decoder on the edge"
        folders = "`edge-unet/` (the small `UNet2DConditionModel`), `edge-vae/` (the `AutoencoderTiny`)"
        compression = []
    else:
        edge_text = (
            "on the edge a UNet that `hybrid-sd compress` made from the large one (pruned, distilled, W8A8) and"
            " a tiny decoder"
        )
        folders = "`edge/` (the edge bundle: `unet/` low-bit and pruned, `vae/` the `AutoencoderTiny`, its card)"
        compression = ["## Compression", "", *_compression_lines(bundle), ""]
    lines = [
        "# The shapes pair",
        "",
        "hybrid-sd's embedded default (`--pair shapes`): a text-to-image latent diffusion pair trained from"
        " nothing on the captioned shapes dataset (`hybrid_sd.shapes.dataset`), small enough for a CPU. The"
        f" large UNet runs on the cloud, {edge_text}; both UNets share the text encoder and the VAE's latent"
        " space, so a run can switch from one to the other at any step.",
        "",
        "Folders: `cloud/` (a `StableDiffusionPipeline`: tokenizer, text encoder, VAE, large UNet, DPM-Solver++"
        f" scheduler), {folders}.",
        "",
        "## Models",
        "",
        *_architecture_table(evaluation, training["config"]),
        "",
        "## Training",
        "",
        *_training_lines(training),
        "",
        *compression,
        "## Quality and cost",
        "",
        *_quality_lines(evaluation),
        "",
        "## Reproduce",
        "",
        "```bash",
        TRAIN_COMMAND if bundle is None else MAKE_COMMAND,
        "```",
        "",
        (
            "trains every model with the settings above, runs the evaluation sweep and rewrites this card"
            " (`--checkpoints DIR` checkpoints each stage every five minutes and `--resume` continues a stopped"
            " run; `--device cuda` trains on a GPU)"
            if bundle is None
            else "trains the cloud model with the settings above (`hybrid-sd train-shapes --cloud-only`,"
            " checkpointed: rerun the script to continue), makes the edge by the `hybrid-sd compress` actions"
            " under Compression, measures the pair and writes it with this card to `out/shapes-pair/pair`"
        )
        + "; `hybrid-sd evaluate-shapes --pair DIR --sweep-out DIR` re-measures a pair. Training is seeded, but"
        " CPU kernels differ between machines and thread counts, so a remade pair matches these numbers within a"
        " tolerance (see `tests/test_shapes_pair.py`), not bit for bit.",
        "",
    ]
    path = pair_dir / "README.md"
    path.write_text("\n".join(lines))
    return path
