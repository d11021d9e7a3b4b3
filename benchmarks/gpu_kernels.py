"""GPU kernel benchmarks for SD 1.5 serving: pruned UNets, low-bit formats, decoders and int8 GEMMs.

Every model is randomly initialised from its config (no hub access): the SD 1.5 UNet and VAE, TAESD
(``AutoencoderTiny()``'s defaults), a BK-SDM-Small-like UNet (``compression.prune.remove_blocks``)
and a channel- and head-pruned one at Hybrid-SD's 224M-parameter budget (``prune_channels``, with
a weight-magnitude significance proxy: see :func:`magnitude_significance`). Times are medians of
CUDA-event timings (wall clock on the CPU), methods interleaved, after warm-up; a UNet batch of 2 is
one classifier-free-guidance step. Sections, each printed as a table and all written to ``--out``:

- ``gemm``: ``torch._int_mm`` against fp16 and bf16 ``torch.mm`` on SD 1.5 layer shapes;
- ``decoder``: the SD VAE's decode against TAESD's, 512x512 (4x64x64 latent), fp16 and fp32;
- ``unet_pruned``: fp16 UNet step of the full, BK-SDM-Small-like and 224M models, 256 and 512 px;
- ``lowbit``: the full UNet at 512 px in fp16, bf16, fp16 + ``torch.compile``, torchao W8A8 (eager
  and compiled), torchao W8 and W4 weight-only, and this repo's ``hybrid_sd.lowbit`` W8A8 and
  W4A16; each with its relative error against float32 with the same weights, and weight bytes.

A method that cannot run (torchao missing, an unsupported op, out of memory) is recorded as
``{"error": ...}`` and the run goes on. ``torch.compile`` items are skipped, with the reason, once
more than ``--budget-s`` seconds have passed. The JSON is rewritten after every section.

On a CUDA machine without diffusers or torchao, from the repository root, with their wheels in .whl/::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_kernels.py --out gpu_kernels.json

A CPU dry run on small configs (about a minute; the torch.compile items take minutes more on a CPU,
``--budget-s 0`` skips them)::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/gpu_kernels.py --device cpu --tiny --out /tmp/gpu_kernels.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import torch._inductor.config
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from torch import nn

from compression.prune import Calibration, count_params, prune_channels, remove_blocks
from hybrid_sd.lowbit import QuantConfig, quantize_model

try:  # run as a script, benchmarks/ is on sys.path; as ``python -m benchmarks.gpu_kernels``, the root is
    from reporting import print_table, relative_error
    from sd_architectures import SD15_UNET_CONFIG, SD_VAE_CONFIG, magnitude_significance
except ImportError:
    from benchmarks.reporting import print_table, relative_error
    from benchmarks.sd_architectures import SD15_UNET_CONFIG, SD_VAE_CONFIG, magnitude_significance

# The CPU dry run's stand-ins: the same block structure, narrow.
TINY_UNET_CONFIG = {
    **SD15_UNET_CONFIG,
    "sample_size": 16,
    "block_out_channels": (32, 64, 64, 64),
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
}
TINY_VAE_CONFIG = {**SD_VAE_CONFIG, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1, "norm_num_groups": 8}

# Hybrid-SD's pruned SD 1.5 UNet (arXiv 2408.06646) against SD 1.5's own; the tiny run keeps the ratio.
PRUNED_PARAMS, SD15_UNET_PARAMS = 224e6, 859_520_964
TEXT_TOKENS, TIMESTEP = 77, 500
CFG_BATCH = 2  # one classifier-free-guidance step; --batch changes it
# (name, M, K, N): tokens of a CFG batch of 2 by a layer's input and output width.
GEMM_SHAPES = (
    ("256px attn 320", 2 * 1024, 320, 320),
    ("256px 320->1280", 2 * 1024, 320, 1280),
    ("256px ff-out 1280->320", 2 * 1024, 1280, 320),
    ("512px attn 320", 2 * 4096, 320, 320),
    ("512px ff-in 320->2560", 2 * 4096, 320, 2560),
    ("512px ff-out 1280->320", 2 * 4096, 1280, 320),
    ("512px conv3x3 320 im2col", 2 * 4096, 9 * 320, 320),
    ("512px attn 1280", 2 * 256, 1280, 1280),
    ("512px ff-in 1280->10240", 2 * 256, 1280, 10240),
)


@dataclass(frozen=True)
class Scale:
    """Model configs and sizes of one run: SD 1.5's, or the dry run's small ones."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    unet_sides: tuple[int, ...]  # latent sides of the pruning section: 256 and 512 px
    lowbit_side: int
    decoder_side: int
    gemm_shapes: tuple[tuple[str, int, int, int], ...]
    seconds: float  # timing per candidate, which sets its repeats within the bounds
    repeats: tuple[int, int]


