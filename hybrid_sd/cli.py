"""The ``hybrid-sd`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from hybrid_sd.errors import NonFiniteLatentsError
from hybrid_sd.presets import DEFAULT_PAIR, PAIR_NAMES, PRESETS, PairSpec
from hybrid_sd.request import GenerationRequest
from hybrid_sd.scheduler_names import SCHEDULER_ALIASES

if TYPE_CHECKING:
    from hybrid_sd.pipeline import GenerationResult

DTYPES = ("float32", "float16", "bfloat16")
TOKEN_OPTIONS = ("token", "cloud_token", "edge_token")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrid-sd", description=__doc__)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log at INFO level; show the traceback of an error too"
    )
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
    add_model_arguments(generate)
    generate.add_argument("--out", type=Path, required=True, help="image file to write (.png, .jpg or .webp)")
    generate.add_argument("--latents-out", type=Path, help="write the final latents (key 'latents') here")
    generate.add_argument("--json", action="store_true", help="print one JSON object with seed, timings, counts")
    remote = generate.add_argument_group("remote (with --target: a gRPC call to a gateway or an edge worker)")
    remote.add_argument("--target", help="HOST:PORT of a hybrid-sd server; without it, generate in-process")
    remote.add_argument("--timeout", type=float, help="deadline of the call in seconds")
    remote.add_argument("--allow-edge-fallback", action="store_true", help="let the edge finish alone if needed")
    add_client_security_arguments(remote)
    generate.set_defaults(handler=run_generate)

    from hybrid_sd.cli_serve import add_serving_commands
    from hybrid_sd.cli_sweep import add_sweep_command
    from hybrid_sd.cli_train import add_train_commands

    add_serving_commands(commands)
    add_sweep_command(commands)
    add_train_commands(commands)
    for plugin in entry_points(group="hybrid_sd.commands"):  # e.g. compress, from the compression package
        plugin.load()(commands)
    return parser


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    models = parser.add_argument_group("models (a preset, or a cloud and an edge model)")
    models.add_argument(
        "--pair",
        choices=PAIR_NAMES,
        default=os.environ.get("HYBRID_SD_PAIR"),
        help=f"model pair preset (default: $HYBRID_SD_PAIR or {DEFAULT_PAIR})",
    )
    models.add_argument("--cloud-model", help="diffusers pipeline folder or hub ID of the large model")
    models.add_argument("--edge-model", help="diffusers pipeline or UNet folder, or hub ID, of the small model")
    models.add_argument("--edge-vae", help="VAE or tiny decoder for the edge (AutoencoderKL or AutoencoderTiny)")
    models.add_argument(
        "--edge-vae-latent-space",
        help="latent space an AutoencoderTiny decodes: sd1, sdxl or custom-<VAE scaling factor>",
    )
    models.add_argument(
        "--edge-shares-text-encoder", action="store_true", help="run the edge on the cloud's text encoders"
    )
    models.add_argument(
        "--edge-bundle",
        type=Path,
        help="edge bundle folder (hybrid-sd compress) replacing the edge UNet (and decoder, if it has one)",
    )
    models.add_argument("--device", help="torch device (default: cpu; cuda for a gateway with GPU replicas)")
    models.add_argument("--dtype", choices=DTYPES, default="float32")


def add_client_security_arguments(parser) -> None:
    parser.add_argument("--token", default=env_value("HYBRID_SD_TOKEN"), help="bearer token ($HYBRID_SD_TOKEN)")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate to verify a TLS server with")


def env_value(name: str) -> str | None:
    """An environment variable as an option's default; empty is unset, as in docker-compose.yml."""
    return os.environ.get(name) or None


def check_tokens(args: argparse.Namespace) -> None:
    """An empty token option is a mistake (an unset shell variable?), not a way to turn auth off."""
    from hybrid_sd.credentials import check_token

    for name in TOKEN_OPTIONS:
        check_token(getattr(args, name, None), "--" + name.replace("_", "-"))


def pair_spec(args: argparse.Namespace) -> PairSpec:
    """The models the command line names: a preset or a cloud and an edge model, then ``--edge-bundle``."""
    spec = named_pair(args)
    if args.edge_bundle is None:
        return spec
    from hybrid_sd.bundle import bundle_spec

    return bundle_spec(spec, args.edge_bundle)


