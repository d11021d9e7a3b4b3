"""``hybrid-sd compress prune|distill|quantize|tiny-vae|export``: each action writes an edge bundle
(:mod:`hybrid_sd.bundle`) that ``hybrid-sd serve edge --bundle`` and ``--edge-bundle`` load.

An action starts from the edge UNet of the models named as everywhere else (``--pair`` or
``--cloud-model``/``--edge-model``), from ``--source cloud`` (the large UNet, as Hybrid-SD prunes it),
from a UNet folder (``--unet``) or from an earlier bundle (``--edge-bundle``), whose decoder and history
the new bundle carries on. Registered with the ``hybrid-sd`` command line through the
``hybrid_sd.commands`` entry point, so that the library does not import this package.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from hybrid_sd.cli.arguments import add_model_arguments, local_pair_spec, named_pair, read_prompts

logger = logging.getLogger(__name__)
CALIBRATION_FILE = "calibration.json"  # a calibrated quantize's per-layer choices, beside the bundle's UNet


def add_compress_command(commands: argparse._SubParsersAction) -> None:
    """Add ``compress`` and its actions to the ``hybrid-sd`` subcommands."""
    compress = commands.add_parser("compress", help="turn a model into a smaller, faster edge bundle")
    actions = compress.add_subparsers(dest="action", required=True)

    def action(name: str, help: str, handler) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help)
        add_model_arguments(parser)
        parser.add_argument("--out", type=Path, required=True, help="bundle folder to write")
        parser.set_defaults(handler=handler)
        return parser

    prune = action("prune", "BK-SDM block removal, then channel/head or (--widths) width pruning", run_prune)
    _add_source(prune)
    prune.add_argument("--budget", type=float, required=True, help="fraction of the source's params or MACs to keep")
    prune.add_argument("--metric", choices=("params", "macs"), default="params")
    prune.add_argument("--layers-per-block", type=int, help="BK-SDM: resnet+attention pairs kept per block")
    prune.add_argument("--remove-mid-block", action="store_true", help="BK-SDM: drop the mid block")
    prune.add_argument(
        "--widths",
        action="store_true",
        help="prune every layer's width (torch-pruning), the residual stream too: budgets below the channel/head floor",
    )
    _add_sampling(prune, "prompts whose sampling steps significance is measured on", rows=8)

    distill = action("distill", "fine-tune a bundle's (pruned) UNet from a teacher", run_distill)
    distill.add_argument("--teacher", choices=("cloud", "edge"), default="cloud", help="teacher UNet of the pair")
    distill.add_argument("--train-steps", type=int, default=1000)
    distill.add_argument("--batch-size", type=int, default=8)
    distill.add_argument("--lr", type=float, default=1e-4)
    distill.add_argument("--feature-weight", type=float, default=1.0, help="weight of the block-feature loss")
    distill.add_argument(
        "--from-step",
        type=int,
        default=0,
        help="train on the teacher's steps from this one on: the steps an edge serves after a switch (default 0: all)",
    )
    _add_sampling(distill, "prompts of the teacher generations to distil on")

    quantize = action("quantize", "low-bit weights (W2-W8), int8 or float activations", run_quantize)
    _add_source(quantize)
    quantize.add_argument("--weight-bits", type=int, default=8)
    quantize.add_argument("--activation-bits", type=int, default=8, help="8 (int8 kernels) or 16 (float)")
    quantize.add_argument("--group-size", type=int, help="weights per scale along the input (default: per channel)")
    quantize.add_argument("--asymmetric", action="store_true", help="zero points as well as scales")
    quantize.add_argument("--skip", action="append", default=[], help="module name pattern to keep in float")
    quantize.add_argument("--kernel", choices=("int_mm", "onednn"), default="int_mm", help="the A8 kernel")
    quantize.add_argument(
        "--max-error", type=float, default=0.05, help="with --prompts: worst relative layer error to quantize"
    )
    quantize.add_argument(
        "--min-speedup", type=float, default=1.0, help="with --prompts: how much faster a layer must run to quantize"
    )
    _add_sampling(quantize, "calibration prompts: static scales over every step, per-layer kernel choice")

    tiny = action("tiny-vae", "distil an AutoencoderTiny decoder from the cloud VAE", run_tiny_vae)
    tiny.add_argument("--train-steps", type=int, default=1000)
    tiny.add_argument("--batch-size", type=int, default=8)
    tiny.add_argument("--lr", type=float, default=1e-3)
    tiny.add_argument("--encoder", action="store_true", help="distil the encoder too")
    tiny.add_argument("--width", type=int, default=64, help="channels of every block (TAESD: 64)")
    _add_sampling(tiny, "prompts whose cloud generations give the latents")

    export = action("export", "measure a bundle's quality against the uncompressed pair; write its card", run_export)
    export.add_argument("--switch-steps", default="0", help="comma-separated switch steps to measure at")
    _add_sampling(export, "prompts to measure on (shapes:N: the shapes pair's held-out captions, adds adherence/FD)")


def _add_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--source", choices=("edge", "cloud"), default="edge", help="which UNet of the pair")
    source.add_argument("--unet", help="a UNet folder (or a pipeline folder with unet/) instead")


def _add_sampling(parser: argparse.ArgumentParser, prompts_help: str, rows: int | None = None) -> None:
    parser.add_argument("--prompts", help=f"{prompts_help}: a file, one a line, shapes:N or shapes-train:N")
    parser.add_argument("--sampling-steps", type=int, default=20, help="denoising steps of each generation")
    parser.add_argument(
        "--guidance", type=float, help="classifier-free guidance of the generations (default: the pair's own)"
    )
    parser.add_argument("--seed", type=int, default=0)
    if rows is not None:
        parser.add_argument("--calibration-rows", type=int, default=rows, help="UNet inputs, spread over the steps")


class _Context:
    """The pair the command line names, loaded once, and the bundle an action starts from."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.started = time.monotonic()
        from hybrid_sd.bundle import check_out, read_bundle
        from hybrid_sd.pairs import load_pair

        self.args = args
        self.source_bundle = read_bundle(args.edge_bundle) if args.edge_bundle else None
        check_out(args.out, self.source_bundle)  # before any work
        self.spec = local_pair_spec(args)
        self.pair = load_pair(self.spec, args.device or "cpu", getattr(torch, args.dtype))

    def source_unet(self):
        """A float32 copy of the UNet the action starts from; a low-bit one (the shipped pair's edge) is
        dequantized."""
        import torch

        from hybrid_sd.lowbit import dequantize_model
        from hybrid_sd.pairs import load_unet

        if getattr(self.args, "unet", None):
            return dequantize_model(load_unet(self.args.unet, torch.float32))
        denoiser = self.pair.cloud if getattr(self.args, "source", "edge") == "cloud" else self.pair.edge
        return dequantize_model(denoiser.pipe.unet).float()

    def trajectories(self, unet, prompts: list[str]):
        """The generations of ``unet`` in the cloud pipeline (text encoders, scheduler and the pair's timestep
        spacing: a bundle's UNet runs on the cloud's text encoders) on ``prompts``."""
        from compression.distill import collect_trajectories

        pipe = type(self.pair.cloud.pipe).from_pipe(self.pair.cloud.pipe, unet=unet)
        args, power = self.args, self.pair.cloud.default_timestep_power
        return collect_trajectories(pipe, prompts, args.sampling_steps, self.guidance, args.seed, timestep_power=power)

    @property
    def guidance(self) -> float:
        """The guidance scale of the generations: ``--guidance``, else the one the pair serves at."""
        return self.pair.cloud.default_guidance_scale if self.args.guidance is None else self.args.guidance

    def start(self, action: str, **record):
        """The output bundle, with this action appended to its history."""
        from hybrid_sd.bundle import start_bundle

        bundle = start_bundle(self.args.out, self.source_bundle)
        bundle.history.append({"action": action, **record})
        return bundle

    def finish(self, bundle, card: dict) -> None:
        """Write the bundle's records, the action's wall time (loading included) in its history, and print
        the card."""
        bundle.history[-1]["seconds"] = round(time.monotonic() - self.started, 1)
        bundle.write(card)
        print(json.dumps({key: value for key, value in card.items() if key != "kept_in_float"}))


