"""Shrink a resnet's inner channels or an attention's heads in place, keeping the chosen units' weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn


def shrink_resnet(resnet: ResnetBlock2D, keep: torch.Tensor, groups: int) -> None:
    """Keep the inner channels ``keep`` of a resnet (conv1's outputs, the time projection, norm2 and
    conv2's inputs), normalised in ``groups`` groups. Keeping whole groups of the old norm2 leaves
    their statistics unchanged."""
    width = resnet.conv1.out_channels
    _slice(resnet.conv1, rows=keep)
    if resnet.time_emb_proj is not None:
        # "scale_shift" projects to a scale and a shift per channel, stacked.
        rows = keep if resnet.time_embedding_norm == "default" else torch.cat([keep, keep + width])
        _slice(resnet.time_emb_proj, rows=rows)
    norm = resnet.norm2
    norm.num_groups, norm.num_channels = groups, len(keep)
    if norm.affine:
        norm.weight = nn.Parameter(norm.weight[keep.to(norm.weight.device)].clone())
        norm.bias = nn.Parameter(norm.bias[keep.to(norm.bias.device)].clone())
    _slice(resnet.conv2, columns=keep)


def shrink_attention(attention: Attention, heads: Sequence[int]) -> None:
    """Keep the heads ``heads``: their rows of to_q, to_k, to_v and their columns of to_out."""
    keep = unit_channels(attention, heads)
    for projection in (attention.to_q, attention.to_k, attention.to_v):
        _slice(projection, rows=keep)
    _slice(attention.to_out[0], columns=keep)
    attention.heads = attention.sliceable_head_dim = len(heads)
    attention.inner_dim = attention.inner_kv_dim = len(keep)


def _slice(layer: nn.Linear | nn.Conv2d, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None) -> None:
    """Keep output ``rows`` and input ``columns`` of a Linear or Conv2d."""
    weight = layer.weight
    if rows is not None:
        weight = weight[rows.to(weight.device)]
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias[rows.to(weight.device)].clone())
    if columns is not None:
        weight = weight[:, columns.to(weight.device)]
    layer.weight = nn.Parameter(weight.clone())
    if isinstance(layer, nn.Linear):
        layer.out_features, layer.in_features = weight.shape
    else:
        layer.out_channels, layer.in_channels = weight.shape[:2]


def unit_width(module: ResnetBlock2D | Attention) -> int:
    """Channels per unit: channels per GroupNorm group, or the head dimension."""
    if isinstance(module, ResnetBlock2D):
        return module.conv1.out_channels // module.norm2.num_groups
    return module.to_q.out_features // module.heads


def unit_channels(module: ResnetBlock2D | Attention, indices: Sequence[int]) -> torch.Tensor:
    """The inner channels of units ``indices``, in order."""
    width = unit_width(module)
    return torch.cat([torch.arange(index * width, (index + 1) * width) for index in indices])
