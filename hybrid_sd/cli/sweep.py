"""``hybrid-sd sweep``: quality, latency and cloud cost of every switch step over prompts and seeds."""

from __future__ import annotations

import argparse
from pathlib import Path

from hybrid_sd.cli.arguments import (
    add_model_arguments,
    add_remote_arguments,
    add_timestep_power_argument,
    local_pair_spec,
    read_prompts,
)


def add_sweep_command(commands: argparse._SubParsersAction) -> None:
    """Add ``sweep`` to the ``hybrid-sd`` subcommands."""
    sweep = commands.add_parser("sweep", help="generate every (prompt, seed, switch step) and report quality and cost")
    sweep.add_argument(
        "--switch-steps",
        required=True,
        help="comma-separated switch steps, e.g. 0,2,4 (k = --steps, the large model alone, is always added)",
    )
    sweep.add_argument(
        "--prompts",
        required=True,
        help="text file, one prompt per non-empty line; or shapes:N, shapes-train:N: captions of the shapes pair",
    )
    sweep.add_argument("--seeds", required=True, help="comma-separated seeds, e.g. 0,1,2")
    sweep.add_argument("--steps", type=int, default=25, help="denoising steps in all (default: 25)")
    sweep.add_argument("--scheduler", help="scheduler class name or alias (default: the edge model's own)")
    sweep.add_argument(
        "--guidance",
        type=float,
        help="classifier-free guidance scale (default: the pair's own; 7.5 for Stable Diffusion)",
    )
    add_timestep_power_argument(sweep)
    sweep.add_argument("--out", type=Path, required=True, help="folder for results, plots and report (resumable)")
    add_model_arguments(sweep)
    remote = sweep.add_argument_group("remote (with --target: gRPC calls to a gateway or an edge worker)")
    add_remote_arguments(remote)
    sweep.set_defaults(handler=run_sweep_command)


def parse_int_list(flag: str, text: str) -> list[int]:
    """A comma-separated list of integers; ValueError naming ``flag`` otherwise."""
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} must be a comma-separated list of integers, got {text!r}") from None


def run_sweep_command(args: argparse.Namespace) -> None:
    """Validate the grid, build the runner, sweep, and print where the report is and a per-k table."""
    from hybrid_sd.user_files import output_folder

    switch_steps = parse_int_list("--switch-steps", args.switch_steps)
    seeds = parse_int_list("--seeds", args.seeds)
    prompts = read_prompts(args.prompts)
    output_folder(args.out)
    # Heavy imports here, after the files are checked: building the parser stays fast, and a mistake is told at once.
    from hybrid_sd.sweep import SweepConfig, remote_runner, run_sweep

    config = SweepConfig(
        switch_steps=switch_steps,
        prompts=prompts,
        seeds=seeds,
        num_inference_steps=args.steps,
        scheduler=args.scheduler,
        guidance_scale=args.guidance,
        out=args.out,
        timestep_power=args.timestep_power,
    )
    if args.target:
        runner = remote_runner(args.target, args.token, args.tls_ca, args.timeout, args.pair)
    else:
        import torch

        from hybrid_sd.pipeline import HybridPipeline

        pipeline = HybridPipeline.from_pair(local_pair_spec(args), args.device or "cpu", getattr(torch, args.dtype))
        runner = pipeline
    summary = run_sweep(config, runner)
    print(f"wrote {args.out / 'report.md'}")
    print(format_table(summary))


def format_table(summary: dict) -> str:
    """One line per k: n, cloud share, mean adherence, SSIM and total latency."""

    def mean(metrics: dict, column: str, digits: int) -> str:
        return f"{metrics[column]['mean']:.{digits}f}" if metrics.get(column) else "-"

    lines = [f"{'k':>4} {'n':>4} {'cloud':>6} {'adherence':>9} {'ssim':>6} {'total_s':>8}"]
    for k, entry in summary["switch_steps"].items():
        metrics = entry["metrics"]
        lines.append(
            f"{k:>4} {entry['n']:>4} {entry['cloud_fraction']:>6.0%} {mean(metrics, 'adherence', 3):>9} "
            f"{mean(metrics, 'ssim', 3):>6} {mean(metrics, 't_total_s', 3):>8}"
        )
    return "\n".join(lines)