def check_float_source(args: argparse.Namespace, verb: str) -> None:
    """Refuse to start from a quantized bundle: low-bit layers neither train nor quantize again."""
    from hybrid_sd.bundle import read_bundle
    from hybrid_sd.lowbit.storage import QUANTIZATION_FILE

    if args.edge_bundle is not None and (read_bundle(args.edge_bundle).unet / QUANTIZATION_FILE).is_file():
        raise ValueError(f"--edge-bundle holds a quantized UNet: {verb} the float model, then quantize it")


def copy_unet(source, bundle) -> None:
    """Carry ``source``'s UNet, with the calibration record that describes its layers, into ``bundle``."""
    shutil.copytree(source.unet, bundle.unet)
    calibration = source.path / CALIBRATION_FILE
    if calibration.is_file():
        shutil.copy(calibration, bundle.path / CALIBRATION_FILE)


def calls_by_step(trajectories) -> list:
    """The recorded UNet inputs as one :class:`Calibration` per sampling step (all prompts together)."""
    import torch

    steps = trajectories.step.unique()
    return [trajectories.batch(torch.nonzero(trajectories.step == step).flatten()) for step in steps]


def spread_rows(trajectories, count: int) -> list[int]:
    """``count`` row indices spread evenly over the trajectories (and so over the timesteps)."""
    import torch

    return torch.linspace(0, len(trajectories) - 1, min(count, len(trajectories))).round().long().tolist()


