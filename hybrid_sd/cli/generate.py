"""``hybrid-sd generate``: one image, in this process or by a gRPC call to a server."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hybrid_sd.cli.arguments import (
    add_model_arguments,
    add_remote_arguments,
    add_timestep_power_argument,
    local_pair_spec,
)
from hybrid_sd.request import GenerationRequest
from hybrid_sd.scheduler_names import SCHEDULER_ALIASES

AUTO = "auto"  # --switch-step auto: the server chooses

if TYPE_CHECKING:
    from hybrid_sd.lane import Progress
    from hybrid_sd.results import GenerationResult


def add_generate_command(commands: argparse._SubParsersAction) -> None:
    """Add ``generate`` to the ``hybrid-sd`` subcommands."""
    generate = commands.add_parser("generate", help="generate one image, switching models at --switch-step")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--negative-prompt")
    generate.add_argument(
        "--switch-step",
        type=switch_step_value,
        help="cloud steps before the handoff (default: 40%% of --steps); 'auto': the server chooses (needs --target)",
    )
    generate.add_argument(
        "--latency-target", type=float, metavar="S", help="with --switch-step auto: end-to-end seconds to meet"
    )
    generate.add_argument("--steps", type=int, default=25, help="denoising steps in all (default: 25)")
    generate.add_argument("--seed", type=int, help="random seed (default: a random one, reported in --json)")
    generate.add_argument(
        "--guidance",
        type=float,
        help="classifier-free guidance scale (default: the pair's own; 7.5 for Stable Diffusion)",
    )
    generate.add_argument("--guidance-rescale", type=float, default=0.0)
    add_timestep_power_argument(generate)
    generate.add_argument("--width", type=int, help="default: the edge model's native size")
    generate.add_argument("--height", type=int, help="default: the edge model's native size")
    generate.add_argument(
        "--scheduler",
        help=f"a diffusers scheduler class name or an alias ({', '.join(SCHEDULER_ALIASES)});"
        " default: the edge model's own",
    )
    add_model_arguments(generate)
    generate.add_argument("--out", type=Path, required=True, help="image file to write (.png, .jpg or .webp)")
    generate.add_argument("--latents-out", type=Path, help="write the final latents (key 'latents') here")
    generate.add_argument("--json", action="store_true", help="print one JSON object with seed, timings, counts")
    remote = generate.add_argument_group("remote (with --target: a gRPC call to a gateway or an edge worker)")
    add_remote_arguments(remote)
    remote.add_argument("--allow-edge-fallback", action="store_true", help="let the edge finish alone if needed")
    remote.add_argument(
        "--exact", action="store_true", help="never batch this request's steps with others': bit for bit as diffusers"
    )
    generate.set_defaults(handler=run_generate)


def switch_step_value(text: str) -> int | str:
    """``--switch-step``: a number of steps, or ``auto``."""
    if text == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer or {AUTO!r}, got {text!r}") from None


def run_generate(args: argparse.Namespace) -> None:
    auto = args.switch_step == AUTO
    if auto and not args.target:
        raise ValueError("--switch-step auto needs --target: a gateway or edge worker chooses the switch step")
    if args.latency_target is not None and not auto:
        raise ValueError("--latency-target needs --switch-step auto")
    request = GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        switch_step=None if auto else args.switch_step,
        auto_switch=auto,
        latency_target_s=args.latency_target,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        guidance_rescale=args.guidance_rescale,
        timestep_power=args.timestep_power,
        seed=args.seed,
        width=args.width,
        height=args.height,
        scheduler=args.scheduler,
        exact=args.exact,
    )
    request.check()  # before loading any model: bad input fails fast
    from hybrid_sd.user_files import image_format_for, output_file

    image_format = image_format_for(args.out)  # a bad suffix or an unwritable path fails now, not after the work
    output_file(args.out)
    if args.latents_out is not None:
        output_file(args.latents_out, "--latents-out")
    if args.target:
        run_remote_generate(args, request, image_format)
        return
    spec = local_pair_spec(args)
    import torch
    from tqdm import tqdm

    from hybrid_sd.pipeline import HybridPipeline

    pipeline = HybridPipeline.from_pair(spec, args.device or "cpu", getattr(torch, args.dtype))
    with tqdm(desc="denoising", unit="step", file=sys.stderr) as bar:

        def show_progress(progress: Progress) -> None:
            bar.total = progress.total
            bar.update()

        result = pipeline(request, on_progress=show_progress)
    write_outputs(result, args, image_format)


def run_remote_generate(args: argparse.Namespace, request: GenerationRequest, image_format: str) -> None:
    import asyncio

    from hybrid_sd.client import generate_remote
    from hybrid_sd.results import CallOptions, OutputSpec

    options = CallOptions(
        output=OutputSpec(image_format=image_format, latents=args.latents_out is not None),
        allow_edge_fallback=args.allow_edge_fallback,
        pair=args.pair or "",
    )
    result = asyncio.run(generate_remote(args.target, request, options, args.token, args.tls_ca, args.timeout))
    write_outputs(result, args, image_format)


def write_outputs(result: GenerationResult, args: argparse.Namespace, image_format: str) -> None:
    """The image in the format its suffix names (as a server encoded it, or encoded here), the latents
    if asked, and the summary."""
    from hybrid_sd.halves import encode_image

    data = result.image_data or encode_image(result.image, image_format)[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    if args.latents_out is not None:
        save_latents(result.latents, args.latents_out)
    if args.json:
        print(json.dumps(result.summary()))
    else:
        choice = result.switch_choice
        chosen = f", chosen: {choice.reason}, predicted {choice.predicted_latency_s:.2f} s" if choice else ""
        print(f"wrote {args.out} (seed {result.request.seed}, switch step {result.request.switch_step}{chosen})")


def save_latents(latents, path: Path) -> None:
    """``--latents-out``: the final latents as safetensors, key ``latents``."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.detach().cpu().contiguous()}, str(path))
