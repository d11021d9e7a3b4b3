"""The int8 GEMM path: dynamic per-token activation quantization and ``torch._int_mm``.

``torch._int_mm`` multiplies int8 by int8 with exact int32 accumulation. On this torch's CPU build it
takes any shape; CUDA needs more than 16 rows and inner and output sizes that are multiples of 8,
so there the operands are zero-padded, which leaves the product unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT8_MAX = 127


def int8_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` for int8 ``a`` ``(M, K)`` and ``b`` ``(N, K)``, accumulated exactly in int32."""
    if a.device.type != "cuda":
        return torch._int_mm(a, b.t())
    rows, inner = a.shape
    cols = b.shape[0]
    pad_rows, pad_inner, pad_cols = max(17 - rows, 0), -inner % 8, -cols % 8
    a = F.pad(a, (0, pad_inner, 0, pad_rows))
    b = F.pad(b, (0, pad_inner, 0, pad_cols))
    return torch._int_mm(a, b.t())[:rows, :cols]


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of a ``(M, K)`` float matrix, one float32 scale per row (token)."""
    x = x.float()
    # Separate amax and amin, not abs or aminmax: no temporary, and aminmax is not vectorized here.
    high, low = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
    scales = torch.maximum(high, -low).div_(INT8_MAX).clamp_min_(torch.finfo(torch.float32).tiny)
    return torch.div(x, scales).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scales


def int8_linear(
    x_codes: torch.Tensor,
    x_scales: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """``x @ w.T`` in float32 from int8 activation codes and int8 weight codes, one GEMM per weight group.

    A per-group scale cannot be applied inside one GEMM's reduction over the input dimension, so
    each group is its own int8 GEMM whose int32 result is scaled and summed in float32; with one
    group per row (per-channel weights) this is a single GEMM, the fast case. An asymmetric zero
    point ``z`` is folded in exactly in int32: ``x . (q - z) = x . q - z * sum(x)``.
    """
    in_features = codes.shape[1]
    out = None
    for group, start in enumerate(range(0, in_features, group_size)):
        x_group = x_codes[:, start : start + group_size]
        w_group = codes[:, start : start + group_size]
        if scales.shape[1] > 1:
            x_group, w_group = x_group.contiguous(), w_group.contiguous()
        acc = int8_gemm(x_group, w_group)
        if zero_points is not None:
            row_sums = x_group.sum(dim=1, keepdim=True, dtype=torch.int32)
            acc -= row_sums * zero_points[:, group].to(torch.int32)
        term = acc.float() * scales[:, group].float()
        out = term if out is None else out.add_(term)
    return out * x_scales
