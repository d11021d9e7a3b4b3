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

Width-pruned UNets (any layer at any width) need version 2, which lists the shape attributes
(:data:`SHAPE_ATTRIBUTES`) of every module where they differ from what the config builds::

    {
      "format": "hybrid-sd-pruning",
      "version": 2,
      "modules": {
        "conv_in": {"out_channels": 28},
        "down_blocks.0.resnets.0.norm1": {"num_groups": 7, "num_channels": 28},
        "mid_block.attentions.0.transformer_blocks.0.attn1": {"inner_dim": 56, "scale": 0.1336}
      }
    }

:func:`save_pruned` writes version 1 when it describes the model. Modules not listed have the
shapes ``config.json`` gives them. The weights are the usual safetensors file(s). Block-removed
UNets need no extension and load with ``from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from safetensors.torch import load_file
from torch import nn

from hybrid_sd.pruned.empty import assign_weights, empty_unet
from hybrid_sd.pruned.reshape import shrink_attention, shrink_resnet

PRUNING_FILE = "pruning.json"
FORMAT, VERSIONS = "hybrid-sd-pruning", (1, 2)
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
# The attributes that give each kind of module its shape (low-bit layers keep their float layer's).
SHAPE_ATTRIBUTES = {
    nn.Conv2d: ("in_channels", "out_channels"),
    nn.Linear: ("in_features", "out_features"),
    nn.GroupNorm: ("num_groups", "num_channels"),
    nn.LayerNorm: ("normalized_shape",),
    Attention: ("heads", "sliceable_head_dim", "inner_dim", "inner_kv_dim", "scale"),
    Upsample2D: ("channels", "out_channels"),
    Downsample2D: ("channels", "out_channels"),
}


def pruned_shapes(unet: UNet2DConditionModel) -> dict | None:
    """The ``pruning.json`` content, version 1 where it suffices, else 2; ``None`` when every module has
    the shape the config builds."""
    standard = empty_unet(unet.config)
    modules = _differences(unet, standard)
    if not modules:
        return None
    units = _unit_shapes(unet, standard)
    rebuilt = empty_unet(unet.config)
    apply_shapes(rebuilt, units)
    if _differences(rebuilt, standard) == modules:
        return units
    return {"format": FORMAT, "version": 2, "modules": modules}


def write_shapes(unet: UNet2DConditionModel, path: Path) -> None:
    """Write ``unet``'s ``pruning.json`` into the folder ``path``, or remove it when none is needed."""
    shapes = pruned_shapes(unet)
    if shapes is None:
        (path / PRUNING_FILE).unlink(missing_ok=True)
    else:
        (path / PRUNING_FILE).write_text(json.dumps(shapes, indent=2) + "\n")


def _differences(unet: UNet2DConditionModel, standard: UNet2DConditionModel) -> dict[str, dict]:
    """The :data:`SHAPE_ATTRIBUTES` of ``unet``'s modules that differ from ``standard``'s, by module name."""
    modules = dict(unet.named_modules())
    differences = {}
    for name, module in standard.named_modules():
        attributes = next((names for kind, names in SHAPE_ATTRIBUTES.items() if type(module) is kind), ())
        changed = {
            attribute: getattr(modules[name], attribute)
            for attribute in attributes
            if getattr(modules[name], attribute) != getattr(module, attribute)
        }
        if changed:
            differences[name] = {
                key: list(value) if isinstance(value, tuple) else value for key, value in changed.items()
            }
    return differences


def _unit_shapes(unet: UNet2DConditionModel, standard: UNet2DConditionModel) -> dict:
    """The version 1 ``pruning.json`` content: resnets' inner widths and attentions' heads."""
    standard = dict(standard.named_modules())
    resnets, attentions = {}, {}
    for name, module in unet.named_modules():
        if isinstance(module, ResnetBlock2D):
            shape = {"channels": module.conv1.out_channels, "groups": module.norm2.num_groups}
            if shape != {"channels": standard[name].conv1.out_channels, "groups": standard[name].norm2.num_groups}:
                resnets[name] = shape
        elif isinstance(module, Attention) and module.heads != standard[name].heads:
            attentions[name] = {"heads": module.heads}
    return {"format": FORMAT, "version": 1, "resnets": resnets, "attentions": attentions}


def save_pruned(unet: UNet2DConditionModel, path: str | Path) -> Path:
    """``save_pretrained`` plus, when the shapes need it, ``pruning.json``."""
    path = Path(path)
    unet.save_pretrained(path)
    write_shapes(unet, path)
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
    if shapes.get("format") != FORMAT or shapes.get("version") not in VERSIONS:
        raise ValueError(
            f"{PRUNING_FILE} must have format {FORMAT!r} version 1 or 2,"
            f" got {shapes.get('format')!r} version {shapes.get('version')!r}"
        )
    modules = dict(unet.named_modules())
    if shapes["version"] == 2:
        for name, attributes in shapes["modules"].items():
            _reshape(modules[name], attributes)
        return
    for name, shape in shapes["resnets"].items():
        # Only the shapes matter here: the weights of the kept channels come from the file.
        shrink_resnet(modules[name], torch.arange(shape["channels"]), shape["groups"])
    for name, shape in shapes["attentions"].items():
        shrink_attention(modules[name], range(shape["heads"]))


def _reshape(module: nn.Module, attributes: dict) -> None:
    """Give ``module`` the shape ``attributes`` and, if it has weights, empty ones of that shape on their device."""
    for attribute, value in attributes.items():
        setattr(module, attribute, tuple(value) if isinstance(value, list) else value)
    if isinstance(module, nn.Conv2d):
        weight = (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
        shapes = {"weight": weight, "bias": (module.out_channels,)}
    elif isinstance(module, nn.Linear):
        shapes = {"weight": (module.out_features, module.in_features), "bias": (module.out_features,)}
    elif isinstance(module, nn.GroupNorm):
        shapes = {"weight": (module.num_channels,), "bias": (module.num_channels,)}
    elif isinstance(module, nn.LayerNorm):
        shapes = {"weight": module.normalized_shape, "bias": module.normalized_shape}
    else:
        return
    for name, shape in shapes.items():
        tensor = getattr(module, name)
        if tensor is not None:
            setattr(module, name, nn.Parameter(torch.empty(shape, dtype=tensor.dtype, device=tensor.device)))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    index = path / f"{WEIGHTS_FILE}.index.json"
    if not index.is_file():
        return load_file(path / WEIGHTS_FILE)
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return {key: value for shard in shards for key, value in load_file(path / shard).items()}
