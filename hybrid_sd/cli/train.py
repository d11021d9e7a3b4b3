"""``hybrid-sd train-shapes`` and ``hybrid-sd evaluate-shapes``: train the embedded shapes pair from nothing,
measure it, and write its model card."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from hybrid_sd.cli.arguments import quiet_libraries
from hybrid_sd.shapes_pair.train_config import TrainConfig  # data only: no torch


def add_train_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``train-shapes`` and ``evaluate-shapes`` to the ``hybrid-sd`` subcommands."""
    train = commands.add_parser("train-shapes", help="train the shapes pair (seeded, CPU), evaluate it, write its card")
    train.add_argument("--out", type=Path, required=True, help="folder for the pair (cloud/, edge-unet/, edge-vae/)")
    for field in fields(TrainConfig):
        train.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    add_evaluation_arguments(train)
    train.set_defaults(handler=run_train)

    evaluate = commands.add_parser("evaluate-shapes", help="measure a trained shapes pair and rewrite its model card")
    evaluate.add_argument("--pair", type=Path, required=True, help="a folder written by train-shapes")
    add_evaluation_arguments(evaluate)
    evaluate.set_defaults(handler=run_evaluate)


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sweep-out", type=Path, required=True, help="folder for the evaluation sweep (resumable)")
    parser.add_argument("--eval-prompts", type=int, default=64, help="held-out captions to evaluate on")


def run_train(args: argparse.Namespace) -> None:
    from hybrid_sd.user_files import output_folder

    config = TrainConfig(**{field.name: getattr(args, field.name) for field in fields(TrainConfig)})
    output_folder(args.out)  # both before an hour of training
    output_folder(args.sweep_out, "--sweep-out")
    from hybrid_sd.shapes_pair.train_pair import train

    train(args.out, config)
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
