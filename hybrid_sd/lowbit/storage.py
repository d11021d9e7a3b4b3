"""Quantized UNet folders: diffusers' ``config.json``, the quantized state dict as safetensors, and
``quantization.json`` saying how to rebuild the low-bit layers before loading it (and, for a pruned UNet,
its ``pruning.json``)::

    {"format": "hybrid-sd-lowbit", "version": 1, "config": {QuantConfig fields}, "quantized": [...], "kept": {...}}
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from hybrid_sd.lowbit.config import QuantConfig
from hybrid_sd.lowbit.model import QuantReport, quantize_model
from hybrid_sd.pruned.empty import assign_weights, empty_unet
from hybrid_sd.pruned.storage import PRUNING_FILE, apply_shapes, write_shapes

QUANTIZATION_FILE = "quantization.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
FORMAT, VERSION = "hybrid-sd-lowbit", 1


def save_quantized_unet(unet: UNet2DConditionModel, config: QuantConfig, report: QuantReport, path: Path) -> None:
    """Write a UNet quantized by ``quantize_model(unet, config)`` (which returned ``report``) to ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    unet.save_config(path)
    save_file({name: tensor.contiguous() for name, tensor in unet.state_dict().items()}, path / WEIGHTS_FILE)
    record = {
        "format": FORMAT,
        "version": VERSION,
        "config": asdict(config),
        "quantized": report.quantized,
        "kept": report.kept,
    }
    (path / QUANTIZATION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    write_shapes(unet, path)


def load_quantized_unet(path: Path, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """The quantized UNet saved at ``path``: its float skeleton on the meta device (pruned as saved), the saved
    layers swapped for quantized ones of the saved config, then every tensor assigned from the file."""
    if dtype != torch.float32:
        raise ValueError(f"dtype: a quantized UNet keeps float32 activations outside its int8 kernels, got {dtype}")
    record = json.loads((path / QUANTIZATION_FILE).read_text())
    if record.get("format") != FORMAT or record.get("version") != VERSION:
        raise ValueError(f"{path / QUANTIZATION_FILE} is not a {FORMAT} version {VERSION} file")
    unet = empty_unet(UNet2DConditionModel.load_config(path))
    if (path / PRUNING_FILE).is_file():
        apply_shapes(unet, json.loads((path / PRUNING_FILE).read_text()))
    report = quantize_model(unet, QuantConfig(**record["config"]), names=set(record["quantized"]), weights=False)
    if report.quantized != record["quantized"]:
        raise ValueError(f"{path}: the saved configuration no longer quantizes the layers it did when saved")
    return assign_weights(unet, load_file(path / WEIGHTS_FILE)).eval()
