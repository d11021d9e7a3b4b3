"""Timestep-aware calibration of static activation scales, and the per-layer choice of kernel.

As Q-Diffusion (Li et al. 2023) observes, a diffusion UNet's activation ranges change with the timestep,
so the calibration data are the UNet's own inputs along whole sampling trajectories (every step of
every calibration prompt), not one noise level. Each Linear and Conv2d gets one static input range over
all of them. Then, for every layer, its quantized form is run on its recorded inputs at each timestep
and compared with the float layer: the layer is quantized only if its worst relative output error over
the timesteps stays within ``max_error`` and the quantized kernel is faster on that input; otherwise it
stays in float and the report says why.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from tqdm import tqdm

from compression.prune.calibration import Calibration
from hybrid_sd.lowbit import QuantConfig, quantize_model
from hybrid_sd.lowbit.model import QUANTIZED_TYPES, QuantReport

TIMING_REPEATS = 5


@dataclass
class LayerChoice:
    """What calibration found for one layer: its input range over all timesteps, the worst relative
    error of its quantized output (and at which timestep), both kernels' times and the decision."""

    name: str
    low: float
    high: float
    error: float
    worst_timestep: int
    float_ms: float
    quantized_ms: float
    quantized: bool
    reason: str


@dataclass
class _Observation:
    low: float = float("inf")
    high: float = float("-inf")
    error: float = 0.0
    worst_timestep: int = -1
    sample: torch.Tensor | None = None  # one recorded input, for timing


def calibrate(
    unet: UNet2DConditionModel,
    calls: Sequence[Calibration],
    config: QuantConfig,
    max_error: float = 0.05,
    min_speedup: float = 1.0,
) -> tuple[QuantReport, list[LayerChoice]]:
    """Quantize ``unet`` in place with ``config``, static input scales calibrated on ``calls`` (the UNet
    inputs of every sampling step) and each layer kept in float unless it passes the error and speed test."""
    if not calls:
        raise ValueError("calls: calibration needs at least one recorded UNet call")
    if not 0 < max_error < 1:
        raise ValueError(f"max_error must be in (0, 1), got {max_error!r}")
    layers = _candidate_layers(unet, config)
    observations = {name: _Observation() for name in layers}
    with _hooks(layers, lambda name, x, y: _observe_range(observations[name], x)):
        for call in tqdm(calls, desc="calibrate ranges"):
            call.run(unet)
    quantized_layers = {}
    for name, layer in layers.items():
        quantized_layers[name] = QUANTIZED_TYPES[config.kernel][type(layer)].from_float(layer, config)
        if config.kernel == "onednn":
            quantized_layers[name].set_input_range(observations[name].low, observations[name].high)

    def compare(name: str, x: torch.Tensor, y: torch.Tensor, timestep: int) -> None:
        error = ((quantized_layers[name](x) - y).norm() / y.norm().clamp_min(1e-12)).item()
        observation = observations[name]
        if error > observation.error:
            observation.error, observation.worst_timestep = error, timestep
        observation.sample = x

    for call in tqdm(calls, desc="measure layer errors"):
        timestep = int(call.timestep.reshape(-1)[0])
        with _hooks(layers, lambda name, x, y, timestep=timestep: compare(name, x, y, timestep)):
            call.run(unet)
    choices = [
        _choose(name, layers[name], quantized_layers[name], observations[name], max_error, min_speedup)
        for name in tqdm(layers, desc="time layers")
    ]
    report = quantize_model(unet, config, names={choice.name for choice in choices if choice.quantized})
    modules = dict(unet.named_modules())
    for choice in choices:
        if choice.quantized and config.kernel == "onednn":
            modules[choice.name].set_input_range(choice.low, choice.high)
        elif not choice.quantized:
            report.kept[choice.name] = choice.reason
    return report, choices


def choices_to_dict(choices: Sequence[LayerChoice]) -> list[dict]:
    return [asdict(choice) for choice in choices]


def _candidate_layers(unet: nn.Module, config: QuantConfig) -> dict[str, nn.Module]:
    """The layers ``quantize_model`` would replace: exact Linear/Conv2d types not matched by ``config.skip``."""
    return {
        name: layer
        for name, layer in unet.named_modules()
        if name
        and type(layer) in QUANTIZED_TYPES[config.kernel]
        and not any(fnmatchcase(name, pattern) for pattern in config.skip)
    }


class _hooks:
    """Forward hooks calling ``observe(name, input, output)`` on every layer while the block runs."""

    def __init__(self, layers: dict[str, nn.Module], observe: Callable[[str, torch.Tensor, torch.Tensor], None]):
        self.layers, self.observe, self.handles = layers, observe, []

    def __enter__(self) -> None:
        for name, layer in self.layers.items():
            self.handles.append(
                layer.register_forward_hook(lambda module, args, output, name=name: self.observe(name, args[0], output))
            )

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def _observe_range(observation: _Observation, x: torch.Tensor) -> None:
    low, high = torch.aminmax(x.detach())
    observation.low, observation.high = min(observation.low, low.item()), max(observation.high, high.item())


def _choose(
    name: str,
    layer: nn.Module,
    quantized: nn.Module,
    observation: _Observation,
    max_error: float,
    min_speedup: float,
) -> LayerChoice:
    float_ms, quantized_ms = _time_both(layer, quantized, observation.sample)
    if observation.error > max_error:
        reason = f"error {observation.error:.3f} > {max_error} (timestep {observation.worst_timestep})"
    elif float_ms < min_speedup * quantized_ms:
        reason = f"slower: {quantized_ms:.3f} ms quantized vs {float_ms:.3f} ms float"
    else:
        reason = ""
    return LayerChoice(
        name=name,
        low=observation.low,
        high=observation.high,
        error=observation.error,
        worst_timestep=observation.worst_timestep,
        float_ms=float_ms,
        quantized_ms=quantized_ms,
        quantized=not reason,
        reason=reason,
    )


@torch.no_grad()
def _time_both(layer: nn.Module, quantized: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Median milliseconds of the float and the quantized layer on ``x``, interleaved after a warm-up."""
    times: dict[nn.Module, list[float]] = {layer: [], quantized: []}
    for repeat in range(TIMING_REPEATS + 1):
        for module in (layer, quantized):
            started = time.perf_counter()
            module(x)
            if repeat:
                times[module].append((time.perf_counter() - started) * 1e3)
    return statistics.median(times[layer]), statistics.median(times[quantized])
