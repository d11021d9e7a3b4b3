"""Arbitrary-bit weight quantization (W2 to W8) with int8 or float activations."""

from compression.quant.config import QuantConfig
from compression.quant.layers import QuantConv2d, QuantLinear
from compression.quant.model import QuantReport, quantize_model
from compression.quant.packing import pack_codes, unpack_codes
from compression.quant.weights import PackedWeight, QuantizedWeight, quantize_weight

__all__ = [
    "PackedWeight",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantReport",
    "QuantizedWeight",
    "pack_codes",
    "quantize_model",
    "quantize_weight",
    "unpack_codes",
]
