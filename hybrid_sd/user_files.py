"""Files and folders a command names, checked before any work: prompt files it reads, outputs it writes."""

from __future__ import annotations

import os
from pathlib import Path

# Image file suffixes, and the format (as PIL names it) an image is written in.
IMAGE_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
}


def image_format_for(path: Path) -> str:
    """The image format (``OutputFormat``) the suffix of ``path`` names."""
    suffix = path.suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise ValueError(f"--out must end in one of {', '.join(IMAGE_FORMATS)}, got {str(path)!r}")
    return IMAGE_FORMATS[suffix]


def read_prompt_file(path: Path, flag: str = "--prompts") -> list[str]:
    """The non-empty lines of the UTF-8 text file ``path``, stripped; a ValueError naming ``flag`` and the file
    if it cannot be read, is not text or holds no prompts."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"{flag}: cannot read {str(path)!r}: {error.strerror}") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{flag}: {str(path)!r} is not a text file (one prompt a line)") from error
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{flag}: {str(path)!r} has no prompts")
    return prompts


def output_folder(path: Path, flag: str = "--out") -> Path:
    """``path``, created if need be, once it is a folder this process can write to."""
    _make_folder(path, f"{flag}: cannot write to {str(path)!r}")
    return path


def output_file(path: Path, flag: str = "--out") -> Path:
    """``path`` once its folder exists and can be written to, and it is not a folder itself."""
    if path.is_dir():
        raise ValueError(f"{flag}: {str(path)!r} is a folder; name a file")
    _make_folder(path.parent, f"{flag}: cannot write {str(path)!r}")
    return path


def _make_folder(folder: Path, failure: str) -> None:
    """Create ``folder`` if need be; a ValueError starting with ``failure`` says why it cannot take new files."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{failure}: {str(folder)!r} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{failure}: cannot create {str(folder)!r} ({error.strerror})") from error
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{failure}: {str(folder)!r} is not writable")