FULL = Scale(SD15_UNET_CONFIG, SD_VAE_CONFIG, (32, 64), 64, 64, GEMM_SHAPES, 1.5, (5, 30))
TINY = Scale(
    TINY_UNET_CONFIG,
    TINY_VAE_CONFIG,
    (8, 16),
    16,
    8,
    tuple((name, m // 16, k, n) for name, m, k, n in GEMM_SHAPES[:4]),
    0.1,
    (2, 3),
)


@dataclass
class Timing:
    """How candidates are timed: warm-up calls, then rounds until each has its repeats."""

    device: torch.device
    seconds: float  # time to spend on each candidate, which sets its repeats
    min_repeats: int
    max_repeats: int
    warmup: int = 2


class Run:
    """Elapsed time, the compile budget and the results, written after every section."""

    def __init__(self, out: Path, budget_s: float, meta: dict[str, Any]) -> None:
        self.start = time.perf_counter()
        self.out, self.budget_s = out, budget_s
        self.results: dict[str, Any] = {"meta": meta}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self) -> str | None:
        """Why a compile-heavy item is skipped now, or ``None``."""
        elapsed = self.elapsed()
        return f"skipped: {elapsed:.0f} s elapsed > budget {self.budget_s:.0f} s" if elapsed > self.budget_s else None

    def save(self, section: str, value: Any) -> None:
        self.results[section] = value
        self.results["meta"]["elapsed_s"] = round(self.elapsed(), 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.results, indent=2, default=str))


def failure(error: BaseException) -> dict[str, str]:
    message = f"{type(error).__name__}: {error}".strip()
    print(f"  ! {message.splitlines()[0][:200]}", flush=True)
    return {"error": message[:1000]}


def elapsed_ms(fn: Callable[[], object], device: torch.device, inner: int = 1) -> float:
    """Milliseconds per call of ``inner`` back-to-back calls."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner
    start_s = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start_s) * 1e3 / inner


@torch.no_grad()
def time_interleaved(
    candidates: dict[str, Callable[[], object]], timing: Timing, inner: int = 1
) -> dict[str, dict[str, Any]]:
    """Median ms of each candidate, or its error. Each is warmed up, then timed once to set its repeats
    (``timing.seconds`` worth, within the bounds); rounds then rotate the order until all have theirs."""
    results: dict[str, dict[str, Any]] = {}
    wanted: dict[str, int] = {}
    for name, fn in candidates.items():
        try:
            for _ in range(timing.warmup):
                fn()
            once = elapsed_ms(fn, timing.device, inner)
        except Exception as error:  # recorded, the others go on
            results[name] = failure(error)
            continue
        repeats = int(timing.seconds * 1e3 / max(once * inner, 1e-3))
        wanted[name] = min(max(repeats, timing.min_repeats), timing.max_repeats)
    samples: dict[str, list[float]] = {name: [] for name in wanted}
    rounds = 0
    while pending := [name for name in wanted if len(samples[name]) < wanted[name]]:
        shift = rounds % len(pending)
        for name in pending[shift:] + pending[:shift]:
            samples[name].append(elapsed_ms(candidates[name], timing.device, inner))
        rounds += 1
    for name in candidates:
        if name in samples:
            results[name] = {"ms": statistics.median(samples[name]), "repeats": len(samples[name])}
    return results


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage bytes of a tensor, summed over the inner tensors of a subclass (torchao's quantized ones)."""
    if hasattr(tensor, "__tensor_flatten__"):
        return sum(tensor_bytes(getattr(tensor, name)) for name in tensor.__tensor_flatten__()[0])
    return tensor.numel() * tensor.element_size()


def weight_bytes(model: nn.Module) -> int:
    return sum(tensor_bytes(tensor) for tensor in [*model.parameters(), *model.buffers()])


# --------------------------------------------------------------------------------------------- d. GEMMs


