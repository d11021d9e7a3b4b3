"""The torch device a command names, checked before any model loads."""

from __future__ import annotations

import torch


def check_device(device: str) -> None:
    """Raise a ValueError naming ``device`` unless torch can place tensors on it here."""
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from error
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r}: torch finds no CUDA GPU on this machine; use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA GPU(s), numbered from 0")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: torch finds no Apple MPS device on this machine; use cpu")
