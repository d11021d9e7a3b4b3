"""AUTOMATIC1111's ``POST /sdapi/v1/txt2img``, the subset that maps onto a hybrid request: its body as a
request and call options, and a result in its answer's shape."""

from __future__ import annotations

import base64
import json

from hybrid_sd.request import GenerationRequest
from hybrid_sd.results import CallOptions, GenerationResult, OutputSpec

# A1111's sampler names and the schedulers they are here.
SAMPLERS = {
    "DPM++ 2M": "dpm++2m",
    "Euler a": "euler-a",
    "Euler": "euler",
    "DDIM": "ddim",
    "UniPC": "unipc",
    "PLMS": "pndm",
    "LCM": "lcm",
}
# Each field taken, and the JSON type it must have.
FIELDS = {
    "prompt": str,
    "negative_prompt": str,
    "steps": int,
    "cfg_scale": (int, float),
    "seed": int,
    "width": int,
    "height": int,
    "sampler_name": str,
    "refiner_switch_at": (int, float),
    "batch_size": int,
}


def txt2img_call(body: object) -> tuple[GenerationRequest, CallOptions]:
    """The request a txt2img body asks for (``refiner_switch_at``: the fraction of the steps on the cloud
    model); ``ValueError`` names a field it refuses."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise ValueError(f"unsupported field(s) {', '.join(unknown)}; this server takes {', '.join(FIELDS)}")
    for name, kind in FIELDS.items():
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise ValueError(f"{name} must be a JSON {_kind_name(kind)}, got {value!r}")
    if body.get("batch_size", 1) != 1:
        raise ValueError(f"batch_size must be 1, got {body['batch_size']}")
    sampler = body.get("sampler_name")
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"sampler_name {sampler!r} is not one of {', '.join(SAMPLERS)}")
    seed = body.get("seed", -1)
    if seed < -1:
        raise ValueError(f"seed must be -1 (random) or at least 0, got {seed}")
    steps = body.get("steps", GenerationRequest.num_inference_steps)
    fraction = body.get("refiner_switch_at")
    if fraction is not None and not 0 <= fraction <= 1:
        raise ValueError(f"refiner_switch_at must be a fraction in [0, 1], got {fraction}")
    request = GenerationRequest(
        prompt=body.get("prompt", ""),
        negative_prompt=body.get("negative_prompt") or None,
        switch_step=None if fraction is None else round(fraction * steps),
        num_inference_steps=steps,
        guidance_scale=None if body.get("cfg_scale") is None else float(body["cfg_scale"]),
        seed=None if seed == -1 else seed,
        width=body.get("width"),
        height=body.get("height"),
        scheduler=SAMPLERS.get(sampler) if sampler else None,
    )
    request.check()
    return request, CallOptions(output=OutputSpec(image_format="PNG", latents=False))


def txt2img_answer(body: dict, result: GenerationResult) -> dict:
    """A1111's answer: ``images`` (base64 PNG), the ``parameters`` asked, and ``info`` (a JSON string) with
    the seed and what was resolved, and this server's measurements under ``hybrid_sd``."""
    request = result.request
    info = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt or "",
        "seed": request.seed,
        "all_seeds": [request.seed],
        "steps": request.num_inference_steps,
        "cfg_scale": request.guidance_scale,
        "width": request.width,
        "height": request.height,
        "sampler_name": body.get("sampler_name") or request.scheduler,
        "refiner_switch_at": request.switch_step / request.num_inference_steps,
        "hybrid_sd": result.summary(),
    }
    return {"images": [base64.b64encode(result.image_data).decode()], "parameters": body, "info": json.dumps(info)}


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return {str: "string", int: "integer"}.get(kind, "number") if isinstance(kind, type) else "number"
