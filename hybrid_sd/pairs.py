"""Model pairs: a large cloud model and a small edge model (UNet, optional own text encoders,
VAE or tiny decoder) sharing one latent space; presets, loading and compatibility checks."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoModel, DiffusionPipeline, UNet2DConditionModel
from huggingface_hub import try_to_load_from_cache

from hybrid_sd.bundle import pair_edge_bundle
from hybrid_sd.denoiser import Denoiser
from hybrid_sd.devices import check_device
from hybrid_sd.errors import IncompatibleModelsError
from hybrid_sd.latent_space import (
    LATENT_SPACE_BY_SCALING,
    latent_space_name,
    pipeline_latent_space,
    unet_family,
    vae_latent_space,
)
from hybrid_sd.lowbit.storage import QUANTIZATION_FILE, load_quantized_unet
from hybrid_sd.model_refs import check_models, loading, resolve
from hybrid_sd.presets import EMBEDDED_PRESETS, PAIR_NAMES, PRESETS, TINY_PRESETS, PairSpec
from hybrid_sd.pruned.storage import PRUNING_FILE, load_pruned_unet
from hybrid_sd.request import GenerationRequest
from hybrid_sd.shapes_pair.pair_models import GUIDANCE_SCALE
from hybrid_sd.tiny_models import save_tiny_pair

logger = logging.getLogger(__name__)

TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


@dataclass
class ModelPair:
    cloud: Denoiser
    edge: Denoiser


def cache_dir() -> Path:
    return Path(os.environ.get("HYBRID_SD_HOME", Path.home() / ".cache" / "hybrid-sd"))


def preset(name: str) -> PairSpec:
    """The spec of a named pair; tiny pairs are built into :func:`cache_dir` the first time."""
    if name in PRESETS:
        return PRESETS[name]
    if name in EMBEDDED_PRESETS:
        return embedded_spec(EMBEDDED_PRESETS[name])
    if name not in TINY_PRESETS:
        if Path(name).is_dir():
            return embedded_spec(Path(name))
        raise ValueError(f"pair must be one of {', '.join(PAIR_NAMES)} or a trained pair's folder, got {name!r}")
    root = cache_dir() / name
    if not (root / "edge-vae" / "config.json").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{name}-"))
        save_tiny_pair(TINY_PRESETS[name], staging)
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)  # atomic: a concurrent or interrupted build never leaves half a pair
    return PairSpec(
        str(root / "cloud"),
        str(root / "edge"),
        str(root / "edge-vae"),
        TINY_PRESETS[name],
        description=f"random-weight {TINY_PRESETS[name]}-architecture pair built from config",
    )


def embedded_spec(root: Path) -> PairSpec:
    """The spec of a trained pair folder: ``cloud/`` with an edge on the cloud's text encoder, either an edge
    bundle in ``edge/`` (as the shipped pair: ``hybrid-sd compress`` made it) or ``edge-unet/`` and
    ``edge-vae/`` (as ``hybrid-sd train-shapes`` writes it), and an optional ``serving.json`` of the pair's
    serving defaults (``{"timestep_power": p}``)."""
    vae_config = root / "cloud" / "vae" / "config.json"
    if not vae_config.is_file():
        raise ValueError(f"no trained pair at {root} (missing {vae_config}); see hybrid-sd train-shapes")
    scaling_factor = json.loads(vae_config.read_text())["scaling_factor"]
    edge, edge_vae = root / "edge-unet", root / "edge-vae"
    bundle = pair_edge_bundle(root)
    if bundle is not None:
        edge, edge_vae = bundle.unet, bundle.vae or edge_vae
    return PairSpec(
        str(root / "cloud"),
        str(edge),
        str(edge_vae),
        latent_space_name(scaling_factor),
        edge_shares_text_encoder=True,
        description=f"trained pair at {root}",
        guidance_scale=GUIDANCE_SCALE,
        timestep_power=serving_defaults(root / SERVING_FILE).get("timestep_power"),
    )


SERVING_FILE = "serving.json"


def serving_defaults(path: Path) -> dict:
    """A trained pair's serving defaults (``serving.json``; none where it is missing), checked as a request's
    fields are; ``ValueError`` naming the file and the field."""
    if not path.is_file():
        return {}
    try:
        defaults = json.loads(path.read_text())
        if not isinstance(defaults, dict) or set(defaults) - {"timestep_power"}:
            raise ValueError(f"must be a JSON object that may set timestep_power, got {defaults!r}")
        GenerationRequest("", **defaults).check()
    except ValueError as error:  # JSONDecodeError too
        raise ValueError(f"{path}: {error}") from None
    return defaults


def load_pair(spec: PairSpec, device: str = "cpu", dtype: torch.dtype = torch.float32) -> ModelPair:
    """Load both models and check that they can hand over to each other."""
    check_models(spec.cloud, spec.edge, spec.edge_vae)  # all of them, before the first one loads
    cloud = load_cloud(spec, device, dtype)
    pair = ModelPair(cloud, load_edge(spec, device, dtype, cloud_pipe=cloud.pipe))
    check_pair(pair, spec.edge_vae_latent_space)
    return pair


def load_cloud(spec: PairSpec, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Denoiser:
    check_device(device)
    pipe = _place(load_pipeline(spec.cloud, dtype), device, dtype)
    return Denoiser(pipe, spec.cloud, None, spec.guidance_scale, spec.timestep_power)


def load_edge(
    spec: PairSpec,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    cloud_pipe: DiffusionPipeline | None = None,
) -> Denoiser:
    """The edge model. A bare UNet runs on the cloud model's text encoders and VAE, and a pipeline
    that shares the cloud's text encoders gets them: from ``cloud_pipe`` in one process, else loaded
    from the cloud model without its UNet."""
    check_device(device)
    edge_is_pipeline = _is_pipeline(spec.edge)
    if cloud_pipe is None and (spec.edge_shares_text_encoder or not edge_is_pipeline):
        cloud_pipe = load_pipeline(spec.cloud, dtype, unet=None)
    if edge_is_pipeline:
        shared = {}
        if spec.edge_shares_text_encoder:
            shared = {name: getattr(cloud_pipe, name) for name in TEXT_COMPONENTS if hasattr(cloud_pipe, name)}
        edge_pipe = load_pipeline(spec.edge, dtype, **shared)
    else:
        edge_pipe = type(cloud_pipe).from_pipe(cloud_pipe, unet=load_unet(spec.edge, dtype))
    latent_space = pipeline_latent_space(edge_pipe)  # that of the VAE the UNet comes with
    if spec.edge_vae is not None:
        # Assigned, not passed to from_pipe: the pipeline derives vae_scale_factor from an
        # AutoencoderKL config, which AutoencoderTiny does not have (as in diffusers' TAESD docs).
        edge_pipe.vae = load_vae(spec.edge_vae, dtype)
    return Denoiser(_place(edge_pipe, device, dtype), spec.edge, latent_space, spec.guidance_scale, spec.timestep_power)


def _place(pipe: DiffusionPipeline, device: str, dtype: torch.dtype) -> DiffusionPipeline:
    pipe.to(device)
    if dtype == torch.float16 and pipe.vae.config.get("force_upcast", False):
        pipe.vae.to(torch.float32)  # as diffusers' SDXL pipeline does: the VAE overflows in fp16
    return pipe


def load_pipeline(path: str, dtype: torch.dtype, **components) -> DiffusionPipeline:
    """``DiffusionPipeline.from_pretrained``, without the safety checker (not part of serving)."""
    source = resolve(path)
    with loading(path):
        model_index = DiffusionPipeline.load_config(source)
        if "safety_checker" in model_index:
            components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        return DiffusionPipeline.from_pretrained(source, dtype=dtype, **components)


def load_vae(path: str, dtype: torch.dtype) -> torch.nn.Module:
    """A VAE or tiny decoder folder (AutoencoderKL or AutoencoderTiny)."""
    source = resolve(path)
    with loading(path):
        return AutoModel.from_pretrained(source, dtype=dtype)


def _is_pipeline(path: str) -> bool:
    source = resolve(path)
    if Path(source).is_dir():
        return (Path(source) / "model_index.json").is_file()
    return isinstance(try_to_load_from_cache(source, "model_index.json"), str)  # resolve fetched it if there is one


def load_unet(path: str, dtype: torch.dtype) -> UNet2DConditionModel:
    """A UNet folder (or a pipeline's ``unet/``): standard, pruned (``pruning.json``) or low-bit
    (``quantization.json``)."""
    source = resolve(path)
    subfolder = "unet" if (Path(source) / "unet" / "config.json").is_file() else None
    folder = Path(source, subfolder or "")
    with loading(path):
        if (folder / QUANTIZATION_FILE).is_file():  # low-bit weights (hybrid-sd compress quantize), maybe pruned
            return load_quantized_unet(folder, dtype)
        if (folder / PRUNING_FILE).is_file():  # channel- or head-pruned
            return load_pruned_unet(folder, dtype)
        return UNet2DConditionModel.from_pretrained(source, subfolder=subfolder, dtype=dtype)


def check_pair(pair: ModelPair, edge_vae_latent_space: str | None = None) -> None:
    """Raise :class:`IncompatibleModelsError` naming both models if the edge cannot continue the
    cloud's latents."""
    cloud, edge = pair.cloud, pair.edge
    models = f"cloud model {cloud.name!r} and edge model {edge.name!r}"
    family = unet_family(cloud.pipe)
    if cloud.latent_space in LATENT_SPACE_BY_SCALING.values() and cloud.latent_space != family:
        raise IncompatibleModelsError(f"cloud model {cloud.name!r} has a {family} UNet but a {cloud.latent_space} VAE")
    if edge.latent_space != cloud.latent_space:
        raise IncompatibleModelsError(
            f"{models} denoise in different latent spaces ({cloud.latent_space} and {edge.latent_space})"
        )
    edge_vae_space = vae_latent_space(edge.pipe.vae) or edge_vae_latent_space
    if edge_vae_space is None:
        logger.warning("cannot tell the latent space of %s's decoder; assuming %s", edge.name, edge.latent_space)
    elif edge_vae_space != cloud.latent_space:
        raise IncompatibleModelsError(
            f"{models}: the edge decoder is for the {edge_vae_space} latent space, the cloud"
            f" denoises in {cloud.latent_space}"
        )
    for key in (
        "in_channels",
        "out_channels",
        "projection_class_embeddings_input_dim",
        "addition_time_embed_dim",
    ):
        cloud_value, edge_value = cloud.pipe.unet.config.get(key), edge.pipe.unet.config.get(key)
        if cloud_value != edge_value:
            raise IncompatibleModelsError(f"{models} have different UNet {key} ({cloud_value} and {edge_value})")
    if cloud.text_encoder_id == edge.text_encoder_id:
        cloud_dim = cloud.pipe.unet.config.cross_attention_dim
        edge_dim = edge.pipe.unet.config.cross_attention_dim
        if cloud_dim != edge_dim:
            raise IncompatibleModelsError(
                f"{models} share text encoders but have different cross_attention_dim ({cloud_dim} and {edge_dim})"
            )
