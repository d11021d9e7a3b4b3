"""Per-layer-shape speed of float32, bf16 and the W8A8 int8 path (``torch._int_mm``) on the CPU.

Shapes are those of an SD 1.5 UNet at 256x256 and 512x512 images (32x32 and 64x64 latents):
attention projections, the GEGLU feed-forward and cross-attention keys and values as Linear layers
over the tokens of one image, and 3x3 ResNet convolutions (im2col on the int8 path). Each case
times, interleaved and repeated, medians reported:

- ``fp32``: ``nn.Linear`` / ``nn.Conv2d`` on float32;
- ``bf16``: the same layer cast to bf16 on bf16 input (channels-last for convs);
- ``w8a8``: ``QuantLinear`` / ``QuantConv2d`` W8A8 (the portable ``int_mm`` kernel), per-channel
  weights, float32 in and out, so dynamic per-token activation quantization and the im2col are counted;
- ``onednn``, ``onednn_static``: ``OneDnnLinear`` / ``OneDnnConv2d`` on PyTorch's oneDNN int8 kernels,
  float32 in and out, activation scale measured per call or fixed (calibrated);
- ``int_mm``: the bare int8 GEMM of the same shape, the ceiling of the int8 path.

    .venv/bin/python benchmarks/int8_kernels.py [--quick] [--repeats 20] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from hybrid_sd.lowbit import QuantConfig, QuantConv2d, QuantLinear
from hybrid_sd.lowbit.onednn import OneDnnConv2d, OneDnnLinear

try:  # run as a script, benchmarks/ is on sys.path; as ``python -m benchmarks.int8_kernels``, the root is
    from reporting import interleaved_times
except ModuleNotFoundError:
    from benchmarks.reporting import interleaved_times

ONEDNN = QuantConfig(8, 8, kernel="onednn")
METHODS = ("fp32", "bf16", "w8a8", "onednn", "onednn_static", "int_mm")

# (name, tokens, in, out): tokens of one image at the UNet level where the layer runs.
LINEAR_SHAPES = [
    ("256px attn 320", 1024, 320, 320),
    ("256px ff-in 320", 1024, 320, 2560),
    ("256px ff-out 320", 1024, 1280, 320),
    ("256px attn 640", 256, 640, 640),
    ("256px ff-in 640", 256, 640, 5120),
    ("256px ff-out 640", 256, 2560, 640),
    ("cross-attn k/v 768->320", 77, 768, 320),
    ("512px attn 320", 4096, 320, 320),
    ("512px ff-in 320", 4096, 320, 2560),
    ("512px ff-out 320", 4096, 1280, 320),
    ("512px attn 640", 1024, 640, 640),
    ("512px ff-in 640", 1024, 640, 5120),
    ("512px ff-out 640", 1024, 2560, 640),
    ("512px attn 1280", 256, 1280, 1280),
]
# (name, channels in, channels out, latent side) for 3x3 convolutions with padding 1.
CONV_SHAPES = [
    ("256px conv3x3 320", 320, 320, 32),
    ("256px conv3x3 640", 640, 640, 16),
    ("256px conv3x3 1280", 1280, 1280, 8),
    ("512px conv3x3 320", 320, 320, 64),
    ("512px conv3x3 640", 640, 640, 32),
    ("512px conv3x3 1280", 1280, 1280, 16),
]
QUICK_LINEAR = {"256px attn 320", "256px ff-out 320"}
QUICK_CONV = {"256px conv3x3 640"}


def linear_case(tokens: int, in_features: int, out_features: int) -> dict[str, Callable[[], object]]:
    layer = nn.Linear(in_features, out_features)
    x = torch.randn(tokens, in_features)
    layer_bf16, x_bf16 = nn.Linear(in_features, out_features).to(torch.bfloat16), x.to(torch.bfloat16)
    quantized = QuantLinear.from_float(layer, QuantConfig(8, 8))
    onednn, onednn_static = (OneDnnLinear.from_float(layer, ONEDNN) for _ in range(2))
    onednn_static.set_input_range(x.min().item(), x.max().item())
    a = torch.randint(-127, 128, (tokens, in_features), dtype=torch.int8)
    b = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8)
    return {
        "fp32": lambda: layer(x),
        "bf16": lambda: layer_bf16(x_bf16),
        "w8a8": lambda: quantized(x),
        "onednn": lambda: onednn(x),
        "onednn_static": lambda: onednn_static(x),
        "int_mm": lambda: torch._int_mm(a, b.t()),
    }


def conv_case(in_channels: int, out_channels: int, side: int) -> dict[str, Callable[[], object]]:
    layer = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    x = torch.randn(1, in_channels, side, side)
    layer_bf16 = nn.Conv2d(in_channels, out_channels, 3, padding=1).to(
        torch.bfloat16, memory_format=torch.channels_last
    )
    x_bf16 = x.to(torch.bfloat16, memory_format=torch.channels_last)
    quantized = QuantConv2d.from_float(layer, QuantConfig(8, 8))
    onednn, onednn_static = (OneDnnConv2d.from_float(layer, ONEDNN) for _ in range(2))
    onednn_static.set_input_range(x.min().item(), x.max().item())
    a = torch.randint(-127, 128, (side * side, in_channels * 9), dtype=torch.int8)
    b = torch.randint(-127, 128, (out_channels, in_channels * 9), dtype=torch.int8)
    return {
        "fp32": lambda: layer(x),
        "bf16": lambda: layer_bf16(x_bf16),
        "w8a8": lambda: quantized(x),
        "onednn": lambda: onednn(x),
        "onednn_static": lambda: onednn_static(x),
        "int_mm": lambda: torch._int_mm(a, b.t()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="three shapes, three repeats: a smoke run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/int8_kernels.json"))
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    cases = [
        (name, f"{tokens}x{in_features}->{out_features}", linear_case(tokens, in_features, out_features))
        for name, tokens, in_features, out_features in LINEAR_SHAPES
        if not args.quick or name in QUICK_LINEAR
    ]
    cases += [
        (name, f"{side}x{side}x{in_channels}->{out_channels}", conv_case(in_channels, out_channels, side))
        for name, in_channels, out_channels, side in CONV_SHAPES
        if not args.quick or name in QUICK_CONV
    ]
    rows = []
    print(f"{'layer':26} {'shape':22}" + "".join(f" {method + ' ms':>16}" for method in METHODS), end="")
    print("".join(f" {method + ' x':>15}" for method in METHODS[1:]))
    for name, shape, candidates in cases:
        with torch.inference_mode():
            times = interleaved_times(candidates, repeats)
        medians = {key: statistics.median(values) for key, values in times.items()}
        row = {"layer": name, "shape": shape, **{f"{key}_ms": value * 1e3 for key, value in medians.items()}}
        row.update({f"{key}_speedup": medians["fp32"] / medians[key] for key in METHODS[1:]})
        rows.append(row)
        print(f"{name:26} {shape:22}" + "".join(f" {row[method + '_ms']:16.2f}" for method in METHODS), end="")
        print("".join(f" {row[method + '_speedup']:15.2f}" for method in METHODS[1:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": repeats, "rows": rows}
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
