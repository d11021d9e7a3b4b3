"""Block removal in the manner of BK-SDM (Kim et al. 2023, arXiv 2305.15798)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from diffusers import UNet2DConditionModel

from hybrid_sd.pruned.empty import assign_weights, empty_unet

# A resnet or attention of a down or up block, as the state dict names it.
_PAIR_KEY = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")


def remove_blocks(
    unet: UNet2DConditionModel,
    layers_per_block: int | Sequence[int] | None = None,
    remove_mid_block: bool = True,
) -> UNet2DConditionModel:
    """A student with fewer resnet+attention pairs, initialised from ``unet``'s weights.

    As BK-SDM: each down block keeps its first ``layers_per_block[i]`` pairs and the matching up
    block (which has one pair more, diffusers' ``num_layers = layers_per_block + 1``) keeps its
    first ones plus its last, whose input takes the skip of the previous stage; ``remove_mid_block``
    drops the mid block (``mid_block_type=None``). ``layers_per_block=1`` on SD 1.x is BK-SDM-Small;
    with the default ``None`` and the mid block removed it is BK-SDM-Base. The result has a
    standard diffusers config.
    """
    teacher_layers = _per_block(unet.config.layers_per_block, len(unet.config.down_block_types))
    student_layers = teacher_layers if layers_per_block is None else _per_block(layers_per_block, len(teacher_layers))
    if len(student_layers) != len(teacher_layers) or not all(
        1 <= kept <= total for kept, total in zip(student_layers, teacher_layers, strict=True)
    ):
        raise ValueError(
            f"layers_per_block must give 1 to {teacher_layers} layers for each of the"
            f" {len(teacher_layers)} down blocks, got {layers_per_block!r}"
        )
    if any(not isinstance(count, int) for count in _as_list(unet.config.transformer_layers_per_block)):
        raise ValueError("remove_blocks does not support per-layer transformer_layers_per_block")
    changes = {"layers_per_block": student_layers[0] if len(set(student_layers)) == 1 else tuple(student_layers)}
    if remove_mid_block:
        changes["mid_block_type"] = None
    student = empty_unet(unet.config, **changes)
    teacher_state = unet.state_dict()
    # Copies: the student must not share storage with its teacher.
    state = {
        key: teacher_state[_teacher_key(key, teacher_layers, student_layers)].clone() for key in student.state_dict()
    }
    return assign_weights(student, state).train(unet.training)


def _teacher_key(key: str, teacher_layers: list[int], student_layers: list[int]) -> str:
    """The teacher's name for a student weight: up-block pair ``kept`` maps to the teacher's last."""
    match = _PAIR_KEY.match(key)
    if match is None or match[1] == "down_blocks":
        return key
    block, kind, index, rest = int(match[2]), match[3], int(match[4]), match[5]
    stage = len(teacher_layers) - 1 - block  # up blocks run the down stages in reverse
    if index == student_layers[stage]:
        index = teacher_layers[stage]
    return f"up_blocks.{block}.{kind}.{index}.{rest}"


def _as_list(value: int | Sequence) -> list:
    return list(value) if isinstance(value, Sequence) else [value]


def _per_block(value: int | Sequence[int], blocks: int) -> list[int]:
    return list(value) if isinstance(value, Sequence) else [value] * blocks
