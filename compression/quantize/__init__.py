"""Quantization tools: timestep-aware calibration of static activation scales and per-layer kernel choice
(the run-time layers live in :mod:`hybrid_sd.lowbit`)."""

from compression.quantize.calibrate import LayerChoice, calibrate, choices_to_dict

__all__ = ["LayerChoice", "calibrate", "choices_to_dict"]
