"""What every ``hybrid-sd`` command shares: its model and client security arguments, the model pair and the
prompts they name, and the checks run before any model loads. Imports no command module."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from hybrid_sd.presets import DEFAULT_PAIR, PAIR_NAMES, PRESETS, PairSpec

DTYPES = ("float32", "float16", "bfloat16")
TOKEN_OPTIONS = ("token", "cloud_token", "edge_token")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    models = parser.add_argument_group("models (a preset, or a cloud and an edge model)")
    models.add_argument(
        "--pair",
        type=pair_name,
        default=os.environ.get("HYBRID_SD_PAIR"),
        help=f"model pair: one of {', '.join(PAIR_NAMES)}, or a trained pair's folder (hybrid-sd train-shapes)"
        f" (default: $HYBRID_SD_PAIR or {DEFAULT_PAIR})",
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


def add_timestep_power_argument(parser: argparse.ArgumentParser) -> None:
    """``--timestep-power``, the request's ``timestep_power``, as every command that makes requests takes it."""
    parser.add_argument(
        "--timestep-power",
        type=float,
        metavar="P",
        help="sample at timesteps 999 (1 - i/N)^P (P > 1: fewer steps at high noise; default: the pair's spacing)",
    )


def pair_name(value: str) -> str:
    """A preset's name or a folder that holds a trained pair."""
    if value in PAIR_NAMES or Path(value).is_dir():
        return value
    raise argparse.ArgumentTypeError(f"must be one of {', '.join(PAIR_NAMES)} or a pair's folder, got {value!r}")


def add_client_security_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--token", default=env_value("HYBRID_SD_TOKEN"), help="bearer token ($HYBRID_SD_TOKEN)")
    parser.add_argument("--tls-ca", type=Path, help="CA certificate to verify a TLS server with")


def add_remote_arguments(group: argparse._ArgumentGroup, required: bool = False) -> None:
    """``--target``, ``--timeout`` and the client security options of a command that calls a server;
    unless ``required``, a command without ``--target`` generates in-process."""
    in_process = "" if required else "; without it, generate in-process"
    group.add_argument("--target", required=required, help=f"HOST:PORT of a hybrid-sd server{in_process}")
    group.add_argument("--timeout", type=float, help="deadline of each call in seconds")
    add_client_security_arguments(group)


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


def quiet_libraries(args: argparse.Namespace) -> None:
    """Without --verbose, no diffusers or transformers warnings or progress bars; called once a command is
    about to load models (this imports both), so that one that fails before does not wait for them. A handler
    called without :func:`hybrid_sd.cli.main` (no ``verbose`` in ``args``) leaves them as they are."""
    if getattr(args, "verbose", True):
        return
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def read_prompts(value: str | None, flag: str = "--prompts") -> list[str]:
    """A prompt file, one a line; ``shapes:N``, the first N held-out captions of the shapes pair (what
    ``evaluate-shapes`` measures on); or ``shapes-train:N``, N captions of its training scenes."""
    if value is None:
        raise ValueError(f"{flag} is required for this action")
    source, _, count = value.partition(":")
    if source in SHAPES_PROMPTS:
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"{flag}: {source}:N needs a positive N, got {value!r}")
        return SHAPES_PROMPTS[source](int(count))
    from hybrid_sd.user_files import read_prompt_file

    return read_prompt_file(Path(value), flag)


def _heldout_captions(count: int) -> list[str]:
    from hybrid_sd.shapes_pair.evaluate import heldout_captions

    return heldout_captions(count)


def _training_captions(count: int) -> list[str]:
    from hybrid_sd.shapes.dataset import ShapesDataset, caption

    dataset = ShapesDataset(count)
    return [caption(dataset.scene(index)) for index in range(count)]


SHAPES_PROMPTS = {"shapes": _heldout_captions, "shapes-train": _training_captions}
