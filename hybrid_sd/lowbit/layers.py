"""Drop-in quantized ``nn.Linear`` and ``nn.Conv2d`` holding bit-packed weights.

Two run-time paths, chosen by ``QuantConfig.activation_bits``:

- ``A16`` (W2A16 to W8A16): the packed weight is unpacked and dequantized to the input's dtype on
  every call, then a float GEMM or convolution runs. This saves memory (weights stay packed), not
  time: the unpacking comes on top of the float work.
- ``A8`` (W2A8 to W8A8): activations are quantized to int8 per token on the fly, weight codes are
  unpacked to int8 and the product runs on ``torch._int_mm`` (see :mod:`hybrid_sd.lowbit.int8`).
  Speed comes from the int8 GEMM; per-channel weights (``group_size=None``) take one GEMM, per-group
  weights one GEMM per group. 8-bit weights unpack as a zero-copy view; narrower ones are unpacked
  each call. Convolutions become GEMMs through ``unfold`` (im2col), or a channels-last reshape for
  1x1 kernels with stride 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybrid_sd.lowbit.base import LowBitConv2d, LowBitLayer, LowBitLinear
from hybrid_sd.lowbit.config import SCALE_DTYPES, QuantConfig
from hybrid_sd.lowbit.int8 import int8_linear, quantize_activations
from hybrid_sd.lowbit.packing import packed_length
from hybrid_sd.lowbit.weights import PackedWeight, QuantizedWeight, group_count, group_length, quantize_weight


class _QuantLayer(LowBitLayer):
    """Buffers and run-time helpers shared by the quantized layers: one ``(out, row)`` weight matrix."""

    def __init__(self, out_features: int, row_length: int, bias: bool, config: QuantConfig | None) -> None:
        super().__init__()
        self.config = config or QuantConfig()
        bits = self.config.weight_bits
        groups = group_count(row_length, self.config.group_size)
        self.weight_shape = (out_features, row_length)
        self.group_size = group_length(row_length, self.config.group_size)
        # Zero-filled until a weight is set or a state dict loaded: a skeleton of the right shapes.
        codes = torch.zeros(out_features, packed_length(row_length, bits), dtype=torch.uint8)
        scales = torch.ones(out_features, groups, dtype=SCALE_DTYPES[self.config.scale_dtype])
        zero_points = None
        if not self.config.symmetric:
            zero_points = torch.zeros(out_features, packed_length(groups, bits), dtype=torch.uint8)
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scales", scales)
        self.register_buffer("weight_zero_points", zero_points)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    def set_weight(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Quantize and pack a float weight (any shape flattening to ``(out, row)``) and copy the bias."""
        if weight.shape[0] * weight[0].numel() != self.weight_shape[0] * self.weight_shape[1]:
            raise ValueError(f"weight must flatten to {self.weight_shape}, got {tuple(weight.shape)}")
        quantized = quantize_weight(
            weight, self.config.weight_bits, self.config.group_size, self.config.symmetric, self.weight_scales.dtype
        )
        packed = PackedWeight.pack(quantized)
        self.weight_codes, self.weight_scales, self.weight_zero_points = packed.codes, packed.scales, packed.zero_points
        if bias is not None:
            self.bias = bias.detach().clone()

    def packed_weight(self) -> PackedWeight:
        return PackedWeight(
            self.weight_codes,
            self.weight_scales,
            self.weight_zero_points,
            self.config.weight_bits,
            self.group_size,
            self.weight_shape,
        )

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the stored weight: packed codes, scales and packed zero points."""
        return self.packed_weight().nbytes

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(out, row)`` float weight the codes stand for."""
        return self.packed_weight().unpack().dequantize(dtype)

    def _int8_matmul(self, x: torch.Tensor, weight: QuantizedWeight, rows: slice = slice(None)) -> torch.Tensor:
        """float32 ``x @ w[rows].T`` on the int8 path, ``x`` a ``(M, row)`` float matrix."""
        x_codes, x_scales = quantize_activations(x)
        zero_points = None if weight.zero_points is None else weight.zero_points[rows]
        return int8_linear(x_codes, x_scales, weight.codes[rows], weight.scales[rows], zero_points, weight.group_size)

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)

    def extra_repr(self) -> str:
        out_features, row_length = self.weight_shape
        symmetry = "symmetric" if self.config.symmetric else "asymmetric"
        return f"{self.config.mode}, weight=({out_features}, {row_length}), group_size={self.group_size}, {symmetry}"


class QuantLinear(LowBitLinear, _QuantLayer):
    """A quantized ``nn.Linear``; see the module docstring for the A16 and A8 paths."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.activation_bits == 16:
            return F.linear(x, self.dequantized_weight(x.dtype), self._bias(x.dtype))
        y = self._int8_matmul(x.reshape(-1, self.in_features), self.packed_weight().unpack())
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class QuantConv2d(LowBitConv2d, _QuantLayer):
    """A quantized ``nn.Conv2d`` with its stride, padding (numbers, ``"same"``, ``"valid"``, any padding
    mode), dilation and groups; see the module docstring for the A16 and A8 paths."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return self(x[None])[0]
        if self.config.activation_bits == 16:
            weight = self.dequantized_weight(x.dtype).view(self.out_channels, -1, *self.kernel_size)
            if self.padding_mode == "zeros":
                return F.conv2d(x, weight, self._bias(x.dtype), self.stride, self.padding, self.dilation, self.groups)
            x = F.pad(x, self._pad, mode=self.padding_mode)
            return F.conv2d(x, weight, self._bias(x.dtype), self.stride, 0, self.dilation, self.groups)
        return self._forward_int8(x)

    def _forward_int8(self, x: torch.Tensor) -> torch.Tensor:
        if any(self._pad):
            x = F.pad(x, self._pad, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        batch, channels, height, width = x.shape
        (kernel_h, kernel_w), (stride_h, stride_w), (dilation_h, dilation_w) = (
            self.kernel_size,
            self.stride,
            self.dilation,
        )
        out_h = (height - dilation_h * (kernel_h - 1) - 1) // stride_h + 1
        out_w = (width - dilation_w * (kernel_w - 1) - 1) // stride_w + 1
        if self.kernel_size == (1, 1) and self.stride == (1, 1):
            columns = x.permute(0, 2, 3, 1).reshape(-1, channels)
        else:
            columns = F.unfold(x, self.kernel_size, dilation=self.dilation, stride=self.stride)
            columns = columns.transpose(1, 2).reshape(batch * out_h * out_w, -1)
        weight = self.packed_weight().unpack()
        row_length = self.weight_shape[1]
        per_group = self.out_channels // self.groups
        outputs = [
            self._int8_matmul(
                columns[:, g * row_length : (g + 1) * row_length], weight, slice(g * per_group, (g + 1) * per_group)
            )
            for g in range(self.groups)
        ]
        y = outputs[0] if self.groups == 1 else torch.cat(outputs, dim=1)
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype).view(batch, out_h, out_w, self.out_channels).permute(0, 3, 1, 2)
