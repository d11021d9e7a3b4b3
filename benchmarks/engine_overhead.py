"""Per-request time of the in-process engine at k = N against diffusers' own pipeline doing the
same work (encode, N steps, decode to PIL), interleaved, median of repeats.

Two cases: an SD 1.5-architecture pipeline with random weights (256x256, 10 steps), the engine
running it on both sides; and the tiny pair, diffusers running the cloud model with the edge's tiny
decoder (as diffusers' TAESD docs do), the engine running the pair at k = N.

    .venv/bin/python benchmarks/engine_overhead.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from hybrid_sd.denoiser import Denoiser
from hybrid_sd.pairs import ModelPair, load_pair, preset
from hybrid_sd.pipeline import HybridPipeline
from hybrid_sd.request import GenerationRequest
from hybrid_sd.schedulers import make_scheduler
from hybrid_sd.tiny_models import build_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.reporting import interleaved_times  # noqa: E402  (the repository root is not a package)
from tests.reference import pipeline_kwargs  # noqa: E402

# Architecture of runwayml/stable-diffusion-v1-5 (unet/, vae/ and CLIP ViT-L/14 text configs).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)


def sd15_random_pipeline() -> StableDiffusionPipeline:
    from diffusers import PNDMScheduler

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    text_config = CLIPTextConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE).eval(),
        text_encoder=CLIPTextModel(text_config).eval(),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SD15_UNET).eval(),
        scheduler=PNDMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def diffusers_call(pipe: DiffusionPipeline, request: GenerationRequest):
    return pipe(**pipeline_kwargs(request), output_type="pil").images[0]


def measure(name: str, engine: HybridPipeline, reference: DiffusionPipeline, request: GenerationRequest, repeats: int):
    request = engine.check_inputs(request)
    reference.scheduler = make_scheduler(request.scheduler, reference.scheduler)
    reference.set_progress_bar_config(disable=True)
    # Warm-up (also checks that both compute the same image).
    same = engine(request).image.tobytes() == diffusers_call(reference, request).tobytes()
    times = interleaved_times(
        {"engine": lambda: engine(request), "diffusers": lambda: diffusers_call(reference, request)}, repeats, warmup=0
    )
    engine_times, diffusers_times = times["engine"], times["diffusers"]
    engine_median, diffusers_median = statistics.median(engine_times), statistics.median(diffusers_times)
    return {
        "case": name,
        "same_image": same,
        "repeats": repeats,
        "engine_median_s": engine_median,
        "diffusers_median_s": diffusers_median,
        "ratio": engine_median / diffusers_median,
        "engine_s": engine_times,
        "diffusers_s": diffusers_times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny-repeats", type=int, default=30)
    parser.add_argument("--cases", default="tiny,sd15", help="comma-separated subset of: tiny, sd15")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_overhead.json"))
    args = parser.parse_args()

    cases = set(args.cases.split(","))
    rows = []
    if "tiny" in cases:
        rows.append(tiny_case(args.tiny_repeats))
    if "sd15" in cases:
        rows.append(sd15_case(args.repeats))
    print(f"{'case':58} {'engine s':>9} {'diffusers s':>12} {'ratio':>7} same image")
    for row in rows:
        print(
            f"{row['case']:58} {row['engine_median_s']:9.3f} {row['diffusers_median_s']:12.3f}"
            f" {row['ratio']:7.3f} {row['same_image']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch_threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print(f"wrote {args.out}")


def tiny_case(repeats: int) -> dict:
    tiny = load_pair(preset("tiny-sd1"))
    reference = DiffusionPipeline.from_pretrained(tiny.cloud.name, safety_checker=None)
    reference.vae = tiny.edge.pipe.vae  # the engine's edge decodes with the tiny decoder
    request = GenerationRequest("a red circle above a blue square", switch_step=25, num_inference_steps=25, seed=0)
    return measure("tiny pair, 64x64, 25 steps", HybridPipeline(tiny), reference, request, repeats)


def sd15_case(repeats: int) -> dict:
    sd15 = sd15_random_pipeline()
    engine = HybridPipeline(ModelPair(Denoiser(sd15, "sd15-random"), Denoiser(sd15, "sd15-random")))
    request = GenerationRequest(
        "a red circle above a blue square", switch_step=10, num_inference_steps=10, seed=0, width=256, height=256
    )
    return measure("SD1.5 architecture, random weights, 256x256, 10 steps", engine, sd15, request, repeats)


if __name__ == "__main__":
    main()