def gemm_section(run: Run, scale: Scale, timing: Timing) -> None:
    """``torch._int_mm`` against fp16 and bf16 ``torch.mm``, ``x @ w.T`` with ``w`` ``(N, K)`` as in a Linear."""
    inner = 20 if timing.device.type == "cuda" else 1
    rows, table = [], []
    for name, m, k, n in scale.gemm_shapes:
        x = torch.randn(m, k, device=timing.device)
        w = torch.randn(n, k, device=timing.device)
        x8 = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=timing.device)
        w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=timing.device)
        x16, w16, xb, wb = x.half(), w.half(), x.bfloat16(), w.bfloat16()
        candidates = {
            "fp16": lambda x16=x16, w16=w16: torch.mm(x16, w16.t()),
            "bf16": lambda xb=xb, wb=wb: torch.mm(xb, wb.t()),
            "int8": lambda x8=x8, w8=w8: torch._int_mm(x8, w8.t()),
        }
        medians = time_interleaved(candidates, timing, inner)
        row: dict[str, Any] = {"layer": name, "m": m, "k": k, "n": n, **medians}
        tera_ops = {key: 2 * m * k * n / (value["ms"] * 1e9) for key, value in medians.items() if "ms" in value}
        row["tops"] = tera_ops
        ms = {key: value.get("ms") for key, value in medians.items()}
        if ms.get("fp16") and ms.get("int8"):
            row["int8_speedup_vs_fp16"] = ms["fp16"] / ms["int8"]
        rows.append(row)
        table.append(
            [name, f"{m}x{k}x{n}", ms.get("fp16"), ms.get("bf16"), ms.get("int8")]
            + [tera_ops.get(key) for key in ("fp16", "int8")]
            + [row.get("int8_speedup_vs_fp16")]
        )
    header = ["layer", "MxKxN", "fp16 ms", "bf16 ms", "int8 ms", "fp16 TOPS", "int8 TOPS", "int8 x"]
    print_table("d. GEMM: torch._int_mm vs torch.mm", header, table)
    run.save("gemm", rows)


# ------------------------------------------------------------------------------------------- c. decoders


def decoder_section(run: Run, scale: Scale, timing: Timing) -> None:
    """SD VAE decode against TAESD decode of one latent, fp16 and fp32."""
    device = timing.device
    with torch.device(device):
        vae = AutoencoderKL(**scale.vae).eval()
        taesd = AutoencoderTiny().eval()
    latent = torch.randn(1, 4, scale.decoder_side, scale.decoder_side, generator=torch.Generator().manual_seed(0))
    models = {"vae": vae, "taesd": taesd}
    candidates = {}
    for dtype_name, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
        for model_name, model in models.items():
            typed = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
            z = latent.to(device, dtype)
            candidates[f"{model_name} {dtype_name}"] = lambda typed=typed, z=z: typed.decode(z).sample
    results = time_interleaved(candidates, timing)
    table = []
    for name, result in results.items():
        model_name, dtype_name = name.split()
        vae_ms = results[f"vae {dtype_name}"].get("ms")
        if "ms" in result and vae_ms:
            result["speedup_vs_vae"] = vae_ms / result["ms"]
        result["params"] = count_params(models[model_name].decoder)
        table.append([name, result["params"] / 1e6, result.get("ms"), result.get("speedup_vs_vae")])
    side = scale.decoder_side * 8
    print_table(f"c. decoder, {side}x{side}, batch 1", ["decoder", "params M", "ms", "x vs VAE"], table)
    run.save("decoder", {"image_side": side, "results": results})


# --------------------------------------------------------------------------------------- a. pruned UNets


def pruned_unets(full: UNet2DConditionModel) -> tuple[dict[str, UNet2DConditionModel], dict[str, Any]]:
    """The BK-SDM-Small-like student and the student channel- and head-pruned to the 224M budget."""
    small = remove_blocks(full, layers_per_block=1, remove_mid_block=True).eval()
    target = count_params(full) * PRUNED_PARAMS / SD15_UNET_PARAMS
    calibration = Calibration.random(small, batch_size=1, sample_size=8)
    pruned, report = prune_channels(
        small,
        budget=target / count_params(small),
        calibration=calibration,
        metric="params",
        significance=magnitude_significance(small),
    )
    info = {
        "target_params": int(target),
        "params_before": report.params_before,
        "params_after": report.params_after,
        "macs_before_8x8": report.macs_before,
        "macs_after_8x8": report.macs_after,
        "units_removed": len(report.removed),
        "units_total": len(report.significance),
        "significance": "weight-magnitude proxy (magnitude_significance), not measure_significance",
    }
    return {"bk-sdm-small": small, "pruned-224M": pruned.eval()}, info


