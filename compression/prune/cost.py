"""What a model costs: parameters, and multiply-accumulates per UNet evaluation."""

from __future__ import annotations

from collections.abc import Sequence

from diffusers import UNet2DConditionModel
from torch import nn

from compression.prune.calibration import Calibration
from compression.prune.units import GROUP, PruneUnit, unit_count
from hybrid_sd.flop_count import flop_counter


def count_params(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def count_macs(unet: UNet2DConditionModel, calibration: Calibration) -> int:
    """MACs of one UNet evaluation of the calibration's first latent."""
    return module_macs(unet, calibration)[""]


def module_macs(unet: UNet2DConditionModel, calibration: Calibration) -> dict[str, int]:
    """MACs (half of FlopCounterMode's FLOPs) of each module, by name; ``""`` is the whole UNet."""
    with flop_counter() as counter:
        calibration.first().run(unet)
    root = type(unet).__name__
    macs = {}
    for name, counts in counter.get_flop_counts().items():
        if name == root or name.startswith(root + "."):
            macs[name[len(root) + 1 :]] = sum(counts.values()) // 2
    return macs


def unit_costs(
    unet: UNet2DConditionModel, units: Sequence[PruneUnit], macs: dict[str, int] | None = None
) -> dict[PruneUnit, int]:
    """What removing each unit saves: parameters, or MACs when ``macs`` (from :func:`module_macs`)
    is given. Every layer a unit touches is linear in the number of units, so a unit saves an
    equal share of them."""
    modules = dict(unet.named_modules())
    costs = {}
    for unit in units:
        module = modules[unit.module]
        if unit.kind == GROUP and macs is None:
            total = count_params(module.conv1) + count_params(module.norm2) + module.conv2.weight.numel()
            if module.time_emb_proj is not None:
                total += count_params(module.time_emb_proj)
        elif unit.kind == GROUP:
            total = sum(macs.get(f"{unit.module}.{name}", 0) for name in ("conv1", "time_emb_proj", "conv2"))
        elif macs is None:
            projections = (module.to_q, module.to_k, module.to_v)
            total = sum(count_params(layer) for layer in projections) + module.to_out[0].weight.numel()
        else:
            total = macs[unit.module]
        costs[unit] = total // unit_count(module)
    return costs