def run_prune(args: argparse.Namespace) -> None:
    from compression.card import size_card
    from compression.prune import count_macs, count_params, prune_channels, prune_widths, remove_blocks
    from hybrid_sd.pruned.storage import save_pruned

    if not 0 < args.budget <= 1:
        raise ValueError(f"--budget must be a fraction in (0, 1], got {args.budget}")
    if args.calibration_rows < 1:
        raise ValueError(f"--calibration-rows must be at least 1, got {args.calibration_rows}")
    prompts = read_prompts(args.prompts)
    context = _Context(args)
    unet = context.source_unet()
    calibration = context.trajectories(unet, prompts)
    calibration = calibration.batch(spread_rows(calibration, args.calibration_rows))
    measure = count_params if args.metric == "params" else (lambda model: count_macs(model, calibration))
    source_cost = measure(unet)
    student = unet
    if args.layers_per_block is not None or args.remove_mid_block:
        student = remove_blocks(unet, args.layers_per_block, args.remove_mid_block)
    removed_units = width_ratio = 0
    channel_budget = args.budget * source_cost / measure(student)
    if channel_budget < 1 and args.widths:
        student, width_report = prune_widths(student, channel_budget, calibration, args.metric)
        width_ratio = round(width_report.ratio, 4)
    elif channel_budget < 1:
        student, report = prune_channels(student, channel_budget, calibration, args.metric)
        removed_units = len(report.removed)
    bundle = context.start(
        "prune",
        budget=args.budget,
        metric=args.metric,
        layers_per_block=args.layers_per_block,
        remove_mid_block=args.remove_mid_block,
        widths=args.widths,
        removed_units=removed_units,
        width_ratio=width_ratio,
    )
    save_pruned(student, bundle.unet)
    card = size_card(bundle, student, {"source_" + args.metric: source_cost, args.metric: measure(student)})
    context.finish(bundle, card)


def run_distill(args: argparse.Namespace) -> None:
    import torch

    from compression.card import size_card
    from compression.distill import DistillConfig, distill_unet
    from hybrid_sd.pairs import load_unet
    from hybrid_sd.pruned.storage import save_pruned

    if args.edge_bundle is None:
        raise ValueError("--edge-bundle (the student to distil) is required")
    check_float_source(args, "distil")
    prompts = read_prompts(args.prompts)
    config = DistillConfig(
        steps=args.train_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        feature_weight=args.feature_weight,
        from_step=args.from_step,
        seed=args.seed,
    )
    context = _Context(args)
    if args.teacher == "cloud":
        teacher = context.pair.cloud.pipe.unet.float()
    else:  # the pair's own edge UNet; the loaded pair's edge is the bundle's
        teacher = load_unet(named_pair(args).edge, torch.float32)
    student = context.pair.edge.pipe.unet.float().train()
    data = context.trajectories(teacher, prompts)
    stats = distill_unet(teacher, student, data, config)
    bundle = context.start(
        "distill", teacher=args.teacher, prompts=len(data.prompts), guidance=context.guidance, **asdict(config)
    )
    save_pruned(student, bundle.unet)
    card = size_card(bundle, student, {"distillation": stats})
    context.finish(bundle, card)


