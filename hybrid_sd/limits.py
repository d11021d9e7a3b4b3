"""What one served request may cost, checked before any work is done.

A server takes requests from anyone who can reach it: without these bounds one request (a 60 MB
prompt, 1000 steps at a large size) holds a worker for minutes and its memory for gigabytes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from hybrid_sd.request import GenerationRequest

# Every gRPC message, either way. A 1024x1024 SDXL image or handoff is a few MB; gRPC's default is 4 MiB.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on a request; each refusal is a ``ValueError`` (INVALID_ARGUMENT) naming the field and
    the limit. The defaults admit SDXL at 1024x1024 with 150 steps (AUTOMATIC1111's maximum)."""

    max_prompt_bytes: int = 4096  # UTF-8 bytes of the prompt and of the negative prompt, each
    # CLIP's tokenizer keeps 77 tokens and drops the rest; more than this many is a mistake, not a prompt.
    max_prompt_tokens: int = 512
    max_steps: int = 150
    max_pixels: int = 2048 * 2048  # width x height
    max_pixel_steps: int = 1024 * 1024 * 150  # width x height x steps: the work of the whole run

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field.name} must be a positive integer, got {value!r}")

    def check(self, request: GenerationRequest) -> None:
        """Refuse a request over a limit; sizes left to the model are checked once resolved."""
        for name in ("prompt", "negative_prompt"):
            text = getattr(request, name) or ""
            size = len(text.encode("utf-8", errors="surrogatepass"))
            if size > self.max_prompt_bytes:
                raise ValueError(f"{name} is {size} bytes; this server takes at most {self.max_prompt_bytes}")
        steps = request.num_inference_steps
        if steps > self.max_steps:
            raise ValueError(f"num_inference_steps {steps} is over this server's limit of {self.max_steps}")
        if request.width is None or request.height is None:
            return
        pixels = request.width * request.height
        if pixels > self.max_pixels:
            raise ValueError(
                f"width x height {request.width}x{request.height} = {pixels} pixels is over this server's limit"
                f" of {self.max_pixels}"
            )
        if pixels * steps > self.max_pixel_steps:
            raise ValueError(
                f"width x height x num_inference_steps = {pixels * steps} is over this server's limit of"
                f" {self.max_pixel_steps} (fewer steps or a smaller size)"
            )

    def check_tokens(self, name: str, count: int) -> None:
        if count > self.max_prompt_tokens:
            raise ValueError(
                f"{name} is {count} tokens; this server takes at most {self.max_prompt_tokens}"
                " (the text encoder reads the first 77)"
            )


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """``--max-prompt-bytes`` and the rest, defaulting to :class:`RequestLimits`' values."""
    group = parser.add_argument_group("request limits (over one: INVALID_ARGUMENT naming it)")
    for field in fields(RequestLimits):
        flag = "--" + field.name.replace("_", "-")
        group.add_argument(flag, type=int, default=field.default, metavar="N", help=f"default: {field.default}")


def limits_from_args(args: argparse.Namespace) -> RequestLimits:
    return RequestLimits(**{field.name: getattr(args, field.name) for field in fields(RequestLimits)})
