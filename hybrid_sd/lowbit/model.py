"""Swap a model's ``nn.Linear`` and ``nn.Conv2d`` layers for quantized ones."""

from __future__ import annotations

import copy
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from torch import nn

from hybrid_sd.lowbit.base import LowBitLayer
from hybrid_sd.lowbit.config import QuantConfig
from hybrid_sd.lowbit.layers import QuantConv2d, QuantLinear
from hybrid_sd.lowbit.onednn import OneDnnConv2d, OneDnnLinear

logger = logging.getLogger(__name__)

QUANTIZED_TYPES = {
    "int_mm": {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d},
    "onednn": {nn.Linear: OneDnnLinear, nn.Conv2d: OneDnnConv2d},
}
NOT_SELECTED = "not selected"


@dataclass
class QuantReport:
    """Which layers were quantized, which were kept in float (and why: the skip pattern that kept them,
    or another reason), and the quantized layers' weight bytes at fp16 against packed."""

    mode: str
    quantized: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    fp16_bytes: int = 0
    packed_bytes: int = 0


def quantize_model(
    model: nn.Module, config: QuantConfig, names: Collection[str] | None = None, weights: bool = True
) -> QuantReport:
    """Replace, in place, every ``nn.Linear`` and ``nn.Conv2d`` below ``model`` not matched by ``config.skip``
    (and, when ``names`` is given, in it) by ``config.kernel``'s quantized layer. ``weights=False`` builds the
    quantized layers' shapes only (the float model may then be a skeleton on the meta device).

    Only these exact types are replaced: a subclass may use its weight outside ``forward``.
    """
    if not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a QuantConfig, got {type(config).__name__}")
    report = QuantReport(config.mode)
    for name, layer in list(model.named_modules()):
        quantized_type = QUANTIZED_TYPES[config.kernel].get(type(layer))
        if quantized_type is None:
            continue
        if not name:
            raise ValueError(f"model must contain the layers to quantize, not be one: got {type(layer).__name__}")
        pattern = next((pattern for pattern in config.skip if fnmatchcase(name, pattern)), None)
        if pattern is not None or (names is not None and name not in names):
            report.kept[name] = pattern or NOT_SELECTED
            continue
        quantized = quantized_type.from_float(layer, config, weights)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, quantized)
        report.quantized.append(name)
        report.fp16_bytes += layer.weight.numel() * 2
        report.packed_bytes += quantized.weight_nbytes
    logger.info("%s: quantized %d layers, kept %d in float", config.mode, len(report.quantized), len(report.kept))
    return report


def dequantize_model(model: nn.Module) -> nn.Module:
    """A float copy of ``model``: every low-bit layer replaced by the float layer of its dequantized weights
    (to train or prune a quantized model further; its outputs are those of the weights' quantization alone)."""
    # The float layers stand in for the low-bit ones in the copy's memo: oneDNN's packed weights cannot be copied.
    memo = {id(layer): layer.to_float() for layer in model.modules() if isinstance(layer, LowBitLayer)}
    return copy.deepcopy(model, memo)
