"""Channel and head pruning to a parameter or MAC budget, least significant units first."""

from __future__ import annotations

import copy
import logging
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

from diffusers import UNet2DConditionModel

from compression.prune.calibration import Calibration
from compression.prune.cost import count_macs, count_params, module_macs, unit_costs
from compression.prune.significance import measure_significance
from compression.prune.units import GROUP, PruneUnit, find_units, unit_channels, unit_count, unit_kind
from hybrid_sd.pruned.reshape import shrink_attention, shrink_resnet

logger = logging.getLogger(__name__)

METRICS = ("params", "macs")


@dataclass
class PruneReport:
    """What :func:`prune_channels` did; MACs are per UNet evaluation of one calibration latent."""

    metric: str
    budget: float
    target: float
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    removed: list[str]
    significance: dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


def check_budget(budget: float, metric: str) -> None:
    """A ValueError naming ``budget`` or ``metric`` unless they are a fraction in (0, 1] and one of METRICS."""
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction in (0, 1], got {budget!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def prune_channels(
    unet: UNet2DConditionModel,
    budget: float,
    calibration: Calibration,
    metric: str = "params",
    significance: dict[str, float] | None = None,
) -> tuple[UNet2DConditionModel, PruneReport]:
    """A copy of ``unet`` pruned to at most ``budget`` (a fraction in (0, 1]) of its parameters or
    MACs: resnet channel groups and attention heads are removed in order of
    :func:`measure_significance` (one-shot, on the unpruned model; pass ``significance`` to reuse
    scores) until the budget is met, keeping at least one group or head per module."""
    check_budget(budget, metric)
    student = copy.deepcopy(unet)
    units = find_units(student)
    if significance is None:
        significance = measure_significance(student, calibration, units)
    macs = module_macs(student, calibration)
    costs = unit_costs(student, units, macs if metric == "macs" else None)
    params_before = count_params(student)
    total = params_before if metric == "params" else macs[""]
    target = budget * total
    current = total
    left = Counter(unit.module for unit in units)
    removed = []
    for unit in sorted(units, key=lambda unit: (significance[unit.name], unit.name)):
        if current <= target:
            break
        if left[unit.module] > 1:
            left[unit.module] -= 1
            removed.append(unit)
            current -= costs[unit]
    if current > target:
        raise ValueError(
            f"budget {budget!r} is out of reach: with one group or head left per module the model keeps"
            f" {current / total:.4f} of its {metric}"
        )
    _remove(student, removed)
    report = PruneReport(
        metric=metric,
        budget=budget,
        target=target,
        params_before=params_before,
        params_after=count_params(student),
        macs_before=macs[""],
        macs_after=count_macs(student, calibration),
        removed=[unit.name for unit in removed],
        significance=significance,
    )
    logger.info("pruned %d units: %d -> %d %s", len(removed), total, current, metric)
    return student, report


def _remove(unet: UNet2DConditionModel, units: list[PruneUnit]) -> None:
    """Shrink every module that loses units, keeping the others' weights."""
    modules = dict(unet.named_modules())
    dropped = defaultdict(set)
    for unit in units:
        dropped[unit.module].add(unit.index)
    for name, indices in dropped.items():
        module = modules[name]
        kept = [index for index in range(unit_count(module)) if index not in indices]
        if unit_kind(module) == GROUP:
            shrink_resnet(module, unit_channels(module, kept), len(kept))
        else:
            shrink_attention(module, kept)
