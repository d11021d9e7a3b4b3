"""Structured pruning of ``UNet2DConditionModel``: BK-SDM block removal, significance-scored
channel and attention-head pruning, and width pruning of every layer (torch-pruning), to a
parameter or MAC budget."""

from compression.prune.blocks import remove_blocks
from compression.prune.calibration import Calibration
from compression.prune.channels import PruneReport, prune_channels
from compression.prune.cost import count_macs, count_params
from compression.prune.significance import measure_significance
from compression.prune.units import PruneUnit, find_units
from compression.prune.width import WidthReport, prune_widths
from hybrid_sd.pruned.storage import PRUNING_FILE, load_pruned_unet, save_pruned

__all__ = [
    "PRUNING_FILE",
    "Calibration",
    "PruneReport",
    "PruneUnit",
    "WidthReport",
    "count_macs",
    "count_params",
    "find_units",
    "load_pruned_unet",
    "measure_significance",
    "prune_channels",
    "prune_widths",
    "remove_blocks",
    "save_pruned",
]
