"""Low-bit weights (W2 to W8, bit-packed) with int8 or float activations: the run-time layers the engine and
the edge worker load; `compression` decides what to quantize and exports it."""

from hybrid_sd.lowbit.config import QuantConfig
from hybrid_sd.lowbit.layers import QuantConv2d, QuantLinear
from hybrid_sd.lowbit.model import QuantReport, dequantize_model, quantize_model
from hybrid_sd.lowbit.packing import pack_codes, unpack_codes
from hybrid_sd.lowbit.weights import PackedWeight, QuantizedWeight, quantize_weight

__all__ = [
    "PackedWeight",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantReport",
    "QuantizedWeight",
    "dequantize_model",
    "pack_codes",
    "quantize_model",
    "quantize_weight",
    "unpack_codes",
]
