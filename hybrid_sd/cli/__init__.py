"""The ``hybrid-sd`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from importlib.metadata import entry_points

from hybrid_sd.cli.arguments import check_tokens
from hybrid_sd.cli.bench import add_bench_command
from hybrid_sd.cli.generate import add_generate_command
from hybrid_sd.cli.health import add_health_command
from hybrid_sd.cli.sweep import add_sweep_command
from hybrid_sd.cli.train import add_train_commands
from hybrid_sd.errors import NonFiniteLatentsError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybrid-sd", description=__doc__)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log at INFO level; show the traceback of an error too"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_generate_command(commands)
    add_health_command(commands)
    add_sweep_command(commands)
    add_bench_command(commands)
    add_train_commands(commands)
    for plugin in entry_points(group="hybrid_sd.commands"):  # serve and cluster (services), compress (compression)
        plugin.load()(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # Read when they load, if they do (gRPC's C core: its fork and connection messages).
        for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY", "GRPC_VERBOSITY"):
            os.environ.setdefault(variable, "error")
    try:
        check_tokens(args)
        args.handler(args)
    except KeyboardInterrupt:  # Ctrl-C: the command stops, no traceback
        return 130
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
