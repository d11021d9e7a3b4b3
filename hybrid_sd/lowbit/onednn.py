"""W8A8 layers on PyTorch's oneDNN int8 kernels for x86 CPUs (``onednn::qlinear_pointwise`` and
``onednn::qconv2d_pointwise``, the kernels PT2E's ``X86InductorQuantizer`` lowers to).

Weights are int8 per output channel (symmetric); activations are uint8 per tensor with a scale and a
zero point, either static (calibrated over the sampling trajectory: ``compression.quantize``) or, while
``input_scale`` is 0, measured from each input. The kernels take the uint8 input, the packed weight and
both scales and write float32 directly (no requantization of the output), so the only work outside the
int8 kernel is one fused pass quantizing the input. On this CPU that makes a 3x3 convolution with 320
channels about 3.6x faster than float32 (``benchmarks/int8_kernels.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from hybrid_sd.lowbit.base import LowBitConv2d, LowBitLayer, LowBitLinear
from hybrid_sd.lowbit.config import QuantConfig
from hybrid_sd.lowbit.weights import quantize_weight


def _input_code_max() -> int:
    """The largest uint8 input code: 255, or 127 on an x86 CPU without VNNI, where oneDNN multiplies u8 x s8
    with ``vpmaddubsw``, whose int16 pair sums saturate (relative error 0.09-0.13 measured on such an AVX2
    CPU, 0.015-0.02 with 7-bit inputs); PyTorch's own x86 quantization reduces the range the same way."""
    capabilities = torch.cpu.get_capabilities()
    vnni = any(capabilities.get(name, False) for name in ("avx512_vnni", "avx_vnni", "amx_int8"))
    return 255 if vnni or capabilities.get("architecture") != "x86_64" else 127


INPUT_CODE_MAX = _input_code_max()


def onednn_available() -> bool:
    """Whether this torch build has the oneDNN int8 CPU kernels."""
    return hasattr(torch.ops.onednn, "qconv2d_pointwise") and torch.backends.mkldnn.is_available()


def input_qparams(low: float, high: float) -> tuple[float, int]:
    """uint8 scale and zero point covering ``[low, high]`` (widened to hold 0, as affine quantization needs)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max((high - low) / INPUT_CODE_MAX, torch.finfo(torch.float32).tiny)
    return scale, int(min(max(round(-low / scale), 0), INPUT_CODE_MAX))


class _OneDnnLayer(LowBitLayer):
    """Buffers shared by the oneDNN layers: int8 weight codes, float32 per-channel scales, the bias and
    the input's quantization parameters. The packed weight the kernel reads is built from the codes on
    first use (and again after a state dict is loaded)."""

    def __init__(self, out_features: int, row_length: int, bias: bool, config: QuantConfig | None) -> None:
        super().__init__()
        self.config = config or QuantConfig(8, 8, kernel="onednn")
        if self.config.kernel != "onednn":
            raise ValueError(f"kernel: oneDNN layers need kernel='onednn', got {self.config.kernel!r}")
        self.weight_shape = (out_features, row_length)
        self.register_buffer("weight_codes", torch.zeros(out_features, row_length, dtype=torch.int8))
        self.register_buffer("weight_scales", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("input_scale", torch.zeros(()))  # 0: measure each input's range
        self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int32))
        self._packed: torch.Tensor | None = None
        self._static_qparams: tuple[float, int] | None = None
        self._weight_zero_points = torch.zeros(out_features, dtype=torch.int32)
        self.register_load_state_dict_post_hook(lambda module, keys: module._unpack())

    def _unpack(self) -> None:
        """Forget what was derived from the buffers (the packed weight, the input scale as Python numbers)."""
        self._packed = None
        self._static_qparams = (self.input_scale.item(), int(self.input_zero_point)) if self.static else None

    def set_weight(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Quantize a float weight (flattening to ``(out, row)``) per output channel and copy the bias."""
        quantized = quantize_weight(weight.detach().reshape(self.weight_shape), 8, None, True, torch.float32)
        self.weight_codes = quantized.codes.to(torch.int8).contiguous()
        self.weight_scales = quantized.scales.reshape(-1).float().contiguous()
        if bias is not None:
            self.bias = bias.detach().float().clone()
        self._unpack()

    def set_input_range(self, low: float, high: float) -> None:
        """Fix the input's quantization to cover ``[low, high]`` (static activation scales)."""
        scale, zero_point = input_qparams(low, high)
        self.input_scale.fill_(scale)
        self.input_zero_point.fill_(zero_point)
        self._unpack()

    @property
    def static(self) -> bool:
        return bool(self.input_scale > 0)

    @property
    def weight_nbytes(self) -> int:
        return self.weight_codes.numel() + self.weight_scales.numel() * self.weight_scales.element_size()

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight_codes.float() * self.weight_scales[:, None]).to(dtype)

    def _quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        """uint8 codes of ``x`` with their scale and zero point (one fused pass after the range)."""
        if self._static_qparams is not None:
            scale, zero_point = self._static_qparams
        else:
            low, high = torch.aminmax(x)
            scale, zero_point = input_qparams(low.item(), high.item())
        codes = torch.mul(x, 1.0 / scale).round_().add_(zero_point).clamp_(0, INPUT_CODE_MAX).to(torch.uint8)
        return codes, scale, zero_point

    def extra_repr(self) -> str:
        scales = "static" if self.static else "dynamic"
        return f"W8A8 oneDNN, weight={self.weight_shape}, {scales} input scale"


class OneDnnLinear(LowBitLinear, _OneDnnLayer):
    """A W8A8 ``nn.Linear`` on ``onednn::qlinear_pointwise``; float32 in and out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            self._packed = torch.ops.onednn.qlinear_prepack(self.weight_codes, None)
        codes, scale, zero_point = self._quantize_input(x.reshape(-1, self.in_features).float())
        y = torch.ops.onednn.qlinear_pointwise(
            codes,
            scale,
            zero_point,
            self._packed,
            self.weight_scales,
            self._weight_zero_points,
            self.bias,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            "",
        )
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class OneDnnConv2d(LowBitConv2d, _OneDnnLayer):
    """A W8A8 ``nn.Conv2d`` (zero padding) on ``onednn::qconv2d_pointwise``; float32 in and out,
    channels-last output."""

    PADDING_MODES = ("zeros",)

    @classmethod
    def float_arguments(cls, layer: nn.Conv2d) -> tuple:
        if isinstance(layer.padding, str):
            raise ValueError(f"padding: oneDNN layers take numeric zero padding, got {layer.padding!r}")
        return super().float_arguments(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            return self(x[None])[0]
        if self._packed is None:
            weight = self.weight_codes.view(self.out_channels, -1, *self.kernel_size)
            self._packed = torch.ops.onednn.qconv_prepack(
                weight, self.weight_scales, 1.0, 0, self.stride, self.padding, self.dilation, self.groups, None
            )
        codes, scale, zero_point = self._quantize_input(x.float().contiguous(memory_format=torch.channels_last))
        y = torch.ops.onednn.qconv2d_pointwise(
            codes,
            scale,
            zero_point,
            self._packed,
            self.weight_scales,
            self._weight_zero_points,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            "",
        )
        return y.to(x.dtype)
