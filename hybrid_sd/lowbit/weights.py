"""Per-group weight quantization, 2 to 8 bits, and its bit-packed form.

A weight is viewed as ``(out, in)`` (a conv kernel flattened in ``unfold`` order). Every run of
``group_size`` inputs of one output row shares a scale ``s`` and, when asymmetric, a zero point
``z``; codes ``q`` are signed and ``w ~ (q - z) * s``. When ``group_size`` does not divide the input
dimension, the last group of each row is shorter. Zero points lie in the code range, so they pack
at the same width as the codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hybrid_sd.lowbit.packing import code_range, pack_codes, unpack_codes


def group_length(in_features: int, group_size: int | None) -> int:
    """The effective group size: ``group_size`` capped at ``in_features``; ``None`` is one group a row."""
    return in_features if group_size is None else min(group_size, in_features)


def group_count(in_features: int, group_size: int | None) -> int:
    """Groups per output row, the last one possibly shorter."""
    return math.ceil(in_features / group_length(in_features, group_size))


def expand_groups(per_group: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """Repeat ``(out, groups)`` values along the input dimension to ``(out, in_features)``."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :in_features]


@dataclass
class QuantizedWeight:
    """Unpacked int8 codes ``(out, in)``, scales and optional zero points ``(out, groups)``."""

    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    bits: int
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(q - z) * s`` as an ``(out, in)`` float matrix."""
        in_features = self.codes.shape[1]
        values = self.codes.float()
        if self.zero_points is not None:
            values = values - expand_groups(self.zero_points.float(), self.group_size, in_features)
        return (values * expand_groups(self.scales.float(), self.group_size, in_features)).to(dtype)


def quantize_weight(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedWeight:
    """Round-to-nearest quantization of ``weight`` (flattened to ``(out, -1)``) per group.

    Symmetric: ``s = max|w| / (2^(b-1) - 1)``, codes in ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (W2 is
    ternary). Asymmetric: the group's range, widened to hold 0, spans all ``2^b`` codes. Codes are
    computed with the scale already rounded to ``scale_dtype``, so they agree with what is stored.
    """
    w = weight.detach().reshape(weight.shape[0], -1).float()
    out_features, in_features = w.shape
    size = group_length(in_features, group_size)
    groups = group_count(in_features, group_size)
    # Replicate the row's last value into the padding, which leaves the last group's range unchanged.
    pad = groups * size - in_features
    grouped = torch.cat([w, w[:, -1:].expand(-1, pad)], dim=1).view(out_features, groups, size)
    qmin, qmax = code_range(bits, signed=True)
    tiny = torch.finfo(scale_dtype).tiny
    if symmetric:
        scales = (grouped.abs().amax(-1) / qmax).clamp_min(tiny).to(scale_dtype)
        codes = torch.round(grouped / scales.float()[..., None]).clamp(-qmax, qmax)
        zero_points = None
    else:
        low = grouped.amin(-1).clamp_max(0)
        high = grouped.amax(-1).clamp_min(0)
        scales = ((high - low) / (qmax - qmin)).clamp_min(tiny).to(scale_dtype)
        zero_points = (qmin - torch.round(low / scales.float())).clamp(qmin, qmax)
        codes = (torch.round(grouped / scales.float()[..., None]) + zero_points[..., None]).clamp(qmin, qmax)
        zero_points = zero_points.to(torch.int8)
    codes = codes.reshape(out_features, -1)[:, :in_features].to(torch.int8)
    return QuantizedWeight(codes, scales, zero_points, bits, size)


@dataclass
class PackedWeight:
    """The stored form: bit-packed codes and zero points (uint8) and the scales."""

    codes: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    bits: int
    group_size: int
    shape: tuple[int, int]

    @classmethod
    def pack(cls, weight: QuantizedWeight) -> PackedWeight:
        zero_points = weight.zero_points
        return cls(
            codes=pack_codes(weight.codes, weight.bits, signed=True),
            scales=weight.scales,
            zero_points=None if zero_points is None else pack_codes(zero_points, weight.bits, signed=True),
            bits=weight.bits,
            group_size=weight.group_size,
            shape=tuple(weight.codes.shape),
        )

    def unpack(self) -> QuantizedWeight:
        zero_points = None
        if self.zero_points is not None:
            zero_points = unpack_codes(self.zero_points, self.bits, tuple(self.scales.shape), signed=True)
        codes = unpack_codes(self.codes, self.bits, self.shape, signed=True)
        return QuantizedWeight(codes, self.scales, zero_points, self.bits, self.group_size)

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes, scales and packed zero points."""
        tensors = [self.codes, self.scales] + ([] if self.zero_points is None else [self.zero_points])
        return sum(t.numel() * t.element_size() for t in tensors)
