"""``hybrid-sd compress quantize``: an edge UNet with low-bit weights, written as a folder the engine and the
edge worker load as ``--edge-model`` (with a ``card.json`` of its size and cost)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_compress_command(commands: argparse._SubParsersAction) -> None:
    """Add ``compress`` (with its ``quantize`` action) to the ``hybrid-sd`` subcommands."""
    compress = commands.add_parser("compress", help="turn an edge model into a smaller, faster one")
    actions = compress.add_subparsers(dest="action", required=True)
    quantize = actions.add_parser("quantize", help="low-bit weights (W2-W8), int8 or float activations")
    quantize.add_argument("--unet", required=True, help="UNet folder (or a pipeline folder with unet/) to quantize")
    quantize.add_argument("--weight-bits", type=int, default=8)
    quantize.add_argument("--activation-bits", type=int, default=8, help="8 (int8 GEMMs) or 16 (float)")
    quantize.add_argument("--group-size", type=int, help="weights per scale along the input (default: per channel)")
    quantize.add_argument("--asymmetric", action="store_true", help="zero points as well as scales")
    quantize.add_argument("--skip", action="append", default=[], help="module name pattern to keep in float")
    quantize.add_argument("--out", type=Path, required=True, help="folder to write the quantized UNet to")
    quantize.set_defaults(handler=run_quantize)


def run_quantize(args: argparse.Namespace) -> None:
    import json

    import torch

    from hybrid_sd.lowbit import QuantConfig, quantize_model
    from hybrid_sd.lowbit.storage import save_quantized_unet
    from hybrid_sd.pairs import load_unet

    config = QuantConfig(
        weight_bits=args.weight_bits,
        activation_bits=args.activation_bits,
        group_size=args.group_size,
        symmetric=not args.asymmetric,
        skip=tuple(args.skip),
    )
    unet = load_unet(args.unet, torch.float32)
    report = quantize_model(unet, config)
    save_quantized_unet(unet, config, report, args.out)
    card = {
        "source": args.unet,
        "mode": config.mode,
        "quantized_layers": len(report.quantized),
        "kept_in_float": report.kept,
        "weight_bytes_fp16": report.fp16_bytes,
        "weight_bytes_packed": report.packed_bytes,
        "file_bytes": sum(path.stat().st_size for path in args.out.glob("*.safetensors")),
    }
    (args.out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card))