def run_quantize(args: argparse.Namespace) -> None:
    from compression.card import carried_card, unet_cost
    from hybrid_sd.lowbit import QuantConfig, quantize_model
    from hybrid_sd.lowbit.storage import save_quantized_unet

    config = QuantConfig(
        weight_bits=args.weight_bits,
        activation_bits=args.activation_bits,
        group_size=args.group_size,
        symmetric=not args.asymmetric,
        skip=tuple(args.skip),
        kernel=args.kernel,
    )
    if args.prompts is not None and config.kernel != "onednn":
        raise ValueError("--prompts (calibration of static activation scales) needs --kernel onednn")
    check_float_source(args, "quantize")
    prompts = None if args.prompts is None else read_prompts(args.prompts)
    context = _Context(args)
    unet = context.source_unet()
    bundle = context.start("quantize", **asdict(config), calibrated=args.prompts is not None)
    cost = unet_cost(unet)  # of the float architecture, before its layers are swapped
    choices = None
    if prompts is not None:
        from compression.quantize import calibrate, choices_to_dict

        trajectories = context.trajectories(unet, prompts)
        report, choices = calibrate(unet, calls_by_step(trajectories), config, args.max_error, args.min_speedup)
    else:
        report = quantize_model(unet, config)
    save_quantized_unet(unet, config, report, bundle.unet)
    if choices is not None:
        (bundle.path / CALIBRATION_FILE).write_text(json.dumps(choices_to_dict(choices), indent=2) + "\n")
    card = {
        **cost,
        **carried_card(bundle),
        "mode": config.mode,
        "kernel": config.kernel,
        "quantized_layers": len(report.quantized),
        "kept_in_float": report.kept,
        "weight_bytes_fp16": report.fp16_bytes,
        "weight_bytes_packed": report.packed_bytes,
    }
    context.finish(bundle, card)


def run_tiny_vae(args: argparse.Namespace) -> None:
    from compression.card import carried_card, size_card
    from compression.distill import TinyVaeConfig, default_tiny, distill_tiny_vae

    config = TinyVaeConfig(
        steps=args.train_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, encoder=args.encoder
    )
    if args.width < 1:
        raise ValueError(f"--width must be at least 1, got {args.width}")
    prompts = read_prompts(args.prompts)
    context = _Context(args)
    cloud = context.pair.cloud
    latents = context.trajectories(cloud.pipe.unet, prompts).final_latents
    tiny, stats = distill_tiny_vae(cloud.pipe.vae.float(), latents, config, default_tiny(cloud.pipe.vae, args.width))
    bundle = context.start("tiny-vae", **asdict(config), width=args.width, latents=len(latents))
    bundle.vae_latent_space = cloud.latent_space
    if context.source_bundle is not None:
        copy_unet(context.source_bundle, bundle)
        card = context.source_bundle.card
    else:
        unet = context.source_unet()
        unet.save_pretrained(bundle.unet)
        card = size_card(bundle, unet)
    tiny.save_pretrained(bundle.path / "vae")
    card = {**card, **carried_card(bundle), "tiny_vae_distillation": stats}
    context.finish(bundle, card)


def run_export(args: argparse.Namespace) -> None:
    import torch

    from compression.card import carried_card, measure_quality
    from hybrid_sd.pairs import load_pair
    from hybrid_sd.pipeline import HybridPipeline
    from hybrid_sd.shapes_pair.evaluate import HeldoutSet

    if args.edge_bundle is None:
        raise ValueError("--edge-bundle (the bundle to export) is required")
    switch_steps = [int(k) for k in args.switch_steps.split(",")]
    if any(not 0 <= k <= args.sampling_steps for k in switch_steps):
        raise ValueError(f"--switch-steps must lie in [0, --sampling-steps={args.sampling_steps}], got {switch_steps}")
    prompts = read_prompts(args.prompts)
    heldout = HeldoutSet(len(prompts)) if args.prompts.startswith("shapes:") else None
    context = _Context(args)
    device, dtype = args.device or "cpu", getattr(torch, args.dtype)
    reference = HybridPipeline(load_pair(named_pair(args), device, dtype))
    compressed = HybridPipeline(context.pair)
    quality = measure_quality(reference, compressed, prompts, switch_steps, args.sampling_steps, heldout, args.seed)
    bundle = context.start("export", prompts=len(prompts), switch_steps=switch_steps)
    copy_unet(context.source_bundle, bundle)
    card = {**context.source_bundle.card, **carried_card(bundle), "quality": quality}
    context.finish(bundle, card)
