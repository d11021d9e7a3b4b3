"""``hybrid-sd bench load``: an open-loop load benchmark of a live server (hybrid_sd/load_bench.py)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hybrid_sd.cli.arguments import add_remote_arguments, add_timestep_power_argument, read_prompts

if TYPE_CHECKING:
    from hybrid_sd.load_bench import LoadPlan, Outcome


def add_bench_command(commands: argparse._SubParsersAction) -> None:
    """Add ``bench`` and its benchmarks to the ``hybrid-sd`` subcommands."""
    bench = commands.add_parser("bench", help="benchmarks of a live server")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True)
    load = benchmarks.add_parser(
        "load",
        help="open-loop Poisson arrivals at one or several rates: latency, throughput, goodput, chosen k",
        description="Send requests at Poisson arrival times whatever the server answers; write results.csv (one row"
        " a request), summary.json (per rate) and, for several rates, plots against rate into --out.",
    )
    rates = load.add_mutually_exclusive_group(required=True)
    rates.add_argument("--rate", help="arrivals per second")
    rates.add_argument("--rates", help="comma-separated arrival rates, run one after another, e.g. 1,2,4,8")
    load.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals at each rate (default: 30)")
    load.add_argument("--max-requests", type=int, help="at most this many requests at each rate")
    load.add_argument(
        "--grace",
        type=float,
        default=60.0,
        help="seconds to await the answers in flight once arrivals end (default: 60); those left are CANCELLED",
    )
    load.add_argument(
        "--policy",
        required=True,
        help="the switch step: cloud (all steps on the cloud), edge (none), fixed:K, or auto (the server chooses)",
    )
    load.add_argument(
        "--latency-target",
        type=float,
        help="end-to-end seconds: what auto aims for (required with it), and the bound goodput counts within",
    )
    load.add_argument(
        "--prompts",
        required=True,
        help="text file, one prompt per non-empty line (used in turn); or shapes:N: captions of the shapes pair",
    )
    load.add_argument("--seed", type=int, default=0, help="seed of the arrival times; request i gets seed + i")
    load.add_argument("--steps", type=int, default=25, help="denoising steps of each request (default: 25)")
    load.add_argument("--width", type=int, help="default: the edge model's native size")
    load.add_argument("--height", type=int, help="default: the edge model's native size")
    load.add_argument("--scheduler", help="scheduler class name or alias (default: the edge model's own)")
    load.add_argument(
        "--guidance",
        type=float,
        help="classifier-free guidance scale (default: the pair's own; 7.5 for Stable Diffusion)",
    )
    add_timestep_power_argument(load)
    load.add_argument("--out", type=Path, required=True, help="folder for results.csv, summary.json and plots")
    add_remote_arguments(load.add_argument_group("server (gRPC calls to a gateway or an edge worker)"), required=True)
    load.set_defaults(handler=run_load_bench)


def parse_rates(args: argparse.Namespace) -> list[float]:
    """``--rate`` or ``--rates`` as distinct positive rates; a ValueError naming the flag otherwise."""
    if args.rate is not None:
        flag, text, what = "--rate", args.rate, "a positive number"
    else:
        flag, text, what = "--rates", args.rates, "a comma-separated list of positive numbers"
    try:
        rates = [float(item) for item in text.split(",")]
    except ValueError:
        rates = []
    valid = bool(rates) and all(math.isfinite(rate) and rate > 0 for rate in rates)
    if not valid or (flag == "--rate" and len(rates) > 1):
        raise ValueError(f"{flag} must be {what} (requests per second), got {text!r}")
    if len(set(rates)) != len(rates):
        raise ValueError(f"{flag} must not repeat a rate, got {text!r}")
    return rates


def check_options(args: argparse.Namespace) -> None:
    """Durations, the target and the request bound must be positive where given."""
    from hybrid_sd.load_bench import check_positive

    for name in ("duration", "grace", "latency_target", "timeout", "max_requests"):
        if getattr(args, name) is not None:
            check_positive("--" + name.replace("_", "-"), getattr(args, name))


def run_load_bench(args: argparse.Namespace) -> None:
    """Validate every flag, run the rates against ``--target``, and write the report (on Ctrl-C, what it has)."""
    rates = parse_rates(args)
    check_options(args)
    from hybrid_sd.load_bench import LoadPlan, parse_policy
    from hybrid_sd.request import GenerationRequest
    from hybrid_sd.user_files import output_folder

    template = GenerationRequest(
        prompt="",
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        timestep_power=args.timestep_power,
        width=args.width,
        height=args.height,
        scheduler=args.scheduler,
        seed=args.seed,
    )
    policy = parse_policy(args.policy, args.steps, args.latency_target)
    policy.request(template).check()
    prompts = read_prompts(args.prompts)
    output_folder(args.out)
    plan = LoadPlan(rates, args.duration, args.max_requests, args.grace, args.seed, policy, prompts, template)
    summary = run_and_report(plan, args)
    print(format_table(summary))


def run_and_report(plan: LoadPlan, args: argparse.Namespace) -> dict:
    """Run ``plan`` against ``--target`` and write the report into ``--out``, also of a run cut short by
    Ctrl-C (which then goes on up); returns the summary."""
    import asyncio

    from hybrid_sd.load_bench import run_remote
    from hybrid_sd.load_report import write_report

    outcomes: list[Outcome] = []
    finished = False
    try:
        asyncio.run(run_remote(plan, args.target, outcomes, args.token, args.tls_ca, args.timeout))
        finished = True
    finally:
        settings = {
            "target": args.target,
            "policy": args.policy,
            "duration_s": args.duration,
            "max_requests": args.max_requests,
            "grace_s": args.grace,
            "steps": args.steps,
            "timestep_power": args.timestep_power,
            "seed": args.seed,
            "prompts": len(plan.prompts),
            "interrupted": not finished,
        }
        summary = write_report(args.out, settings, plan.rates, outcomes, args.latency_target)
        print(f"wrote {args.out}/" + ("" if finished else " (interrupted: the requests sent so far)"), file=sys.stderr)
    return summary


# The columns of the table printed at the end: header, summary key, format (of a value that is not None).
TABLE = (
    ("rate", "rate", "g"),
    ("sent", "sent", "d"),
    ("ok", "completed", "d"),
    ("rps", "throughput_rps", ".2f"),
    ("goodput", "goodput", ".0%"),
    ("p50_s", "latency_p50_s", ".3f"),
    ("p95_s", "latency_p95_s", ".3f"),
    ("k", "mean_switch_step", ".1f"),
)


def format_table(summary: dict) -> str:
    """One line per rate: sent, OK, throughput, goodput, p50/p95 latency, mean k and the errors."""
    lines = [" ".join(f"{header:>8}" for header, _, _ in TABLE) + "  errors"]
    for entry in summary["rates"]:
        cells = ["-" if entry[key] is None else format(entry[key], form) for _, key, form in TABLE]
        errors = ", ".join(f"{status} {count}" for status, count in entry["errors"].items()) or "-"
        lines.append(" ".join(f"{cell:>8}" for cell in cells) + f"  {errors}")
    return "\n".join(lines)
