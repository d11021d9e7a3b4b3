"""FLOPs of forward calls by torch's ``FlopCounterMode``, with the CPU attention kernel counted too."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# On the CPU attention runs as _scaled_dot_product_flash_attention_for_cpu, which the counter has no formula
# for; it costs what the GPU kernels do.
_CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def flop_counter() -> FlopCounterMode:
    """A silent counter of matmuls, convolutions and attention (CPU and GPU kernels alike)."""
    return FlopCounterMode(display=False, custom_mapping=_CPU_SDPA)
