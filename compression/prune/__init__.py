"""Structured pruning of ``UNet2DConditionModel``: BK-SDM block removal, and significance-scored
channel and attention-head pruning to a parameter or MAC budget."""

from compression.prune.blocks import remove_blocks
from compression.prune.calibration import Calibration
from compression.prune.channels import PruneReport, prune_channels
from compression.prune.cost import count_macs, count_params
from compression.prune.significance import measure_significance
from compression.prune.units import PruneUnit, find_units
from hybrid_sd.pruned.storage import PRUNING_FILE, load_pruned_unet, save_pruned

__all__ = [
    "PRUNING_FILE",
    "Calibration",
    "PruneReport",
    "PruneUnit",
    "count_macs",
    "count_params",
    "find_units",
    "load_pruned_unet",
    "measure_significance",
    "prune_channels",
    "remove_blocks",
    "save_pruned",
]
