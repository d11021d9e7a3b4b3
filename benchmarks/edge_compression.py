"""Edge-side compression of SD 1.5 on the CPU: pruned UNets, int8 UNets, the tiny decoder and low-bit bytes.

Every model is randomly initialised from its config (no hub access; see ``benchmarks/sd_architectures.py``):
random weights time as trained ones do, and only the shapes matter here. A UNet batch of 2 is one
classifier-free-guidance step (77 text tokens, timestep 500); float32 unless named. Times are medians of
interleaved repeats (the order rotating every repeat) after one warm-up call each. Sections, each printed as
a table and written to ``--out`` (rewritten after every section):

1. pruned SD 1.5 at the Hybrid-SD 224M budget: the full SD 1.5 UNet, the BK-SDM-Small-like student
   (``remove_blocks``) and that student channel- and head-pruned to 224M parameters (``prune_channels`` with
   a weight-magnitude significance proxy), step time at 256x256 and 512x512, params and MACs
   (per UNet evaluation of one latent). Target: the 224M model at most 0.35x full SD 1.5's step time;
2. edge UNet int8 at 256x256: the 224M and BK-SDM-Small-like UNets in float32, bf16, W8A8 oneDNN with
   dynamic and with calibrated static activation scales (``compression.quantize.calibrate``, which also
   keeps in float any layer whose int8 form is slower or too wrong), and the portable W8A8 ``_int_mm``
   path; speed-up and relative output error against float32. Target: best quantized path >= 2x;
3. tiny decoder against AutoencoderKL at 512x512: SD VAE decode of a 1x4x64x64 latent against TAESD's
   (``AutoencoderTiny()``). Target: >= 10x;
4. bytes: the SD 1.5 UNet's Linear and Conv2d weights at fp16 against ``hybrid_sd.lowbit`` packed W8
   per-channel, W4 group 64 and W2 group 64 (scales and zero points included). Targets: W4 >= 3.5x,
   W2 >= 6x.

    .venv/bin/python benchmarks/edge_compression.py [--quick] [--repeats 5] [--threads 2]

About 7 minutes on 2 mostly idle cores (much longer when the cores are shared). ``--quick``: one repeat, 256x256
only (the decoder at 256x256 too), two calibration calls: a smoke run of about 1.5 minutes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import json
import platform
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from compression.prune import Calibration, count_macs, count_params
from compression.quantize import calibrate
from hybrid_sd.lowbit import PackedWeight, QuantConfig, quantize_model, quantize_weight
from hybrid_sd.lowbit.onednn import onednn_available

try:  # run as a script, benchmarks/ is on sys.path; as ``python -m benchmarks.edge_compression``, the root is
    from reporting import interleaved_times, print_table, relative_error
    from sd_architectures import (
        HYBRID_SD_PRUNED_PARAMS,
        SD15_UNET_CONFIG,
        SD_VAE_CONFIG,
        bk_sdm_small,
        prune_to_params,
    )
except ModuleNotFoundError:
    from benchmarks.reporting import interleaved_times, print_table, relative_error
    from benchmarks.sd_architectures import (
        HYBRID_SD_PRUNED_PARAMS,
        SD15_UNET_CONFIG,
        SD_VAE_CONFIG,
        bk_sdm_small,
        prune_to_params,
    )

CFG_BATCH, TEXT_TOKENS, TIMESTEP = 2, 77, 500
PRUNED, SMALL, FULL = "pruned-224M", "bk-sdm-small", "sd1.5"
STEP_RATIO_TARGET, INT8_SPEEDUP_TARGET, DECODER_TARGET = 0.35, 2.0, 10.0
BYTES_TARGETS = {"W4 g64": 3.5, "W2 g64": 6.0}
# (name, bits, group size, symmetric): W8 as the oneDNN and int_mm paths store it; W4/W2 asymmetric, so the
# packed zero points count too.
WEIGHT_FORMATS = (("W8 per-channel", 8, None, True), ("W4 g64", 4, 64, False), ("W2 g64", 2, 64, False))
CALIBRATION_TIMESTEPS = (999, 666, 333, 0)


# ------------------------------------------------------------------------------------------------ helpers


def time_interleaved(
    candidates: dict[str, Callable[[], object]], repeats: int, warmup: bool = True
) -> dict[str, dict[str, Any]]:
    """Median ms (and every run's) of each candidate, warmed up once, the order rotating every repeat."""
    with torch.inference_mode():
        times = interleaved_times(candidates, repeats, warmup=int(warmup))
    return {
        name: {"ms": statistics.median(runs) * 1e3, "runs_ms": [round(t * 1e3, 1) for t in runs]}
        for name, runs in times.items()
    }


def unet_inputs(side: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One CFG step's inputs, the same for every model and dtype."""
    generator = torch.Generator().manual_seed(side)
    sample = torch.randn(CFG_BATCH, SD15_UNET_CONFIG["in_channels"], side, side, generator=generator)
    context = torch.randn(CFG_BATCH, TEXT_TOKENS, SD15_UNET_CONFIG["cross_attention_dim"], generator=generator)
    return sample.to(dtype), torch.full((CFG_BATCH,), TIMESTEP), context.to(dtype)


def step(unet: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], torch.Tensor]:
    return lambda: unet(*inputs, return_dict=False)[0]


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every parameter and buffer on the meta device, made without copying data:
    for counting MACs without running the model."""
    memo: dict[int, Any] = {}
    for parameter in model.parameters():
        memo[id(parameter)] = nn.Parameter(torch.empty_like(parameter, device="meta"), parameter.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(model, memo)


def unet_macs(unet: nn.Module, side: int) -> int:
    """MACs of one UNet evaluation of one latent of ``side`` (77 text tokens), counted on a meta copy."""
    meta = meta_copy(unet)
    return count_macs(meta, Calibration.random(meta, batch_size=1, sequence_length=TEXT_TOKENS, sample_size=side))


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def decode_macs(vae: nn.Module, latent: torch.Tensor) -> int:
    """MACs (half of FlopCounterMode's FLOPs) of one decode, on a meta copy."""
    meta = meta_copy(vae)
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
        meta.decode(latent.to("meta"))
    return counter.get_total_flops() // 2


class Run:
    """Elapsed time and the results, written after every section."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.start = time.perf_counter()
        self.out = out
        self.results: dict[str, Any] = {"meta": meta}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():5.0f} s] {message}", flush=True)

    def save(self, section: str, value: Any) -> None:
        self.results[section] = value
        self.results["meta"]["elapsed_s"] = round(self.elapsed(), 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------- 1. pruning


def build_unets(run: Run) -> tuple[dict[str, UNet2DConditionModel], dict[str, Any]]:
    """SD 1.5, the BK-SDM-Small-like student and the student pruned to Hybrid-SD's 224M parameters."""
    torch.manual_seed(0)
    full = UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
    small = bk_sdm_small(full)
    run.log(f"pruning {SMALL} ({count_params(small) / 1e6:.1f}M) to {HYBRID_SD_PRUNED_PARAMS / 1e6:.0f}M parameters")
    pruned, info = prune_to_params(small, HYBRID_SD_PRUNED_PARAMS)
    run.log(
        f"pruned to {info['params_after'] / 1e6:.1f}M parameters (fewest reachable"
        f" {info['min_reachable_params'] / 1e6:.1f}M): {info['units_removed']} of {info['units_total']} units removed"
    )
    if not info["reached_target"]:
        print(f"  ! 224M is out of reach; pruned to the fewest reachable: {info['params_after'] / 1e6:.1f}M")
    return {FULL: full, SMALL: small, PRUNED: pruned}, info


def pruning_section(run: Run, unets: dict[str, UNet2DConditionModel], info: dict, args: argparse.Namespace) -> None:
    params = {name: count_params(unet) for name, unet in unets.items()}
    by_side: dict[str, Any] = {}
    table = []
    for side in args.sides:
        macs = {name: unet_macs(unet, side) for name, unet in unets.items()}
        inputs = unet_inputs(side)
        run.log(f"timing UNet steps at {side * 8}x{side * 8}")
        results = time_interleaved({name: step(unet, inputs) for name, unet in unets.items()}, args.repeats)
        full_ms = results[FULL]["ms"]
        for name, result in results.items():
            result.update(params=params[name], macs=macs[name], ratio_to_full=result["ms"] / full_ms)
            if name == PRUNED:
                result["meets_target"] = result["ratio_to_full"] <= STEP_RATIO_TARGET
            table.append(
                [
                    f"{side * 8}px",
                    name,
                    params[name] / 1e6,
                    macs[name] / 1e9,
                    macs[name] / macs[FULL],
                    result["ms"],
                    result["ratio_to_full"],
                    {True: "yes", False: "NO"}.get(result.get("meets_target"), ""),
                ]
            )
        by_side[f"{side}x{side}"] = results
    header = ["image", "unet", "params M", "GMACs", "MACs x", "step ms", "x of full", f"<= {STEP_RATIO_TARGET}x"]
    print_table(f"1. pruned SD 1.5 at the Hybrid-SD 224M budget: UNet step, fp32, batch {CFG_BATCH}", header, table)
    run.save(
        "pruning",
        {
            "pruning": info,
            "macs_per": "one UNet evaluation of one latent, 77 text tokens (count_macs on a meta copy)",
            "target_ratio": STEP_RATIO_TARGET,
            "latents": by_side,
        },
    )


# ------------------------------------------------------------------------------------------------- 2. int8


def calibration_calls(unet: UNet2DConditionModel, side: int, timesteps: Sequence[int]) -> list[Calibration]:
    """One CFG-sized call (batch 2) per timestep, each with its own random latents and text embeddings."""
    return [
        dataclasses.replace(
            Calibration.random(unet, batch_size=CFG_BATCH, sequence_length=TEXT_TOKENS, sample_size=side, seed=seed),
            timestep=torch.full((CFG_BATCH,), timestep),
        )
        for seed, timestep in enumerate(timesteps)
    ]


def quantized_copy(unet: nn.Module, config: QuantConfig) -> nn.Module:
    model = copy.deepcopy(unet)
    quantize_model(model, config)
    return model


def edge_variants(
    run: Run, unet: UNet2DConditionModel, timesteps: Sequence[int]
) -> tuple[dict[str, tuple[nn.Module, torch.dtype]], dict[str, Any]]:
    """The edge UNet's variants (model, input dtype) and notes on how they were made."""
    variants: dict[str, tuple[nn.Module, torch.dtype]] = {
        "fp32": (unet, torch.float32),
        "bf16": (copy.deepcopy(unet).to(torch.bfloat16), torch.bfloat16),
    }
    notes: dict[str, Any] = {}
    onednn = QuantConfig(8, 8, kernel="onednn")
    if onednn_available():
        variants["W8A8 oneDNN dynamic"] = (quantized_copy(unet, onednn), torch.float32)
        model = copy.deepcopy(unet)
        run.log(f"calibrating static scales on {len(timesteps)} calls (timesteps {list(timesteps)})")
        start = time.perf_counter()
        report, choices = calibrate(model, calibration_calls(unet, 32, timesteps), onednn, max_error=0.2)
        kept = Counter(choice.reason.split(" ")[0].rstrip(":") for choice in choices if not choice.quantized)
        notes["W8A8 oneDNN static"] = {
            "calibrate_s": round(time.perf_counter() - start, 1),
            "timesteps": list(timesteps),
            "max_error": 0.2,
            "layers_quantized": len(report.quantized),
            "layers_kept_float": dict(kept),
            "weight_bytes_vs_fp16": report.fp16_bytes / max(report.packed_bytes, 1),
        }
        variants["W8A8 oneDNN static"] = (model, torch.float32)
    else:
        notes["W8A8 oneDNN"] = {"skipped": "this torch build has no oneDNN int8 kernels"}
    variants["W8A8 int_mm"] = (quantized_copy(unet, QuantConfig(8, 8)), torch.float32)
    return variants, notes


def int8_section(run: Run, unets: dict[str, UNet2DConditionModel], args: argparse.Namespace) -> None:
    side = 32
    inputs32 = unet_inputs(side)
    timesteps = CALIBRATION_TIMESTEPS[::2] if args.quick else CALIBRATION_TIMESTEPS
    by_model: dict[str, Any] = {}
    table = []
    for name in (PRUNED, SMALL):
        run.log(f"quantizing {name}")
        variants, notes = edge_variants(run, unets[name], timesteps)
        candidates, rows = {}, {}
        with torch.inference_mode():  # the error call doubles as every variant's warm-up
            reference = step(unets[name], inputs32)()
            for variant, (model, dtype) in variants.items():
                inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs32)
                candidates[variant] = step(model, inputs)
                rows[variant] = {"rel_error": relative_error(candidates[variant](), reference)}
        run.log(f"timing {name} variants at {side * 8}x{side * 8}")
        for variant, result in time_interleaved(candidates, args.repeats, warmup=False).items():
            rows[variant].update(result)
        fp32_ms = rows["fp32"]["ms"]
        best = min((v for v in rows if v.startswith("W8A8")), key=lambda v: rows[v]["ms"])
        for variant, row in rows.items():
            row["speedup_vs_fp32"] = fp32_ms / row["ms"]
            row.update(notes.get(variant, {}))
            mark = ""
            if variant == best:
                row["best_quantized"] = True
                mark = "yes" if row["speedup_vs_fp32"] >= INT8_SPEEDUP_TARGET else "NO"
            table.append([name, variant, row["ms"], row["speedup_vs_fp32"], row["rel_error"], mark])
        skipped = {variant: note for variant, note in notes.items() if variant not in rows}
        by_model[name] = {"params": count_params(unets[name]), "variants": rows, "skipped": skipped}
        for variant, note in skipped.items():
            table.append([name, variant, None, None, None, note["skipped"][:40]])
        del variants, candidates
    header = ["unet", "variant", "step ms", "x vs fp32", "rel err", f"best >= {INT8_SPEEDUP_TARGET}x"]
    print_table(f"2. edge UNet int8 at {side * 8}x{side * 8}: batch {CFG_BATCH}", header, table)
    for name, row in by_model.items():
        static = row["variants"].get("W8A8 oneDNN static")
        if static:
            print(
                f"  {name} static calibration: {static['layers_quantized']} layers int8, kept in float:"
                f" {static['layers_kept_float']} ({static['calibrate_s']} s)"
            )
    run.save("int8", {"latent": f"{side}x{side}", "target_speedup": INT8_SPEEDUP_TARGET, "unets": by_model})


# ---------------------------------------------------------------------------------------------- 3. decoder


def decoder_section(run: Run, args: argparse.Namespace) -> None:
    side = args.decoder_side
    torch.manual_seed(0)
    decoders = {"AutoencoderKL (SD VAE)": AutoencoderKL(**SD_VAE_CONFIG).eval(), "TAESD": AutoencoderTiny().eval()}
    latent = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
    macs = {name: decode_macs(vae, latent) for name, vae in decoders.items()}
    run.log(f"timing decoders at {side * 8}x{side * 8}")
    results = time_interleaved(
        {name: lambda vae=vae: vae.decode(latent) for name, vae in decoders.items()}, args.repeats
    )
    kl_name, tiny_name = list(decoders)
    table = []
    for name, result in results.items():
        result.update(params=count_params(decoders[name].decoder), macs=macs[name])
        result["speedup_vs_kl"] = results[kl_name]["ms"] / result["ms"]
        mark = ""
        if name == tiny_name:
            result["meets_target"] = result["speedup_vs_kl"] >= DECODER_TARGET
            mark = "yes" if result["meets_target"] else "NO"
        table.append([name, result["params"] / 1e6, macs[name] / 1e9, result["ms"], result["speedup_vs_kl"], mark])
    header = ["decoder", "params M", "GMACs", "decode ms", "x vs KL", f">= {DECODER_TARGET:g}x"]
    print_table(
        f"3. tiny decoder vs AutoencoderKL at {side * 8}x{side * 8}: decode of 1x4x{side}x{side}", header, table
    )
    run.save("decoder", {"latent": f"1x4x{side}x{side}", "target_speedup": DECODER_TARGET, "decoders": results})


# ------------------------------------------------------------------------------------------------ 4. bytes


def bytes_section(run: Run, unet: nn.Module, unet_name: str) -> None:
    """Weight bytes of every Linear and Conv2d: fp16 against packed codes, scales and zero points."""
    layers = [layer for layer in unet.modules() if type(layer) in (nn.Linear, nn.Conv2d)]
    fp16 = sum(layer.weight.numel() * 2 for layer in layers)
    covered = sum(layer.weight.numel() for layer in layers) / count_params(unet)
    formats: dict[str, Any] = {"fp16": {"bytes": fp16, "ratio_vs_fp16": 1.0}}
    table = [["fp16", None, fp16 / 2**20, 1.0, ""]]
    for name, bits, group_size, symmetric in WEIGHT_FORMATS:
        start = time.perf_counter()
        packed = sum(
            PackedWeight.pack(quantize_weight(layer.weight, bits, group_size, symmetric, torch.float16)).nbytes
            for layer in layers
        )
        ratio = fp16 / packed
        target = BYTES_TARGETS.get(name)
        formats[name] = {
            "bits": bits,
            "group_size": group_size,
            "symmetric": symmetric,
            "scale_dtype": "float16",
            "bytes": packed,
            "ratio_vs_fp16": ratio,
            "target": target,
            "meets_target": None if target is None else ratio >= target,
            "seconds": round(time.perf_counter() - start, 1),
        }
        mark = "" if target is None else f"{'yes' if ratio >= target else 'NO'} (>= {target}x)"
        table.append([name, "sym" if symmetric else "asym + zero points", packed / 2**20, ratio, mark])
    header = ["format", "scheme", "MiB", "x vs fp16", "target"]
    title = (
        f"4. bytes of the {unet_name} UNet's {len(layers)} Linear/Conv2d weights"
        f" ({covered:.1%} of its parameters), scales and zero points included"
    )
    print_table(title, header, table)
    run.save("bytes", {"unet": unet_name, "layers": len(layers), "param_share": covered, "formats": formats})


# -------------------------------------------------------------------------------------------------- main


def failure(run: Run, section: str, error: BaseException) -> None:
    message = f"{type(error).__name__}: {error}".strip()
    print(f"  ! section {section} failed: {message.splitlines()[0][:300]}", flush=True)
    run.save(section, {"error": message[:2000]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed repeats (medians)")
    parser.add_argument("--quick", action="store_true", help="one repeat, 256x256 only: a smoke run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "edge_compression.json")
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    args.sides = (32,) if args.quick else (32, 64)
    args.decoder_side = 32 if args.quick else 64
    torch.set_num_threads(args.threads)
    # Silences the "modules that should be kept in float32: []" note of every ``.to(dtype)``.
    diffusers.utils.logging.set_verbosity_error()
    # calibrate()'s progress bars would bury the tables.
    # (The package re-exports the function under the module's name, hence import_module.)
    importlib.import_module("compression.quantize.calibrate").tqdm = lambda iterable, **_: iterable

    meta = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "quick": args.quick,
        "cfg_batch": CFG_BATCH,
        "text_tokens": TEXT_TOKENS,
        "weights": "random init from configs (benchmarks/sd_architectures.py)",
    }
    run = Run(args.out, meta)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats", flush=True)
    run.log("building SD 1.5, BK-SDM-Small-like and 224M UNets")
    unets, info = build_unets(run)
    sections: list[tuple[str, Callable[[], None]]] = [
        ("pruning", lambda: pruning_section(run, unets, info, args)),
        ("int8", lambda: int8_section(run, unets, args)),
        ("decoder", lambda: decoder_section(run, args)),
        ("bytes", lambda: bytes_section(run, unets[FULL], "SD 1.5 (860M)")),
    ]
    for name, section in sections:
        run.log(f"section {name}")
        try:
            section()
        except Exception as error:  # recorded, the next section goes on
            failure(run, name, error)
    run.save("total_s", round(run.elapsed(), 1))
    run.log(f"done; wrote {args.out}")


if __name__ == "__main__":
    main()
