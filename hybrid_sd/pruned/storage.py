"""Save and load pruned UNets: a standard diffusers folder plus ``pruning.json`` where needed.

A diffusers config cannot express per-module widths, so channel- and head-pruned UNets carry a
config extension next to ``config.json``::

    {
      "format": "hybrid-sd-pruning",
      "version": 1,
      "resnets": {"down_blocks.0.resnets.0": {"channels": 24, "groups": 6}},
      "attentions": {"mid_block.attentions.0.transformer_blocks.0.attn1": {"heads": 5}}
    }

``resnets`` gives a ResnetBlock2D's inner width (conv1 outputs, norm2, conv2 inputs) and norm2's
group count; ``attentions`` the heads an Attention keeps, each of the config's head dimension.
Modules not listed have the shapes ``config.json`` gives them. The weights are the usual
safetensors file(s). Block-removed UNets need no extension and load with ``from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from safetensors.torch import load_file

from hybrid_sd.pruned.empty import assign_weights, empty_unet
from hybrid_sd.pruned.reshape import shrink_attention, shrink_resnet

PRUNING_FILE = "pruning.json"
FORMAT, VERSION = "hybrid-sd-pruning", 1
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def pruned_shapes(unet: UNet2DConditionModel) -> dict:
    """The ``pruning.json`` content: modules whose shapes differ from what the config builds."""
    standard = dict(empty_unet(unet.config).named_modules())
    resnets, attentions = {}, {}
    for name, module in unet.named_modules():
        if isinstance(module, ResnetBlock2D):
            shape = {"channels": module.conv1.out_channels, "groups": module.norm2.num_groups}
            if shape != {"channels": standard[name].conv1.out_channels, "groups": standard[name].norm2.num_groups}:
                resnets[name] = shape
        elif isinstance(module, Attention) and module.heads != standard[name].heads:
            attentions[name] = {"heads": module.heads}
    return {"format": FORMAT, "version": VERSION, "resnets": resnets, "attentions": attentions}


def save_pruned(unet: UNet2DConditionModel, path: str | Path) -> Path:
    """``save_pretrained`` plus, when the shapes need it, ``pruning.json``."""
    path = Path(path)
    unet.save_pretrained(path)
    shapes = pruned_shapes(unet)
    if shapes["resnets"] or shapes["attentions"]:
        (path / PRUNING_FILE).write_text(json.dumps(shapes, indent=2) + "\n")
    else:
        (path / PRUNING_FILE).unlink(missing_ok=True)
    return path


def load_pruned_unet(path: str | Path, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """Build the config's UNet, reshape the modules ``pruning.json`` lists, load the weights."""
    path = Path(path)
    unet = empty_unet(UNet2DConditionModel.load_config(path))
    pruning_file = path / PRUNING_FILE
    if pruning_file.is_file():
        apply_shapes(unet, json.loads(pruning_file.read_text()))
    return assign_weights(unet, {key: value.to(dtype) for key, value in _weights(path).items()}).eval()


def apply_shapes(unet: UNet2DConditionModel, shapes: dict) -> None:
    """Give the modules ``shapes`` lists (``pruning.json`` content) those shapes; weights are left
    for the caller to load."""
    if shapes.get("format") != FORMAT or shapes.get("version") != VERSION:
        raise ValueError(
            f"{PRUNING_FILE} must have format {FORMAT!r} version {VERSION},"
            f" got {shapes.get('format')!r} version {shapes.get('version')!r}"
        )
    modules = dict(unet.named_modules())
    for name, shape in shapes["resnets"].items():
        # Only the shapes matter here: the weights of the kept channels come from the file.
        shrink_resnet(modules[name], torch.arange(shape["channels"]), shape["groups"])
    for name, shape in shapes["attentions"].items():
        shrink_attention(modules[name], range(shape["heads"]))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    index = path / f"{WEIGHTS_FILE}.index.json"
    if not index.is_file():
        return load_file(path / WEIGHTS_FILE)
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return {key: value for shard in shards for key, value in load_file(path / shard).items()}
