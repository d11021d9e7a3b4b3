"""What every low-bit layer shares: one ``(out, row)`` weight matrix, a linear or convolution geometry, and
building itself from the float layer it replaces (``from_float``).

A concrete layer is a geometry (``LowBitLinear``, ``LowBitConv2d``) over a storage, itself a ``LowBitLayer``
(packed codes, oneDNN int8), e.g. ``class QuantLinear(LowBitLinear, _QuantLayer)``: the geometry's
constructor sets its own fields and hands the weight matrix's shape to the storage's.
"""

from __future__ import annotations

from typing import Self

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from hybrid_sd.lowbit.config import QuantConfig


class LowBitLayer(nn.Module):
    """A quantized layer built from a float ``nn.Linear`` or ``nn.Conv2d``."""

    def set_weight(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Quantize a float weight (flattening to ``(out, row)``) and copy the bias."""
        raise NotImplementedError

    @classmethod
    def float_arguments(cls, layer: nn.Module) -> tuple:
        """The constructor's positional arguments (before ``config``) that give ``layer``'s shapes."""
        raise NotImplementedError

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(out, row)`` float weight the codes stand for."""
        raise NotImplementedError

    def to_float(self) -> nn.Module:
        """The float layer of the same geometry whose weight is the dequantized one (float32)."""
        raise NotImplementedError

    @classmethod
    def from_float(cls, layer: nn.Module, config: QuantConfig, weights: bool = True) -> Self:
        """The quantized form of ``layer``; ``weights=False`` gives the shapes only, for a state dict to fill."""
        quantized = cls(*cls.float_arguments(layer), config=config)
        if weights:
            quantized.set_weight(layer.weight, layer.bias)
        return quantized


class LowBitLinear(LowBitLayer):
    """The geometry of ``nn.Linear``: the weight is ``(out_features, in_features)``."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, config: QuantConfig | None = None
    ) -> None:
        super().__init__(out_features, in_features, bias, config)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def float_arguments(cls, layer: nn.Linear) -> tuple:
        return layer.in_features, layer.out_features, layer.bias is not None

    def to_float(self) -> nn.Linear:
        layer = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        return _with_weights(layer, self)


class LowBitConv2d(LowBitLayer):
    """The geometry of ``nn.Conv2d``: the weight is ``(out_channels, in_channels / groups * kernel area)``;
    stride, padding (numbers, ``"same"``, ``"valid"``, the padding modes of ``PADDING_MODES``), dilation
    and groups as ``nn.Conv2d`` has them."""

    PADDING_MODES: tuple[str, ...] = ("zeros", "reflect", "replicate", "circular")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        config: QuantConfig | None = None,
    ) -> None:
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"groups must divide in_channels and out_channels, got {groups}")
        if padding_mode not in self.PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {self.PADDING_MODES}, got {padding_mode!r}")
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        super().__init__(out_channels, in_channels // groups * self.kernel_size[0] * self.kernel_size[1], bias, config)
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.padding_mode = padding_mode
        self._pad = self._explicit_padding()

    def to_float(self) -> nn.Conv2d:
        layer = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias is not None,
            self.padding_mode,
        )
        return _with_weights(layer, self)

    def _explicit_padding(self) -> tuple[int, int, int, int]:
        """(left, right, top, bottom) amounts for ``F.pad``, as ``nn.Conv2d`` pads."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            if self.stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride={self.stride}")
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size, strict=True)]
            (top, bottom), (left, right) = ((t // 2, t - t // 2) for t in totals)
            return (left, right, top, bottom)
        if isinstance(self.padding, str):
            raise ValueError(f"padding must be 'same', 'valid', an int or a pair, got {self.padding!r}")
        height, width = self.padding
        return (width, width, height, height)

    @classmethod
    def float_arguments(cls, layer: nn.Conv2d) -> tuple:
        return (
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            layer.bias is not None,
            layer.padding_mode,
        )


def _with_weights(layer: nn.Linear | nn.Conv2d, quantized: LowBitLayer) -> nn.Module:
    """``layer`` holding ``quantized``'s dequantized weight and its bias, in float32."""
    with torch.no_grad():
        layer.weight.copy_(quantized.dequantized_weight().view_as(layer.weight))
        if quantized.bias is not None:
            layer.bias.copy_(quantized.bias.float())
    return layer
