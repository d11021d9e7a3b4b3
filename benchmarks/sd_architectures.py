"""SD 1.5 architectures for the benchmarks, randomly initialised from configs (no hub access): the UNet and
VAE configs, the BK-SDM-Small-like student and the channel- and head-pruned UNet at Hybrid-SD's
224M-parameter budget (arXiv 2408.06646), scored by a weight-magnitude proxy.

Random weights time exactly as trained ones do, so only the shapes matter here; the magnitude proxy
(:func:`magnitude_significance`) stands in for :func:`compression.prune.measure_significance`, which
needs one UNet evaluation per unit (hundreds of them: far too slow for an 860M model on a CPU).

Used by ``benchmarks/edge_compression.py``; the configs and the proxy are the same as those in
``benchmarks/gpu_kernels.py``, which can import them from here.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

from compression.prune import Calibration, count_params, find_units, prune_channels, remove_blocks
from compression.prune.cost import unit_costs
from compression.prune.units import unit_count

SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_UNET_PARAMS = 859_520_964
HYBRID_SD_PRUNED_PARAMS = 224_000_000


def magnitude_significance(unet: UNet2DConditionModel) -> dict[str, float]:
    """A stand-in for :func:`compression.prune.measure_significance` without forward passes: each unit's
    L2 norm of the weights it owns (a resnet group's rows of ``conv1`` and columns of ``conv2``, a head's
    rows of ``to_q``/``to_k``/``to_v`` and columns of ``to_out``), over the mean of its module's.

    Normalised per module, random-init scores spread the removals over the modules about evenly: a
    near-uniformly narrowed model of the right size, which is what timing needs.
    """
    scores: dict[str, float] = {}
    modules = dict(unet.named_modules())
    by_module: dict[str, list[str]] = defaultdict(list)
    for unit in find_units(unet):
        by_module[unit.module].append(unit.name)
    for module_name, names in by_module.items():
        module = modules[module_name]
        count = unit_count(module)
        if isinstance(module, ResnetBlock2D):
            owned = [module.conv1.weight, module.conv2.weight.transpose(0, 1)]
        elif isinstance(module, Attention):
            owned = [module.to_q.weight, module.to_k.weight, module.to_v.weight, module.to_out[0].weight.t()]
        else:
            raise TypeError(f"no magnitude rule for {type(module).__name__} {module_name}")
        # A unit's channels are a contiguous block of its width (hybrid_sd.pruned.reshape.unit_channels).
        norms = sum(weight.detach().float().reshape(count, -1).pow(2).sum(dim=1) for weight in owned).sqrt()
        scores.update(zip(names, (norms / norms.mean()).tolist(), strict=True))
    return scores


def bk_sdm_small(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """BK-SDM-Small-like student: one resnet+attention pair per down block, no mid block."""
    return remove_blocks(unet, layers_per_block=1, remove_mid_block=True).eval()


def min_prunable_params(unet: UNet2DConditionModel) -> int:
    """The fewest parameters :func:`compression.prune.prune_channels` can reach: one group or head per module."""
    units = find_units(unet)
    costs = unit_costs(unet, units)
    per_module = Counter(unit.module for unit in units)
    removable = sum(costs[unit] for unit in units) - sum(
        max(costs[unit] for unit in units if unit.module == module) for module in per_module
    )
    return count_params(unet) - removable


def prune_to_params(
    unet: UNet2DConditionModel, target: float = HYBRID_SD_PRUNED_PARAMS
) -> tuple[UNet2DConditionModel, dict[str, Any]]:
    """``unet`` channel- and head-pruned (magnitude proxy) to at most ``target`` parameters, or to the fewest
    reachable when that is out of reach (``info["reached_target"]`` says which)."""
    params = count_params(unet)
    floor = min_prunable_params(unet)
    reached = floor <= target
    # Out of reach: aim just above the floor (prune_channels stops once at or under the budget).
    budget = target / params if reached else min(1.0, (floor + 1) / params)
    model, report = prune_channels(
        unet,
        budget=budget,
        calibration=Calibration.random(unet, batch_size=1, sample_size=8),
        metric="params",
        significance=magnitude_significance(unet),
    )
    info = {
        "target_params": int(target),
        "reached_target": reached,
        "min_reachable_params": floor,
        "params_before": report.params_before,
        "params_after": report.params_after,
        "units_removed": len(report.removed),
        "units_total": len(report.significance),
        "significance": "weight-magnitude proxy (sd_architectures.magnitude_significance), not measure_significance",
    }
    return model.eval(), info
