"""Dense bit packing of integer codes 2 to 8 bits wide into uint8 tensors.

Codes are packed along the last dimension, each row on its own: eight ``b``-bit codes fill ``b``
bytes, and a row of ``n`` codes takes ``ceil(n * b / 8)`` bytes (the last byte zero-padded), so a
weight row can be unpacked without touching its neighbours. Signed codes are stored in two's
complement, so 8-bit signed packing is a zero-copy view of the int8 codes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: int, name: str = "bits") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``bits`` is an integer from 2 to 8."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    """The smallest and largest code a ``bits``-wide integer holds."""
    check_bits(bits)
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def packed_length(n: int, bits: int) -> int:
    """Bytes that one row of ``n`` codes of width ``bits`` packs into."""
    check_bits(bits)
    return math.ceil(n * bits / 8)


def pack_codes(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Pack integer ``codes`` of any shape to uint8 of shape ``(*codes.shape[:-1], packed_length(n, bits))``."""
    lo, hi = code_range(bits, signed)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must have an integer dtype, got {codes.dtype}")
    if codes.numel() and (codes.min() < lo or codes.max() > hi):
        raise ValueError(f"codes must lie in [{lo}, {hi}] for bits={bits}, signed={signed}")
    shape = tuple(codes.shape)
    n = shape[-1] if shape else 1
    rows = math.prod(shape[:-1])
    if bits == 8:
        packed = codes.to(torch.int8).view(torch.uint8) if signed else codes.to(torch.uint8)
        return packed.reshape(*shape[:-1], n)
    # Eight codes make one word of 8 * bits <= 56 bits, which int64 holds without touching the sign.
    fields = codes.reshape(rows, n).to(torch.int64) & ((1 << bits) - 1)
    words_per_row = math.ceil(n / 8)
    fields = F.pad(fields, (0, -n % 8)).view(rows, words_per_row, 8)
    shifts = torch.arange(8, device=codes.device) * bits
    words = (fields << shifts).sum(-1, keepdim=True)
    octets = (words >> (torch.arange(bits, device=codes.device) * 8)) & 0xFF
    length = packed_length(n, bits)
    return octets.reshape(rows, words_per_row * bits)[:, :length].to(torch.uint8).reshape(*shape[:-1], length)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...], signed: bool) -> torch.Tensor:
    """Invert :func:`pack_codes`: int8 codes if ``signed``, else uint8, of the original ``shape``."""
    check_bits(bits)
    shape = tuple(shape)
    n = shape[-1] if shape else 1
    rows = math.prod(shape[:-1])
    expected = (*shape[:-1], packed_length(n, bits))
    if packed.dtype != torch.uint8 or tuple(packed.shape) != expected:
        raise ValueError(f"packed must be uint8 of shape {expected}, got {packed.dtype} {tuple(packed.shape)}")
    if bits == 8:
        return (packed.view(torch.int8) if signed else packed).reshape(shape)
    words_per_row = math.ceil(n / 8)
    octets = packed.reshape(rows, expected[-1]).to(torch.int64)
    octets = F.pad(octets, (0, words_per_row * bits - expected[-1])).view(rows, words_per_row, bits)
    words = (octets << (torch.arange(bits, device=packed.device) * 8)).sum(-1, keepdim=True)
    fields = (words >> (torch.arange(8, device=packed.device) * bits)) & ((1 << bits) - 1)
    codes = fields.reshape(rows, words_per_row * 8)[:, :n]
    if signed:
        codes = codes - ((codes >> (bits - 1)) << bits)
    return codes.to(torch.int8 if signed else torch.uint8).reshape(shape)
