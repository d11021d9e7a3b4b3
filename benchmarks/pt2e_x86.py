"""PT2E static int8 (torchao's ``X86InductorQuantizer`` lowered by ``torch.compile``) on the CPU against this
repo's eager oneDNN W8A8 and float32/bf16, on the 224M-parameter pruned SD 1.5 edge UNet at 256x256 (latent
32x32, batch 2, 77 text tokens): first-call (compile) time, steady step time (medians of interleaved repeats),
speed-up over float32 eager and error relative to it.

torchao is the optional ``pt2e`` extra (``.venv/bin/pip install -e '.[pt2e]'``); or, leaving the venv as it
is, install its wheel beside it and put that on the path:

    .venv/bin/pip download --no-deps torchao==0.18.0 -d /tmp/tao
    .venv/bin/pip install --no-deps --target /tmp/taosite /tmp/tao/torchao-0.18.0-*.whl
    PYTHONPATH=/tmp/taosite .venv/bin/python benchmarks/pt2e_x86.py --budget-s 1200

The PT2E recipe is the one of PyTorch's "PT2E quantization with X86 backend through Inductor" tutorial:
``torch.export``, ``prepare_pt2e``, calibration, ``convert_pt2e``, then ``torch.compile`` with inductor's
freezing on (its int8 weight-prepack and fusion passes run only on frozen graphs). Compiling on a small CPU
takes minutes: methods that no longer fit ``--budget-s`` are skipped and the reason recorded.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import diffusers
import torch
import torchao
from diffusers import UNet2DConditionModel
from torch import nn
from torch._dynamo.utils import counters
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
    X86InductorQuantizer,
    get_default_x86_inductor_quantization_config,
)

from compression.prune import count_params
from hybrid_sd.lowbit import QuantConfig, quantize_model

try:  # run as a script, benchmarks/ is on sys.path; as ``python -m benchmarks.pt2e_x86``, the root is
    from reporting import interleaved_times
    from sd_architectures import HYBRID_SD_PRUNED_PARAMS, SD15_UNET_CONFIG, bk_sdm_small, prune_to_params
except ModuleNotFoundError:
    from benchmarks.reporting import interleaved_times
    from benchmarks.sd_architectures import HYBRID_SD_PRUNED_PARAMS, SD15_UNET_CONFIG, bk_sdm_small, prune_to_params

RESULTS = Path(__file__).parent / "results" / "pt2e_x86.json"
BATCH, LATENT_SIDE, TEXT_TOKENS, TIMESTEP = 2, 32, 77, 500
CALIBRATION_TIMESTEPS = (999, 750, 500, 250, 1)
INDUCTOR_COUNTERS = ("qconv_weight_prepack_matcher_count", "qlinear_weight_prepack_matcher_count")

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class Method:
    """How to build one contender; ``freezing`` turns on inductor's freezing for its (compiling) first call."""

    build: Callable[[], nn.Module]
    inputs: Inputs
    compiled: bool = False
    freezing: bool = False


class SampleOnly(nn.Module):
    """The UNet's forward returning the predicted noise tensor, not a dataclass (what ``torch.export`` needs)."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, context, return_dict=False)[0]


def make_inputs(timestep: int, seed: int, dtype: torch.dtype = torch.float32) -> Inputs:
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(BATCH, 4, LATENT_SIDE, LATENT_SIDE, generator=generator)
    context = torch.randn(BATCH, TEXT_TOKENS, SD15_UNET_CONFIG["cross_attention_dim"], generator=generator)
    return sample.to(dtype), torch.full((BATCH,), timestep), context.to(dtype)


def pt2e(model: nn.Module, inputs: Inputs, dynamic: bool) -> nn.Module:
    """Exported, annotated by ``X86InductorQuantizer``, calibrated and converted. Dynamic activation scales
    still take one call: the weights' observers set their scales."""
    exported = torch.export.export(model, inputs).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_dynamic=dynamic))
    prepared = prepare_pt2e(exported, quantizer)
    for seed, timestep in enumerate(CALIBRATION_TIMESTEPS[:1] if dynamic else CALIBRATION_TIMESTEPS, start=1):
        prepared(*make_inputs(timestep, seed))
    return convert_pt2e(prepared)


def build_methods(model: nn.Module, inputs: Inputs) -> dict[str, Method]:
    """The contenders in priority order: what the budget skips comes last."""
    bf16_inputs = (inputs[0].bfloat16(), inputs[1], inputs[2].bfloat16())
    onednn = QuantConfig(weight_bits=8, activation_bits=8, kernel="onednn")

    def w8a8_onednn() -> nn.Module:
        quantized = copy.deepcopy(model)
        quantize_model(quantized, onednn)
        return quantized

    return {
        "fp32 eager": Method(lambda: model, inputs),
        "bf16 eager": Method(lambda: copy.deepcopy(model).to(torch.bfloat16), bf16_inputs),
        "W8A8 oneDNN eager (repo, dynamic)": Method(w8a8_onednn, inputs),
        "PT2E int8 static + inductor": Method(
            lambda: torch.compile(pt2e(model, inputs, dynamic=False)), inputs, compiled=True, freezing=True
        ),
        "fp32 inductor": Method(lambda: torch.compile(model), inputs, compiled=True),
        "PT2E int8 dynamic + inductor": Method(
            lambda: torch.compile(pt2e(model, inputs, dynamic=True)), inputs, compiled=True, freezing=True
        ),
    }


