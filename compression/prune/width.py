"""Width pruning with torch-pruning: every channel group of the UNet (the residual stream of each stage with its
skips, upsamplers and shortcuts, resnets' inner channels, attention head dims, feed-forward widths, the time
embedding) loses the same fraction of its channels, the least (L2) magnitude first, the fraction searched by
bisection until the model meets a parameter or MAC budget. It goes below the floor of
:func:`~compression.prune.channels.prune_channels`, whose units never touch the residual stream."""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass

import torch
import torch_pruning as tp
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from compression.prune.calibration import Calibration
from compression.prune.channels import check_budget
from compression.prune.cost import count_macs, count_params

logger = logging.getLogger(__name__)

# Bisection steps on the pruning ratio: the last one moves it by less than 2**-12.
SEARCH_STEPS = 12
# A GroupNorm's channels are pruned evenly across this many blocks of its groups rather than across every
# group, which would let a 64-channel layer of 16 groups only keep 16, 32 or 48 channels.
GROUP_BLOCKS = 4


@dataclass
class WidthReport:
    """What :func:`prune_widths` did; MACs are per UNet evaluation of one calibration latent."""

    metric: str
    budget: float
    target: float
    ratio: float
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int

    def to_dict(self) -> dict:
        return asdict(self)


def prune_widths(
    unet: UNet2DConditionModel, budget: float, calibration: Calibration, metric: str = "macs"
) -> tuple[UNet2DConditionModel, WidthReport]:
    """A copy of ``unet`` pruned to at most ``budget`` (a fraction in (0, 1]) of its parameters or MACs by
    removing the same fraction ``ratio`` of every channel group, the smallest ``ratio`` that meets the budget.
    conv_in keeps its input and conv_out its output channels; attentions keep their heads, each losing the
    same head dims, with the trained softmax scale folded into ``to_q``; GroupNorms keep their group count
    where the new width allows, else take the largest divisor of the new width below it."""
    check_budget(budget, metric)
    measure = count_params if metric == "params" else (lambda model: count_macs(model, calibration))
    total = measure(unet)
    target = budget * total
    student, ratio = copy.deepcopy(unet), 0.0
    if total > target:
        # Every group keeps a channel per block of GroupNorm groups or head: the ratio stays below 1 - 1/width.
        low, high = 0.0, 1 - 1 / _narrowest(unet) - 1e-6
        student = _pruned(unet, high, calibration)
        if measure(student) > target:
            raise ValueError(
                f"budget {budget!r} is out of reach: with one channel per group or head left the model keeps"
                f" {measure(student) / total:.4f} of its {metric}"
            )
        for _ in range(SEARCH_STEPS):
            middle = (low + high) / 2
            candidate = _pruned(unet, middle, calibration)
            if measure(candidate) <= target:
                high, student = middle, candidate
            else:
                low = middle
        ratio = high
    report = WidthReport(
        metric=metric,
        budget=budget,
        target=target,
        ratio=ratio,
        params_before=count_params(unet),
        params_after=count_params(student),
        macs_before=count_macs(unet, calibration),
        macs_after=count_macs(student, calibration),
    )
    logger.info("pruned %.4f of every width: %d -> %d params", ratio, report.params_before, report.params_after)
    return student, report


def _pruned(unet: UNet2DConditionModel, ratio: float, calibration: Calibration) -> UNet2DConditionModel:
    """A copy of ``unet`` with ``ratio`` of every channel group removed."""
    student = copy.deepcopy(unet)
    first = calibration.first()
    inputs = {"sample": first.sample, "timestep": first.timestep, "encoder_hidden_states": first.encoder_hidden_states}
    if first.added_cond_kwargs is not None:
        inputs["added_cond_kwargs"] = first.added_cond_kwargs
    attentions = [module for module in student.modules() if isinstance(module, Attention)]
    heads = {
        projection: attention.heads
        for attention in attentions
        for projection in (attention.to_q, attention.to_k, attention.to_v)
    }
    pruner = tp.pruner.MetaPruner(
        student,
        inputs,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        # conv_out's output channels are the image's; conv_in's inputs are no group's outputs.
        ignored_layers=[student.conv_out],
        num_heads=heads,
        prune_head_dims=True,
        prune_num_heads=False,
    )
    for module in student.modules():
        if isinstance(module, nn.GroupNorm):
            blocks = math.gcd(module.num_groups, GROUP_BLOCKS)
            pruner.in_channel_groups[module] = pruner.out_channel_groups[module] = blocks
    with torch.no_grad():
        pruner.step()
        _settle(student)
    return student


def _settle(unet: UNet2DConditionModel) -> None:
    """Bring the attributes that torch-pruning does not know about in line with the pruned layers."""
    for module in unet.modules():
        if isinstance(module, nn.GroupNorm) and module.num_channels % module.num_groups:
            module.num_groups = max(d for d in range(1, module.num_groups + 1) if module.num_channels % d == 0)
        elif isinstance(module, Attention):
            head_dim = module.to_q.out_features // module.heads
            # The default processor scales by head_dim ** -0.5, not by attn.scale: fold the trained scale into
            # the queries, and give attn.scale the new head_dim's, so that every processor keeps the trained one.
            factor = module.scale * math.sqrt(head_dim)
            module.to_q.weight.mul_(factor)
            if module.to_q.bias is not None:
                module.to_q.bias.mul_(factor)
            module.scale = head_dim**-0.5
            module.inner_dim = module.to_q.out_features
            module.inner_kv_dim = module.to_k.out_features
        elif isinstance(module, Upsample2D | Downsample2D):
            module.channels, module.out_channels = module.conv.in_channels, module.conv.out_channels


def _narrowest(unet: UNet2DConditionModel) -> int:
    """The fewest channels per block of GroupNorm groups or attention head in ``unet``."""
    widths = [
        module.num_channels // math.gcd(module.num_groups, GROUP_BLOCKS)
        for module in unet.modules()
        if isinstance(module, nn.GroupNorm)
    ]
    widths += [module.to_q.out_features // module.heads for module in unet.modules() if isinstance(module, Attention)]
    return min(widths)