def unet_inputs(
    config: Any, side: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A CFG batch: latents, timesteps and text embeddings, the same for every dtype."""
    generator = torch.Generator().manual_seed(side)
    sample = torch.randn(CFG_BATCH, config.in_channels, side, side, generator=generator)
    context = torch.randn(CFG_BATCH, TEXT_TOKENS, config.cross_attention_dim, generator=generator)
    timestep = torch.full((CFG_BATCH,), TIMESTEP, device=device)
    return sample.to(device, dtype), timestep, context.to(device, dtype)


def step(unet: Callable[..., Any], inputs: tuple[torch.Tensor, ...]) -> Callable[[], torch.Tensor]:
    return lambda: unet(*inputs, return_dict=False)[0]


def pruning_section(run: Run, scale: Scale, timing: Timing, full: UNet2DConditionModel) -> None:
    """fp16 UNet step of the full, BK-SDM-Small-like and 224M-pruned UNets at each latent side."""
    try:
        students, info = pruned_unets(full)
    except Exception as error:  # time the full UNet alone
        students, info = {}, failure(error)
    unets = {"full": copy.deepcopy(full).half()} | {name: unet.half() for name, unet in students.items()}
    params = {name: count_params(unet) for name, unet in unets.items()}
    by_side, table = {}, []
    for side in scale.unet_sides:
        candidates = {
            name: step(unet, unet_inputs(unet.config, side, torch.float16, timing.device))
            for name, unet in unets.items()
        }
        results = time_interleaved(candidates, timing)
        full_ms = results["full"].get("ms")
        for name, result in results.items():
            result["params"] = params[name]
            if "ms" in result and full_ms:
                result["speedup_vs_full"] = full_ms / result["ms"]
            table.append([f"{side * 8}px", name, params[name] / 1e6, result.get("ms"), result.get("speedup_vs_full")])
        by_side[f"{side}x{side}"] = results
    header = ["image", "unet", "params M", "ms", "x vs full"]
    print_table(f"a. UNet step, fp16, batch {CFG_BATCH}", header, table)
    run.save("unet_pruned", {"pruning": info, "latents": by_side})


# ------------------------------------------------------------------------------------------ b. low-bit


@dataclass
class Method:
    """A low-bit variant of the full UNet: its builder, its input dtype, and whether it compiles."""

    name: str
    dtype: torch.dtype
    build: Callable[[], nn.Module]
    compiles: bool = False
    note: str = ""


def torchao_quantized(base: nn.Module, kind: str) -> nn.Module:
    """A copy of ``base`` with its Linear layers quantized by torchao (convolutions stay float).

    ``set_inductor_config=False``: torchao's recommended settings turn on coordinate-descent tuning
    (minutes more compile) and TF32 float32 matmuls (which would spoil the float32 reference)."""
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    configs = {
        "w8a8": lambda: Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
        "w8": lambda: Int8WeightOnlyConfig(set_inductor_config=False),
        # The default PLAIN packing needs the mslk kernels; tile_packed_to_4d runs on core torch's
        # tinygemm (_weight_int4pack_mm). Layers whose input width is not a multiple of 128 stay bf16.
        "w4": lambda: Int4WeightOnlyConfig(
            group_size=128, int4_packing_format="tile_packed_to_4d", set_inductor_config=False
        ),
    }
    model = copy.deepcopy(base)
    # The time-embedding layers see one row per latent (M = batch), too few for CUDA's _int_mm (M > 16).
    quantize_(
        model, configs[kind](), filter_fn=lambda module, name: isinstance(module, nn.Linear) and "time_emb" not in name
    )
    return model


def repo_quantized(base: nn.Module, config: QuantConfig, dtype: torch.dtype) -> nn.Module:
    """A copy of ``base`` with every Linear and Conv2d swapped by :func:`hybrid_sd.lowbit.quantize_model`."""
    model = copy.deepcopy(base)
    quantize_model(model, config)
    return model.to(dtype)


def quantized_share(model: nn.Module, original_params: int) -> float:
    """Share of the original parameters now held quantized (a torchao subclass or a repo Quant layer)."""
    held = sum(p.numel() for p in model.parameters() if type(p) not in (torch.Tensor, nn.Parameter))
    held += sum(m.weight_shape[0] * m.weight_shape[1] for m in model.modules() if hasattr(m, "weight_codes"))
    return held / original_params


def compiled(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    return lambda: torch.compile(build())


def lowbit_methods(full: UNet2DConditionModel, fp16: nn.Module) -> list[Method]:
    """Eager methods first; the compiled ones last, where the budget can skip them."""
    bf16 = copy.deepcopy(fp16).to(torch.bfloat16)
    w8a8 = functools.cache(lambda: torchao_quantized(bf16, "w8a8"))
    torchao_note = "torchao, Linear layers only, bf16 activations"
    return [
        Method("fp16", torch.float16, lambda: fp16),
        Method("bf16", torch.bfloat16, lambda: bf16),
        Method("torchao W8A8 eager", torch.bfloat16, w8a8, note=torchao_note),
        Method("torchao W8 weight-only", torch.bfloat16, lambda: torchao_quantized(bf16, "w8"), note=torchao_note),
        Method("torchao W4 g128 weight-only", torch.bfloat16, lambda: torchao_quantized(bf16, "w4"), note=torchao_note),
        Method(
            "repo W8A8 fp32",
            torch.float32,
            lambda: repo_quantized(full, QuantConfig(weight_bits=8, activation_bits=8), torch.float32),
            note="hybrid_sd.lowbit, Linear and Conv2d, int8 _int_mm, fp32 activations elsewhere",
        ),
        Method(
            "repo W8A8 fp16",
            torch.float16,
            lambda: repo_quantized(full, QuantConfig(weight_bits=8, activation_bits=8), torch.float16),
            note="hybrid_sd.lowbit, Linear and Conv2d, int8 _int_mm, fp16 activations elsewhere",
        ),
        Method(
            "repo W4A16 g64 fp16",
            torch.float16,
            lambda: repo_quantized(full, QuantConfig(weight_bits=4, activation_bits=16, group_size=64), torch.float16),
            note="hybrid_sd.lowbit, dequantized to fp16 every call",
        ),
        Method("fp16 + compile", torch.float16, compiled(lambda: fp16), compiles=True, note="torch.compile default"),
        Method(
            "torchao W8A8 + compile",
            torch.bfloat16,
            compiled(w8a8),
            compiles=True,
            note=f"{torchao_note}, torch.compile default, int_mm+mul fusion on",
        ),
    ]


@torch.no_grad()
def lowbit_section(run: Run, scale: Scale, timing: Timing, full: UNet2DConditionModel) -> None:
    """The full UNet at 512 px in each method: time, error against float32 and weight bytes.

    The eager methods are timed together and saved first; then each compiled one is built (if the
    budget allows) and all are timed together with fp16 eager again as their anchor."""
    device, side = timing.device, scale.lowbit_side
    inputs32 = unet_inputs(full.config, side, torch.float32, device)
    # The reference in true float32: cuDNN convolutions otherwise default to TF32.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        reference = full(*inputs32, return_dict=False)[0].float()
    original_params = count_params(full)
    fp16 = copy.deepcopy(full).half()
    rows: dict[str, dict[str, Any]] = {
        "fp32": {
            "weight_bytes": weight_bytes(full),
            "rel_error": 0.0,
            "note": "reference computed with cuDNN TF32 off, timed with defaults",
        }
    }

    def prepare(method: Method) -> Callable[[], torch.Tensor] | None:
        """Build, run once (compiling, if it does) and record the error against float32."""
        print(f"  [{run.elapsed():5.0f} s] {method.name}", flush=True)
        skip = run.over_budget() if method.compiles else None
        if skip:
            print(f"  ! {skip}", flush=True)
            rows[method.name] = {"skipped": skip}
            return None
        try:
            model = method.build()
            inputs = tuple(x.to(method.dtype) if x.is_floating_point() else x for x in inputs32)
            start = time.perf_counter()
            # Inductor fuses torchao's int_mm with its rescale only with this on (torchao's own choice).
            with torch._inductor.config.patch(force_fuse_int_mm_with_mul=True):
                y = model(*inputs, return_dict=False)[0]
            if device.type == "cuda":
                torch.cuda.synchronize()
            rows[method.name] = {
                "first_call_s": round(time.perf_counter() - start, 2),
                "rel_error": relative_error(y, reference),
                "weight_bytes": weight_bytes(model),
                "quantized_param_share": quantized_share(model, original_params),
                "note": method.note,
            }
            return step(model, inputs)
        except Exception as error:  # recorded, the others go on
            rows[method.name] = failure(error)
            return None

    def timed(candidates: dict[str, Callable[[], torch.Tensor] | None]) -> None:
        """Time the prepared candidates together; speed-ups against this pass's fp16 eager."""
        results = time_interleaved({name: fn for name, fn in candidates.items() if fn is not None}, timing)
        fp16_ms = results.get("fp16", {}).get("ms")
        for name, result in results.items():
            if name == "fp16" and "ms" in rows[name]:
                continue  # the anchor's time is its first pass's
            rows[name].update(result)
            if "ms" in result and fp16_ms:
                rows[name] |= {"speedup_vs_fp16": fp16_ms / result["ms"], "fp16_ms_same_pass": fp16_ms}
        run.save("lowbit", {"latent": f"{side}x{side}", "results": rows})

    methods = lowbit_methods(full, fp16)
    eager = {method.name: prepare(method) for method in methods if not method.compiles}
    timed({"fp32": step(full, inputs32)} | eager)
    compiled_steps = {method.name: prepare(method) for method in methods if method.compiles}
    if any(compiled_steps.values()):
        timed({"fp16": eager["fp16"]} | compiled_steps)
    table = []
    for name, row in rows.items():
        weight_mb = row["weight_bytes"] / 2**20 if "weight_bytes" in row else None
        status = row.get("error", row.get("skipped", ""))[:60]
        table.append([name, row.get("ms"), row.get("speedup_vs_fp16"), row.get("rel_error"), weight_mb, status])
    header = ["method", "ms", "x vs fp16", "rel err", "weights MiB", "error"]
    print_table(f"b. full UNet, {side * 8}px, batch {CFG_BATCH}", header, table)


# ------------------------------------------------------------------------------------------------- main


def versions(device: torch.device) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "diffusers": diffusers.__version__,
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
    }
    for package in ("triton", "torchao"):
        try:
            meta[package] = __import__(package).__version__
        except Exception as error:  # recorded
            meta[package] = f"unavailable: {type(error).__name__}: {error}"
    if device.type == "cuda":
        meta["device_name"] = torch.cuda.get_device_name(device)
        meta["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    else:
        meta["device_name"] = platform.processor() or platform.machine()
        meta["threads"] = torch.get_num_threads()
    return meta


def main() -> None:
    global CFG_BATCH
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small configs: a dry run of every code path")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_kernels.json"))
    parser.add_argument("--budget-s", type=float, default=240.0, help="skip torch.compile items after this")
    parser.add_argument("--sections", default="gemm,decoder,unet_pruned,lowbit", help="comma-separated sections to run")
    parser.add_argument("--batch", type=int, default=CFG_BATCH, help="UNet batch (2: one guided step)")
    args = parser.parse_args()
    CFG_BATCH = args.batch
    device = torch.device(args.device)
    scale = TINY if args.tiny else FULL
    timing = Timing(device, scale.seconds, *scale.repeats)
    run = Run(args.out, args.budget_s, versions(device) | {"args": vars(args) | {"out": str(args.out)}})
    print(json.dumps(run.results["meta"], indent=1, default=str), flush=True)
    torch.manual_seed(0)
    # Silences the "modules that should be kept in float32: []" note of every ``.to(dtype)``.
    diffusers.utils.logging.set_verbosity_error()
    sections: list[tuple[str, Callable[[], None]]] = [
        ("gemm", lambda: gemm_section(run, scale, timing)),
        ("decoder", lambda: decoder_section(run, scale, timing)),
    ]
    with torch.device(device):
        full = UNet2DConditionModel(**scale.unet).eval()
    sections += [
        ("unet_pruned", lambda: pruning_section(run, scale, timing, full)),
        ("lowbit", lambda: lowbit_section(run, scale, timing, full)),
    ]
    for name, section in sections:
        if name not in args.sections.split(","):
            continue
        print(f"\n[{run.elapsed():5.0f} s] section {name}", flush=True)
        try:
            section()
        except Exception as error:  # recorded, the next section goes on
            run.save(name, failure(error))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    run.save("total_s", round(run.elapsed(), 1))
    print(f"\ndone in {run.elapsed():.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