def timed_call(module: nn.Module, inputs: Inputs) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    output = module(*inputs)
    return time.perf_counter() - start, output.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed calls per method")
    parser.add_argument("--budget-s", type=float, default=1200.0, help="overall wall-clock budget")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pruned, info = prune_to_params(bk_sdm_small(UNet2DConditionModel(**SD15_UNET_CONFIG).eval()))
    model = SampleOnly(pruned).eval()
    print(f"pruned UNet: {count_params(model) / 1e6:.1f}M parameters ({time.perf_counter() - started:.0f}s to build)")
    inputs = make_inputs(TIMESTEP, seed=0)
    rows: dict[str, dict[str, Any]] = {}
    modules: dict[str, tuple[nn.Module, Inputs]] = {}
    with torch.no_grad():
        reference = model(*inputs)
        for name, method in build_methods(model, inputs).items():
            elapsed = time.perf_counter() - started
            compile_estimate = max((row["first_call_s"] for row in rows.values() if row["compiled"]), default=0.0)
            timing_estimate = args.repeats * sum(row["warm_call_s"] for row in rows.values())
            needed = (compile_estimate if method.compiled else 0.0) + timing_estimate
            if rows and elapsed + needed > args.budget_s:  # the float32 eager reference always runs
                rows[name] = {"skipped": f"budget: {elapsed:.0f}s spent, about {needed:.0f}s more needed"}
                print(f"{name}: skipped ({rows[name]['skipped']})")
                continue
            before = {key: counters["inductor"][key] for key in INDUCTOR_COUNTERS}
            start = time.perf_counter()
            module = method.build()
            prepare_s = time.perf_counter() - start
            with torch._inductor.config.patch(freezing=method.freezing):  # inductor compiles on the first call
                first_call_s, _ = timed_call(module, method.inputs)
            warm_call_s, output = timed_call(module, method.inputs)
            row = {
                "compiled": method.compiled,
                "freezing": method.freezing,
                "prepare_s": prepare_s,
                "first_call_s": first_call_s,
                "warm_call_s": warm_call_s,
                "rel_error": ((output - reference).norm() / reference.norm()).item(),
            }
            if method.compiled:
                row["inductor"] = {key: counters["inductor"][key] - before[key] for key in INDUCTOR_COUNTERS}
            rows[name] = row
            modules[name] = (module, method.inputs)
            print(f"{name}: prepared in {prepare_s:.1f}s, first call {first_call_s:.1f}s, then {warm_call_s:.2f}s")
        calls = {name: partial(module, *method_inputs) for name, (module, method_inputs) in modules.items()}
        times = interleaved_times(calls, args.repeats, warmup=0)
    base = statistics.median(times["fp32 eager"])
    for name, samples in times.items():
        rows[name].update(step_s=statistics.median(samples), steps_s=samples, speedup=base / statistics.median(samples))
    total_s = time.perf_counter() - started
    print(
        f"\npruned SD 1.5 UNet ({count_params(model) / 1e6:.1f}M), batch {BATCH}, latent {LATENT_SIDE}x{LATENT_SIDE},"
        f" {args.threads} threads, medians of {args.repeats} interleaved repeats; total {total_s:.0f}s"
    )
    print(f"{'method':<36} {'prepare s':>9} {'1st call s':>10} {'step s':>7} {'speed-up':>8} {'rel err':>8}")
    for name, row in rows.items():
        if "skipped" in row:
            print(f"{name:<36} skipped: {row['skipped']}")
            continue
        print(
            f"{name:<36} {row['prepare_s']:>9.1f} {row['first_call_s']:>10.1f} {row['step_s']:>7.3f}"
            f" {row['speedup']:>7.2f}x {row['rel_error']:>8.2e}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "torch": torch.__version__,
        "torchao": torchao.__version__,
        "diffusers": diffusers.__version__,
        "threads": args.threads,
        "repeats": args.repeats,
        "budget_s": args.budget_s,
        "total_s": total_s,
        "shape": {"batch": BATCH, "latent_side": LATENT_SIDE, "text_tokens": TEXT_TOKENS, "timestep": TIMESTEP},
        "calibration_timesteps": CALIBRATION_TIMESTEPS,
        "model": {"params": count_params(model), "target_params": HYBRID_SD_PRUNED_PARAMS, "pruning": info},
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
