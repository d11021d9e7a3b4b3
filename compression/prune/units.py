"""Pruning units: a GroupNorm group of a resnet's inner channels, or an attention head."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from hybrid_sd.pruned.reshape import unit_channels

GROUP, HEAD = "group", "head"


@dataclass(frozen=True)
class PruneUnit:
    """Unit ``index`` of ``module``: a group of ``norm2`` in a resnet (its channels are conv1's
    outputs and conv2's inputs), or a head of an attention."""

    module: str
    kind: str
    index: int

    @property
    def name(self) -> str:
        return f"{self.module}:{self.kind}{self.index}"


def find_units(unet: UNet2DConditionModel) -> list[PruneUnit]:
    """Every unit of every resnet and attention that has more than one (one must stay)."""
    units = []
    for name, module in unet.named_modules():
        kind = unit_kind(module)
        if kind is not None and unit_count(module) > 1:
            units.extend(PruneUnit(name, kind, index) for index in range(unit_count(module)))
    return units


def unit_kind(module: nn.Module) -> str | None:
    """``GROUP`` for a resnet, ``HEAD`` for a plain multi-head attention, else ``None``."""
    if isinstance(module, ResnetBlock2D):
        return GROUP
    plain_attention = (
        type(module) is Attention
        and module.to_k is not None
        and getattr(module, "add_k_proj", None) is None
        and module.norm_q is None
        and module.inner_kv_dim == module.inner_dim
        and not getattr(module, "fused_projections", False)
    )
    return HEAD if plain_attention else None


def unit_count(module: ResnetBlock2D | Attention) -> int:
    return module.norm2.num_groups if isinstance(module, ResnetBlock2D) else module.heads


def consumer(module: ResnetBlock2D | Attention) -> nn.Module:
    """The layer whose input columns read the units' channels."""
    return module.conv2 if isinstance(module, ResnetBlock2D) else module.to_out[0]


@contextmanager
def masked(unet: UNet2DConditionModel, units: Sequence[PruneUnit]) -> Iterator[None]:
    """Zero the consumer columns of ``units`` for the duration. GroupNorm statistics are per group
    and attention per head, so the output equals that of the model with the units removed."""
    modules = dict(unet.named_modules())
    saved = []
    with torch.no_grad():
        for unit in units:
            module = modules[unit.module]
            weight = consumer(module).weight
            columns = unit_channels(module, [unit.index]).to(weight.device)
            saved.append((weight, columns, weight[:, columns].clone()))
            weight[:, columns] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            for weight, columns, values in reversed(saved):
                weight[:, columns] = values
