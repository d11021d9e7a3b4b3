"""Build a UNet without initialising its weights, then give it loaded ones."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel


def empty_unet(config: dict, **changes) -> UNet2DConditionModel:
    """The config's UNet on the meta device: shapes only, no random initialisation to pay for."""
    # from_config would reset the keys a model's config lists in _use_default_values to the defaults.
    config = {key: value for key, value in config.items() if key != "_use_default_values"}
    with torch.device("meta"):
        return UNet2DConditionModel.from_config({**config, **changes})


def assign_weights(unet: UNet2DConditionModel, state: dict[str, torch.Tensor]) -> UNet2DConditionModel:
    """Load ``state`` into an :func:`empty_unet` by assignment; every tensor must come from it."""
    unet.load_state_dict(state, strict=True, assign=True)
    left = [name for name, tensor in [*unet.named_parameters(), *unet.named_buffers()] if tensor.is_meta]
    if left:
        raise ValueError(f"no weights for {', '.join(left)} (non-persistent buffers are not supported)")
    return unet
