"""Capture and restore a diffusers scheduler's mutable state, and flatten it for the wire.

A scheduler's state after ``set_timesteps(N)`` is a pure function of its config, N and the request's
timestep spacing (:func:`hybrid_sd.schedulers.set_timesteps`), so only the
attributes that stepping changed need to travel: multistep history (``model_outputs``,
``lower_order_nums``, UniPC's ``timestep_list`` and ``last_sample``, PLMS's ``ets`` and
``counter``), the step index, and so on. The receiver rebuilds the scheduler from the config, calls
``set_timesteps(N)`` and applies the difference. Doing it by difference rather than per class means
a new diffusers attribute is carried without code here; a value of a type that cannot be written
exactly (say a torchsde Brownian tree) is refused.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import SchedulerMixin

from hybrid_sd.schedulers import set_timesteps

# The frozen config travels as JSON on its own.
_NOT_STATE = frozenset({"_internal_dict"})


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.cpu(), b.cpu())
        )
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def capture(scheduler: SchedulerMixin, num_inference_steps: int, timestep_power: float | None = None) -> dict[str, Any]:
    """The attributes of ``scheduler`` that differ from a fresh one after ``set_timesteps``."""
    fresh_state = _fresh_state(
        type(scheduler),
        scheduler.to_json_string(),
        num_inference_steps,
        timestep_power,
        str(scheduler.timesteps.device),
    )
    missing = object()
    return {
        name: value
        for name, value in vars(scheduler).items()
        if name not in _NOT_STATE and not _same(value, fresh_state.get(name, missing))
    }


@functools.lru_cache(maxsize=64)
def _fresh_state(
    scheduler_class: type[SchedulerMixin],
    config_json: str,
    num_inference_steps: int,
    timestep_power: float | None,
    device: str,
) -> dict[str, Any]:
    """``vars()`` of a scheduler just after ``set_timesteps``; cached, since building one costs
    milliseconds per request. Only read, never handed out."""
    fresh = scheduler_class.from_config(json.loads(config_json))
    set_timesteps(fresh, num_inference_steps, timestep_power, device)
    return vars(fresh)


def restore(scheduler: SchedulerMixin, state: dict[str, Any], device: torch.device | str) -> None:
    """Apply captured state to a scheduler on which ``set_timesteps`` was just called."""
    to_device = functools.partial(torch.Tensor.to, device=device)
    for name, value in state.items():
        setattr(scheduler, name, map_tensors(copy.copy(value), to_device))


def map_tensors(value: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``function`` applied to every tensor in it, through lists and tuples."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, list | tuple):
        return type(value)(map_tensors(item, function) for item in value)
    return value


def flatten(state: dict[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Split state into a JSON-able description and named tensors (for safetensors)."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, key: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous()
            return {"tensor": key}
        if isinstance(value, np.ndarray):
            tensors[key] = torch.from_numpy(np.ascontiguousarray(value))
            return {"ndarray": key}
        if isinstance(value, list | tuple):
            kind = "list" if isinstance(value, list) else "tuple"
            return {kind: [encode(item, f"{key}.{i}") for i, item in enumerate(value)]}
        if isinstance(value, np.generic):
            return {"numpy_scalar": value.item(), "dtype": str(value.dtype)}
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise ValueError(f"scheduler state {key!r} holds a {type(value).__name__}, which cannot be handed over exactly")

    described = {name: encode(value, f"{prefix}{name}") for name, value in state.items()}
    return described, tensors


def unflatten(described: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Inverse of :func:`flatten`."""

    def decode(value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        if "tensor" in value:
            return tensors[value["tensor"]]
        if "ndarray" in value:
            return tensors[value["ndarray"]].numpy()
        if "list" in value:
            return [decode(item) for item in value["list"]]
        if "tuple" in value:
            return tuple(decode(item) for item in value["tuple"])
        if "numpy_scalar" in value:
            return np.dtype(value["dtype"]).type(value["numpy_scalar"])
        raise ValueError(f"malformed scheduler state entry {value!r}")

    return {name: decode(value) for name, value in described.items()}
