"""The one frozen, validated description of how a model is quantized."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybrid_sd.lowbit.packing import check_bits

SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
ACTIVATION_BITS = (8, 16)
KERNELS = ("int_mm", "onednn")


@dataclass(frozen=True)
class QuantConfig:
    """Weight and activation bit widths, weight grouping and the layers left in float.

    ``group_size`` counts weights along the input dimension that share one scale (and zero point);
    ``None`` means one per output channel. ``activation_bits=8`` quantizes activations dynamically
    per token and runs an int8 GEMM; ``16`` keeps them in float. ``skip`` holds ``fnmatch`` patterns
    of qualified module names (``"conv_in"``, ``"*.proj_out"``) to keep in float.

    ``kernel`` picks the A8 path: ``"int_mm"`` (any weight width and grouping, per-token dynamic
    activations, ``torch._int_mm`` on CPU and CUDA) or ``"onednn"`` (W8A8 with per-channel weights and
    per-tensor static or dynamic activations on the x86 oneDNN kernels: the fast path on CPUs).
    """

    weight_bits: int = 8
    activation_bits: int = 16
    group_size: int | None = None
    symmetric: bool = True
    scale_dtype: str = "float16"
    skip: tuple[str, ...] = ()
    kernel: str = "int_mm"

    def __post_init__(self) -> None:
        check_bits(self.weight_bits, "weight_bits")
        if self.activation_bits not in ACTIVATION_BITS or isinstance(self.activation_bits, bool):
            raise ValueError(f"activation_bits must be one of {ACTIVATION_BITS}, got {self.activation_bits!r}")
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise ValueError(f"group_size must be a positive integer or None, got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be a bool, got {self.symmetric!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {tuple(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        if isinstance(self.skip, str) or not all(isinstance(pattern, str) for pattern in self.skip):
            raise ValueError(f"skip must be a sequence of name patterns, got {self.skip!r}")
        object.__setattr__(self, "skip", tuple(self.skip))
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        onednn_shape = (self.weight_bits, self.activation_bits, self.group_size, self.symmetric)
        if self.kernel == "onednn" and onednn_shape != (8, 8, None, True):
            raise ValueError(
                "kernel: 'onednn' runs W8A8 with symmetric per-channel weights (weight_bits=8, activation_bits=8,"
                f" group_size=None, symmetric=True), got {self.mode} group_size={self.group_size}"
                f" symmetric={self.symmetric}"
            )

    @property
    def mode(self) -> str:
        """``W4A16``-style name of the weight and activation widths."""
        return f"W{self.weight_bits}A{self.activation_bits}"
