"""Model references: a local diffusers folder or a Hugging Face hub ID, checked before anything loads.

A reference that exists on disk is a local folder. Otherwise it looks like a path, and is reported as a
missing folder without asking the hub, when it starts with ``/``, ``.`` or ``~``, holds a backslash or more
than one ``/``, ends in a file suffix (``.safetensors``, ``.json``, ...), has a first part that is a local
folder (``out/bundle`` where ``out/`` exists) or is not a valid hub ID; anything else (``name``,
``org/name``) is a hub ID, which must be in the hub's cache or fetchable from the hub.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CONFIG_FILES = ("model_index.json", "config.json")
FILE_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth", ".json", ".yaml", ".yml", ".onnx", ".gguf")
LOCAL_HINT = "pass a diffusers model folder or a hub ID (org/name)"


def resolve(ref: str) -> str:
    """``ref`` as diffusers should load it: an existing model folder (``~`` expanded) or a hub ID that is
    cached or can be fetched; otherwise a ValueError naming it says what to do."""
    path = Path(ref).expanduser()
    if path.exists():
        check_folder(path)
        return str(path)
    if looks_like_path(ref):
        raise ValueError(f"no model folder at {ref}; {LOCAL_HINT}")
    _check_hub(ref)
    return ref


def check_models(*refs: str | None) -> None:
    """:func:`resolve` each reference given, before the first model loads."""
    for ref in refs:
        if ref is not None:
            resolve(ref)


def looks_like_path(ref: str) -> bool:
    """Whether ``ref`` is meant as a local path rather than a hub ID (the module docstring's rule)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if ref.startswith(("/", ".", "~")) or "\\" in ref or ref.count("/") > 1 or ref.lower().endswith(FILE_SUFFIXES):
        return True
    if "/" in ref and Path(ref.split("/")[0]).is_dir():
        return True
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return True
    return False


def check_folder(path: Path) -> None:
    """Raise a ValueError unless ``path`` is a diffusers model folder (a pipeline, a UNet or a VAE)."""
    if not path.is_dir():
        raise ValueError(f"model {path} is a file; pass the diffusers folder that holds it and its config.json")
    if (path / "bundle.json").is_file():
        raise ValueError(f"{path} is an edge bundle, not a model folder; pass it with --edge-bundle")
    if not any((path / name).is_file() for name in (*CONFIG_FILES, "unet/config.json")):
        raise ValueError(f"{path} is not a diffusers model folder (no model_index.json or config.json); {LOCAL_HINT}")


@contextmanager
def loading(ref: str) -> Iterator[None]:
    """Turn what a model that is there but cannot be read raises (a missing or corrupt weights or config file)
    into a ValueError naming ``ref``; anything else passes through."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError, json.JSONDecodeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot load the model at {ref}: {reason}") from error


@functools.cache
def _check_hub(repo_id: str) -> None:
    """Return if ``repo_id`` is in the hub's cache or can be fetched (its config files are, then), else raise
    a ValueError saying why; an unreachable hub turns on huggingface_hub's offline mode for this process."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        # One listing call, no retries: hf_hub_download retries a failed connection for about 25 s.
        snapshot_download(repo_id, allow_patterns=list(CONFIG_FILES))
    except GatedRepoError as error:
        raise ValueError(
            f"{repo_id} is a gated model: accept its terms on the Hugging Face hub and log in (hf auth login)"
        ) from error
    except RepositoryNotFoundError as error:
        raise ValueError(
            f"no model {repo_id} on the Hugging Face hub (a wrong ID, or a private model: log in with hf auth login);"
            f" or pass a local diffusers folder"
        ) from error
    except LocalEntryNotFoundError as error:
        if constants.is_offline_mode():
            raise ValueError(
                f"model {repo_id} is not in the hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set;"
                " pass a local diffusers folder, or unset HF_HUB_OFFLINE where the hub can be reached"
            ) from error
        go_offline()
        raise ValueError(
            f"cannot fetch model {repo_id}: the Hugging Face hub is unreachable (or the ID is wrong) and it is not in"
            f" the hub cache ({constants.HF_HUB_CACHE}); pass a local diffusers folder, or set HF_HUB_OFFLINE=1"
            " on a machine that is offline on purpose"
        ) from error


def go_offline() -> None:
    """huggingface_hub's offline mode from now on, so that no later load waits for the hub again: the
    environment variable for processes started from here, and the flag it read at import for this one."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True  # is_offline_mode() reads this module attribute at each call
