"""Quantized edge UNets of the shapes pair against the float32 one: UNet call time (batch 2, interleaved,
medians), weight bytes, and quality of the edge alone (k = 0) and of the 40% hybrid on held-out captions.

    .venv/bin/python benchmarks/edge_quant.py --prompts 64 --repeats 30
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from functools import partial
from pathlib import Path

import torch

from hybrid_sd.lowbit import QuantConfig, quantize_model
from hybrid_sd.pipeline import HybridPipeline
from hybrid_sd.shapes_pair.evaluate import HeldoutSet

try:  # run as a script, benchmarks/ is on sys.path; as ``python -m benchmarks.edge_quant``, the root is
    from reporting import interleaved_times
except ModuleNotFoundError:
    from benchmarks.reporting import interleaved_times

STEPS = 20
RESULTS = Path(__file__).parent / "results" / "edge_quant.json"
METHODS = {
    "W8A8 per-channel": QuantConfig(weight_bits=8, activation_bits=8),
    "W8A16 per-channel": QuantConfig(weight_bits=8, activation_bits=16),
    "W4A16 group 32": QuantConfig(weight_bits=4, activation_bits=16, group_size=32, symmetric=False),
    "W4A8 group 32": QuantConfig(weight_bits=4, activation_bits=8, group_size=32, symmetric=False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    pipeline = HybridPipeline.from_pair("shapes")
    float_unet = pipeline.edge.pipe.unet
    unets = {"float32": float_unet}
    reports = {}
    for name, config in METHODS.items():
        unets[name] = copy.deepcopy(float_unet)
        reports[name] = quantize_model(unets[name], config)
    context = torch.randn(2, 32, float_unet.config.cross_attention_dim)
    inputs = (torch.randn(2, 4, 16, 16), torch.tensor([500, 500]), context)
    with torch.no_grad():
        times = interleaved_times({name: partial(unet, *inputs) for name, unet in unets.items()}, args.repeats, inner=5)
    heldout = HeldoutSet(args.prompts)
    rows = {}
    for name, unet in unets.items():
        pipeline.edge.pipe.unet = unet
        row = {"call_ms": 1000 * statistics.median(times[name])}
        if name in reports:
            row["weight_bytes_vs_fp16"] = reports[name].fp16_bytes / reports[name].packed_bytes
        for k in (0, round(0.4 * STEPS)):
            scores = heldout.score(heldout.generate(pipeline, k, STEPS))
            row[f"adherence_k{k}"] = scores["adherence"]["overall"]
            row[f"fd_k{k}"] = scores["frechet_distance"]
        rows[name] = row
    pipeline.edge.pipe.unet = float_unet
    base = rows["float32"]["call_ms"]
    print(f"shapes edge UNet, batch 2, {torch.get_num_threads()} threads, {args.repeats} interleaved repeats (medians)")
    print(
        f"{'method':<20} {'call ms':>8} {'speed-up':>9} {'bytes':>7}"
        f" {'adh k0':>7} {'FD k0':>6} {'adh k8':>7} {'FD k8':>6}"
    )
    for name, row in rows.items():
        ratio = row.get("weight_bytes_vs_fp16")
        smaller = "" if ratio is None else f"{ratio:.2f}x"
        print(
            f"{name:<20} {row['call_ms']:>8.2f} {base / row['call_ms']:>8.2f}x {smaller:>7}"
            f" {row['adherence_k0']:>7.3f} {row['fd_k0']:>6.1f} {row['adherence_k8']:>7.3f} {row['fd_k8']:>6.1f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"prompts": args.prompts, "steps": STEPS, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