def named_pair(args: argparse.Namespace) -> PairSpec:
    """The preset or cloud and edge models the command line names, before ``--edge-bundle``."""
    if args.cloud_model or args.edge_model:
        if args.pair and args.pair != os.environ.get("HYBRID_SD_PAIR"):
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
    name = args.pair or DEFAULT_PAIR
    if name in PRESETS:  # hub models: named without loading torch, so that a bad one is reported at once
        return PRESETS[name]
    from hybrid_sd.pairs import preset

    return preset(name)


def local_pair_spec(args: argparse.Namespace) -> PairSpec:
    """:func:`pair_spec` for a command that loads both models here: they and ``--device`` are checked first,
    then the libraries are quieted for the load."""
    spec = pair_spec(args)
    check_local_models(args.device or "cpu", spec.cloud, spec.edge, spec.edge_vae)
    quiet_libraries(args)
    return spec


def check_local_models(device: str, *refs: str | None) -> None:
    """That the models exist or can be fetched, then that the device is there, before any model loads."""
    from hybrid_sd.model_refs import check_models

    check_models(*refs)  # before the device: this needs no torch, and answers in a second
    from hybrid_sd.devices import check_device

    check_device(device)


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
    from hybrid_sd.user_files import output_file, output_format_for

    output_format = output_format_for(args.out)  # a bad suffix or an unwritable path fails now, not after the work
    output_file(args.out)
    if args.latents_out is not None:
        output_file(args.latents_out, "--latents-out")
    if args.target:
        run_remote_generate(args, request)
        return
    spec = local_pair_spec(args)
    import torch

    from hybrid_sd.pipeline import HybridPipeline

    pipeline = HybridPipeline.from_pair(spec, args.device or "cpu", getattr(torch, args.dtype))
    with tqdm(desc="denoising", unit="step", file=sys.stderr) as bar:

        def show_progress(step: dict) -> None:
            bar.total = step["total"]
            bar.update()

        result = pipeline(request, callback=show_progress)
    write_outputs(result, args.out, output_format, args.latents_out)
    if args.json:
        print(json.dumps(result.summary()))
    else:
        print(f"wrote {args.out} (seed {result.request.seed}, switch step {result.request.switch_step})")


def run_remote_generate(args: argparse.Namespace, request: GenerationRequest) -> None:
    import asyncio

    from hybrid_sd.client import generate_remote, latents_of, response_summary
    from hybrid_sd.wire import request_to_pb

    message = request_to_pb(request)
    message.allow_edge_fallback = args.allow_edge_fallback
    message.include_latents = args.latents_out is not None
    if args.pair:
        message.pair = args.pair
    response = asyncio.run(generate_remote(args.target, message, args.out, args.token, args.tls_ca, args.timeout))
    if args.latents_out is not None:
        save_latents(latents_of(response), args.latents_out)
    if args.json:
        print(json.dumps(response_summary(response)))
    else:
        print(f"wrote {args.out} (seed {response.seed}, switch step {response.switch_step})")


def write_outputs(result: GenerationResult, image_path: Path, output_format: int, latents_path: Path | None) -> None:
    """The image in the format its suffix names (as the served path writes it), and the latents if asked."""
    from hybrid_sd.wire import encode_image

    image_path.parent.mkdir(parents=True, exist_ok=True)
    image_path.write_bytes(encode_image(result.image, output_format)[0])
    if latents_path is not None:
        save_latents(result.latents, latents_path)


def save_latents(latents, path: Path) -> None:
    """``--latents-out``: the final latents as safetensors, key ``latents``."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.detach().cpu().contiguous()}, str(path))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):  # read when they load, if they do
            os.environ.setdefault(variable, "error")
    try:
        check_tokens(args)
        args.handler(args)
    except ValueError as error:  # a mistake in what the command names: one line, unless --verbose
        if args.verbose:
            traceback.print_exc()
        print(f"hybrid-sd: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLatentsError as error:  # the run itself went wrong: no image, one line
        print(f"hybrid-sd: error: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        import grpc

        if not isinstance(error, grpc.RpcError):
            raise
        print(f"hybrid-sd: error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    return 0


def quiet_libraries(args: argparse.Namespace) -> None:
    """Without --verbose, no diffusers or transformers warnings or progress bars; called once a command is
    about to load models (this imports both), so that one that fails before does not wait for them. A handler
    called without :func:`main` (no ``verbose`` in ``args``) leaves them as they are."""
    if getattr(args, "verbose", True):
        return
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
