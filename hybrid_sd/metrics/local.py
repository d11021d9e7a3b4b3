"""Weights from local paths only: a missing file is an error that names the argument, never a download."""

from __future__ import annotations

from pathlib import Path

import torch


def local_file(argument: str, path: str | Path) -> Path:
    """``path`` as a Path if it is a file; otherwise a ValueError naming ``argument``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{argument}: no file at {path}")
    return path


def local_folder(argument: str, path: str | Path) -> Path:
    """``path`` as a Path if it is a folder; otherwise a ValueError naming ``argument``."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{argument}: no folder at {path}")
    return path


def load_state_dict(argument: str, path: str | Path) -> dict[str, torch.Tensor]:
    """A PyTorch state dict from the file at ``path``, unpickled with ``weights_only=True`` so that a
    file cannot run code."""
    path = local_file(argument, path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a torch.load of a bad file raises many types
        raise ValueError(f"{argument}: {path} is not a PyTorch state dict ({error})") from error
    if not isinstance(state, dict):
        raise ValueError(f"{argument}: {path} holds a {type(state).__name__}, not a state dict")
    return state


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], argument: str, path: str | Path) -> None:
    """Load ``state`` into ``module`` strictly; a key or shape mismatch is a ValueError naming ``argument``."""
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{argument}: {path} does not fit {type(module).__name__}: {error}") from error
