"""Edge bundles: what ``hybrid-sd compress`` writes and ``serve edge --bundle`` / ``--edge-bundle`` load.

A bundle is a folder::

    bundle.json   {"format": "hybrid-sd-edge-bundle", "version": 1, "vae_latent_space": "sd1" | null,
                   "history": [{"action": "prune", ...}, ...]}
    card.json     size, MACs per UNet step and, once measured, quality (hybrid-sd compress export)
    unet/         a UNet folder: standard, pruned (pruning.json) or low-bit (quantization.json)
    vae/          optional: the edge decoder (AutoencoderKL or AutoencoderTiny)

The UNet runs on the cloud model's text encoders; without ``vae/`` the pair's own edge decoder is used.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from hybrid_sd.errors import IncompatibleModelsError
from hybrid_sd.presets import PairSpec
from hybrid_sd.user_files import output_folder

BUNDLE_FILE, CARD_FILE = "bundle.json", "card.json"
FORMAT, VERSION = "hybrid-sd-edge-bundle", 1


@dataclass
class Bundle:
    """A bundle folder's description; ``history`` lists the compress actions that made it, oldest first."""

    path: Path
    vae_latent_space: str | None = None
    history: list[dict] = field(default_factory=list)

    @property
    def unet(self) -> Path:
        return self.path / "unet"

    @property
    def vae(self) -> Path | None:
        vae = self.path / "vae"
        return vae if (vae / "config.json").is_file() else None

    @property
    def card(self) -> dict:
        card = self.path / CARD_FILE
        return json.loads(card.read_text()) if card.is_file() else {}

    def write(self, card: dict) -> None:
        """Write ``bundle.json`` and ``card.json`` (the UNet and decoder folders are written by the caller)."""
        record = {"format": FORMAT, "version": VERSION, "vae_latent_space": self.vae_latent_space}
        (self.path / BUNDLE_FILE).write_text(json.dumps({**record, "history": self.history}, indent=2) + "\n")
        (self.path / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")


def read_bundle(path: str | Path) -> Bundle:
    """The bundle at ``path``; a ValueError names what is missing or malformed."""
    path = Path(path)
    record_file = path / BUNDLE_FILE
    if not record_file.is_file():
        raise ValueError(f"bundle: {path} is not an edge bundle (no {BUNDLE_FILE}); see hybrid-sd compress")
    try:
        record = json.loads(record_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"bundle: cannot read {record_file}: {error}") from error
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("version") != VERSION:
        raise ValueError(f"bundle: {record_file} is not a {FORMAT} version {VERSION} file")
    bundle = Bundle(path, record.get("vae_latent_space"), record.get("history", []))
    if not (bundle.unet / "config.json").is_file():
        raise ValueError(f"bundle: {path} has no unet/config.json")
    return bundle


def pair_edge_bundle(pair_dir: Path) -> Bundle | None:
    """The edge bundle a trained pair's folder holds as ``edge/``, or None (train-shapes' own layout)."""
    return read_bundle(pair_dir / "edge") if (pair_dir / "edge" / BUNDLE_FILE).is_file() else None


def check_out(out: str | Path, source: Bundle | None = None) -> Path:
    """``out`` if a bundle may be written there: a new or empty folder, or a bundle other than ``source``."""
    out = Path(out)
    if source is not None and out.resolve() == source.path.resolve():
        raise ValueError(f"out: {out} is the input bundle; write to a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (out / BUNDLE_FILE).is_file():
        raise ValueError(f"out: {out} exists and is not an edge bundle; refusing to overwrite it")
    output_folder(out.parent, "out")
    return out


def start_bundle(out: str | Path, source: Bundle | None) -> Bundle:
    """An empty bundle folder at ``out`` (replacing a bundle there, never another folder) that carries over
    ``source``'s decoder and history."""
    out = check_out(out, source)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if source is None:
        return Bundle(out)
    if source.vae is not None:
        shutil.copytree(source.vae, out / "vae")
    return Bundle(out, source.vae_latent_space, list(source.history))


def bundle_spec(spec: PairSpec, path: str | Path) -> PairSpec:
    """``spec`` with its edge model replaced by the bundle at ``path`` (on the cloud's text encoders)."""
    bundle = read_bundle(path)
    vae, latent_space = spec.edge_vae, spec.edge_vae_latent_space
    known = bundle.vae is not None and None not in (latent_space, bundle.vae_latent_space)
    if known and bundle.vae_latent_space != latent_space:
        raise IncompatibleModelsError(
            f"bundle: {path} decodes the {bundle.vae_latent_space} latent space, the pair's models denoise in"
            f" {latent_space}; use a bundle compressed from this pair"
        )
    if bundle.vae is not None:
        vae, latent_space = str(bundle.vae), bundle.vae_latent_space
    return dataclasses.replace(
        spec,
        edge=str(bundle.unet),
        edge_vae=vae,
        edge_vae_latent_space=latent_space,
        edge_shares_text_encoder=True,
        description=f"{spec.description}; edge from the bundle at {path}",
    )


def folder_bytes(path: Path) -> int:
    """Bytes of the weight files below ``path``."""
    return sum(file.stat().st_size for file in path.rglob("*.safetensors"))
