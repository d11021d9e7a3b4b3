"""``hybrid-sd train-shapes`` and ``hybrid-sd evaluate-shapes``: train the embedded shapes pair from nothing,
measure it, and write its model card."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from hybrid_sd.cli.arguments import quiet_libraries
from hybrid_sd.shapes_pair.train_config import PRECISIONS, SCHEDULES, TEXT_ENCODERS, TrainConfig  # data: no torch

# The TrainConfig fields whose values are names to choose from.
FIELD_CHOICES = {"precision": PRECISIONS, "schedule": tuple(SCHEDULES), "text_encoder": tuple(TEXT_ENCODERS)}


def add_train_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``train-shapes`` and ``evaluate-shapes`` to the ``hybrid-sd`` subcommands."""
    train = commands.add_parser("train-shapes", help="train the shapes pair (seeded), evaluate it, write its card")
    train.add_argument("--out", type=Path, required=True, help="folder for the pair (cloud/, edge-unet/, edge-vae/)")
    for field in fields(TrainConfig):
        flag = f"--{field.name.replace('_', '-')}"
        if isinstance(field.default, bool):  # --flag / --no-flag: bool("False") would be true
            train.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        else:
            train.add_argument(
                flag, type=type(field.default), default=field.default, choices=FIELD_CHOICES.get(field.name)
            )
    train.add_argument("--device", default="cpu", help="where to train: cpu, cuda or cuda:N (default: cpu)")
    train.add_argument(
        "--checkpoints", type=Path, help="folder for stage checkpoints, written every --checkpoint-minutes"
    )
    train.add_argument("--checkpoint-minutes", type=float, default=5.0, help="minutes between checkpoints")
    train.add_argument("--resume", action="store_true", help="continue the stopped run in --checkpoints")
    train.add_argument(
        "--cloud-only",
        action="store_true",
        help="stop after the large UNet: write cloud/ and training.json, for an edge that hybrid-sd compress makes"
        " (scripts/make_shapes_pair.sh); no evaluation",
    )
    add_evaluation_arguments(train, sweep_required=False)
    train.set_defaults(handler=run_train)

    evaluate = commands.add_parser("evaluate-shapes", help="measure a trained shapes pair and rewrite its model card")
    evaluate.add_argument("--pair", type=Path, required=True, help="a folder written by train-shapes")
    add_evaluation_arguments(evaluate, sweep_required=True)
    evaluate.set_defaults(handler=run_evaluate)


def add_evaluation_arguments(parser: argparse.ArgumentParser, sweep_required: bool) -> None:
    parser.add_argument(
        "--sweep-out",
        type=Path,
        required=sweep_required,
        help="folder for the evaluation sweep (resumable)" + ("" if sweep_required else "; not with --cloud-only"),
    )
    parser.add_argument("--eval-prompts", type=int, default=64, help="held-out captions to evaluate on")


def run_train(args: argparse.Namespace) -> None:
    from hybrid_sd.user_files import output_folder

    config = TrainConfig(**{field.name: getattr(args, field.name) for field in fields(TrainConfig)})
    output_folder(args.out)  # all before an hour of training
    if args.cloud_only:
        if args.sweep_out is not None:
            raise ValueError("--sweep-out: not with --cloud-only, which evaluates nothing (see evaluate-shapes)")
    elif args.sweep_out is None:
        raise ValueError("--sweep-out: required (the folder of the evaluation sweep) unless --cloud-only")
    else:
        output_folder(args.sweep_out, "--sweep-out")
    if args.checkpoint_minutes <= 0:
        raise ValueError(f"--checkpoint-minutes: must be positive, got {args.checkpoint_minutes}")
    from hybrid_sd.devices import check_device
    from hybrid_sd.shapes_pair.checkpoints import Checkpoints
    from hybrid_sd.shapes_pair.train_pair import train

    check_device(args.device)
    checkpoints = Checkpoints(args.checkpoints, 60 * args.checkpoint_minutes)
    train(args.out, config, args.device, checkpoints, args.resume, args.cloud_only)
    if args.cloud_only:
        print(f"cloud model: {args.out / 'cloud'} (make its edge with hybrid-sd compress: scripts/make_shapes_pair.sh)")
    else:
        _evaluate(args.out, args)


def run_evaluate(args: argparse.Namespace) -> None:
    from hybrid_sd.user_files import output_folder

    output_folder(args.sweep_out, "--sweep-out")
    _evaluate(args.pair, args)


def _evaluate(pair: Path, args: argparse.Namespace) -> None:
    from hybrid_sd.shapes_pair.evaluate import evaluate
    from hybrid_sd.shapes_pair.model_card import write_model_card

    quiet_libraries(args)
    evaluate(pair, args.sweep_out, args.eval_prompts)
    print(f"model card: {write_model_card(pair)}")
