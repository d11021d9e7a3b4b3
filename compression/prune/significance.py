"""How much each pruning unit matters, measured on the model's own outputs (as Hybrid-SD scores
its structured pruning, arXiv 2408.06646)."""

from __future__ import annotations

from collections.abc import Sequence

from diffusers import UNet2DConditionModel
from tqdm import tqdm

from compression.prune.calibration import Calibration
from compression.prune.units import PruneUnit, find_units, masked


def measure_significance(
    unet: UNet2DConditionModel, calibration: Calibration, units: Sequence[PruneUnit] | None = None
) -> dict[str, float]:
    """For each unit (default: :func:`find_units`), by :attr:`PruneUnit.name`: the relative L2
    distance ``||y' - y|| / ||y||`` between the UNet's predictions on the calibration batch with
    that unit alone removed (``y'``) and intact (``y``). One UNet evaluation per unit."""
    units = find_units(unet) if units is None else units
    reference = calibration.run(unet)
    scale = reference.norm()
    scores = {}
    for unit in tqdm(units, desc="significance of each unit"):
        with masked(unet, [unit]):
            scores[unit.name] = ((calibration.run(unet) - reference).norm() / scale).item()
    return scores
