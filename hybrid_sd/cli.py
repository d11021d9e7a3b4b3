"""The ``hybrid-sd`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from hybrid_sd.presets import DEFAULT_PAIR, PAIR_NAMES, PairSpec
from hybrid_sd.request import GenerationRequest
from hybrid_sd.scheduler_names import SCHEDULER_ALIASES

if TYPE_CHECKING:
    from hybrid_sd.pipeline import GenerationResult

DTYPES = ("float32", "float16", "bfloat16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrid-sd", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate one image, switching models at --switch-step")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--negative-prompt")
    generate.add_argument("--switch-step", type=int, help="cloud steps before the handoff (default: 40%% of --steps)")
    generate.add_argument("--steps", type=int, default=25, help="denoising steps in all (default: 25)")
    generate.add_argument("--seed", type=int, help="random seed (default: a random one, reported in --json)")
    generate.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    generate.add_argument("--guidance-rescale", type=float, default=0.0)
    generate.add_argument("--width", type=int, help="default: the cloud model's native size")
    generate.add_argument("--height", type=int, help="default: the cloud model's native size")
    generate.add_argument(
        "--scheduler",
        help=f"a diffusers scheduler class name or an alias ({', '.join(SCHEDULER_ALIASES)});"
        " default: the cloud model's own",
    )
    models = generate.add_argument_group("models (a preset, or a cloud and an edge model)")
    models.add_argument("--pair", choices=PAIR_NAMES, help=f"model pair preset (default: {DEFAULT_PAIR})")
    models.add_argument("--cloud-model", help="diffusers pipeline folder or hub ID of the large model")
    models.add_argument("--edge-model", help="diffusers pipeline or UNet folder, or hub ID, of the small model")
    models.add_argument("--edge-vae", help="VAE or tiny decoder for the edge (AutoencoderKL or AutoencoderTiny)")
    models.add_argument(
        "--edge-vae-latent-space", choices=("sd1", "sdxl"), help="latent space an AutoencoderTiny decodes"
    )
    models.add_argument(
        "--edge-shares-text-encoder", action="store_true", help="run the edge on the cloud's text encoders"
    )
    generate.add_argument("--device", default="cpu")
    generate.add_argument("--dtype", choices=DTYPES, default="float32")
    generate.add_argument("--out", type=Path, required=True, help="PNG file to write")
    generate.add_argument("--latents-out", type=Path, help="write the final latents (key 'latents') here")
    generate.add_argument("--json", action="store_true", help="print one JSON object with seed, timings, counts")
    generate.set_defaults(handler=run_generate)
    return parser


def pair_spec(args: argparse.Namespace) -> PairSpec:
    if args.cloud_model or args.edge_model:
        if args.pair:
            raise ValueError("--pair cannot be combined with --cloud-model/--edge-model")
        if not (args.cloud_model and args.edge_model):
            raise ValueError("--cloud-model and --edge-model must be given together")
        return PairSpec(
            args.cloud_model,
            args.edge_model,
            args.edge_vae,
            args.edge_vae_latent_space,
            args.edge_shares_text_encoder,
        )
    if args.edge_vae:
        raise ValueError("--edge-vae needs --cloud-model and --edge-model")
    from hybrid_sd.pairs import preset

    return preset(args.pair or DEFAULT_PAIR)


def run_generate(args: argparse.Namespace) -> None:
    request = GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        switch_step=args.switch_step,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        guidance_rescale=args.guidance_rescale,
        seed=args.seed,
        width=args.width,
        height=args.height,
        scheduler=args.scheduler,
    )
    request.check()  # before loading any model: bad input fails fast
    spec = pair_spec(args)
    import torch

    from hybrid_sd.pipeline import HybridPipeline

    pipeline = HybridPipeline.from_pair(spec, args.device, getattr(torch, args.dtype))
    with tqdm(desc="denoising", unit="step", file=sys.stderr) as bar:

        def show_progress(step: dict) -> None:
            bar.total = step["total"]
            bar.update()

        result = pipeline(request, callback=show_progress)
    write_outputs(result, args.out, args.latents_out)
    if args.json:
        print(json.dumps(result.summary()))
    else:
        print(f"wrote {args.out} (seed {result.request.seed}, switch step {result.request.switch_step})")


def write_outputs(result: GenerationResult, image_path: Path, latents_path: Path | None) -> None:
    from safetensors.torch import save_file

    image_path.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(image_path, format="PNG")
    if latents_path is not None:
        latents_path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"latents": result.latents.detach().cpu().contiguous()}, str(latents_path))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        _quiet_libraries()
    try:
        args.handler(args)
    except ValueError as error:
        print(f"hybrid-sd: error: {error}", file=sys.stderr)
        return 2
    return 0


def _quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
