"""Serving benchmarks: distribution overhead, handoff bytes, and cloud throughput.

- overhead: one request through gateway -> Ray replica -> gRPC -> edge worker (``cluster up`` of the
  same pair), against the in-process engine for the same request, interleaved, medians (the default
  shapes pair and the tiny SD 1.x pair; the SD 1.5 architecture with random weights at 256x256 with --sd15).
- bytes: the Handoff message for real model shapes (SD 1.x at 512x512, SDXL at 1024x1024) in
  fp32 and fp16, mid-run with DPM-Solver++ 2M (two history tensors): full, and lean (to an edge
  with the cloud's text encoders, which encodes the prompt itself).
- throughput: requests per second with 8 concurrent clients against one at a time, for 1 and 2
  denoiser replicas of the shapes pair (all requests at switch_step = N, so the cloud does all denoising).

    .venv/bin/python benchmarks/serving.py [--sd15] [--repeats 5] [--tiny-repeats 20] [--pairs shapes]
        [--bytes-only | --overhead-only]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.engine_overhead import sd15_random_pipeline  # noqa: E402
from benchmarks.reporting import interleaved_times  # noqa: E402
from hybrid_sd.conditioning import Conditioning  # noqa: E402
from hybrid_sd.denoiser import Denoiser  # noqa: E402
from hybrid_sd.edge_profile import EdgeProfile, for_edge  # noqa: E402
from hybrid_sd.pairs import ModelPair, load_pair, preset  # noqa: E402
from hybrid_sd.pipeline import HybridPipeline  # noqa: E402
from hybrid_sd.request import GenerationRequest  # noqa: E402
from hybrid_sd.v1 import hybrid_sd_pb2 as pb  # noqa: E402
from hybrid_sd.v1 import hybrid_sd_pb2_grpc as pb_grpc  # noqa: E402
from hybrid_sd.wire import request_to_pb, state_payload  # noqa: E402
from tests.serving import channel, free_port  # noqa: E402

PROMPT = "a large red circle above a small blue square"


def served_cluster(pair: list[str], replicas: int = 1, torch_threads: int | None = None, port: int | None = None):
    """``hybrid-sd cluster up`` as processes (edge worker, gateway, Ray replicas), as users run it, its
    gateway on ``port`` (default: a free one) and no HTTP face; this process only makes gRPC calls.
    Returns a Generate stub and a function that stops it."""
    port = port or free_port()
    command = [sys.executable, "-m", "hybrid_sd.cli", "cluster", "up", "--port", str(port), "--replicas", str(replicas)]
    command += ["--http-port", "0"]  # no HTTP face: its fixed default port may be another cluster's
    if torch_threads:
        command += ["--torch-threads", str(torch_threads)]
    cluster = subprocess.Popen([*command, *pair], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    health = health_pb2_grpc.HealthStub(channel(port))
    deadline = time.monotonic() + 600
    while True:
        try:
            if (
                health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                == health_pb2.HealthCheckResponse.SERVING
            ):
                break
        except grpc.RpcError:
            pass
        if cluster.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the cluster did not come up")
        time.sleep(1)

    def leave() -> None:
        cluster.send_signal(signal.SIGTERM)
        cluster.wait(120)

    return pb_grpc.HybridDiffusionStub(channel(port)), leave


def overhead(
    name: str, pair_name: str, engine: HybridPipeline, pair: list[str], request: GenerationRequest, repeats: int
) -> dict:
    """``request`` in-process on ``engine`` and through ``cluster up`` with ``pair`` (the same models, and the
    same torch threads in every process as here)."""
    stub, leave = served_cluster(pair, torch_threads=torch.get_num_threads())
    message = request_to_pb(request)
    message.output_format = pb.OUTPUT_FORMAT_PNG
    try:
        engine(request)  # warm-up
        handoff_bytes = stub.Generate(message).handoff_bytes
        times = interleaved_times(
            {"local": lambda: engine(request), "served": lambda: stub.Generate(message)}, repeats, 0
        )
        local, served = times["local"], times["served"]
    finally:
        leave()
    local_median, served_median = statistics.median(local), statistics.median(served)
    return {
        "case": name,
        "pair": pair_name,
        "in_process_s": local_median,
        "served_s": served_median,
        "ratio": served_median / local_median,
        "added_ms": 1000 * (served_median - local_median),
        "handoff_bytes": handoff_bytes,
        "in_process_all_s": local,
        "served_all_s": served,
    }


def handoff_bytes(family: str, size: int, dtype: torch.dtype) -> dict:
    """Handoff size for the real models' shapes: a tiny model's mid-run DPM++ 2M state at the
    real latent size, with conditioning of the real text encoders' widths; full, and lean."""
    pair = load_pair(preset(f"tiny-{family}"))
    request = pair.cloud.resolve(
        GenerationRequest(
            "a photo", switch_step=10, num_inference_steps=25, seed=0, width=size, height=size, scheduler="dpm++2m"
        )
    )
    state = pair.cloud.denoise(pair.cloud.begin(request), 10)
    width = 768 if family == "sd1" else 2048
    embeds = torch.zeros(1, 77, width, dtype=dtype)
    conditioning = Conditioning("fingerprint", embeds, embeds.clone())
    if family == "sdxl":
        pooled = torch.zeros(1, 1280, dtype=dtype)
        conditioning = Conditioning(
            "fingerprint", embeds, embeds.clone(), pooled, pooled.clone(), torch.zeros(1, 6, dtype=dtype)
        )
    state.conditioning = conditioning
    state = state.to_dtype(dtype)
    message = pb.Handoff.FromString(state_payload(state))
    lean = pb.Handoff.FromString(state_payload(for_edge(state, EdgeProfile("fingerprint", dtype))))
    tensors = {name: len(tensor.data) for name, tensor in message.tensors.items()}
    return {
        "case": f"{family} {size}x{size} {str(dtype).removeprefix('torch.')}",
        "handoff_bytes": message.ByteSize(),
        "lean_handoff_bytes": lean.ByteSize(),
        "latents_bytes": tensors["latents"],
        "conditioning_bytes": sum(v for k, v in tensors.items() if k.startswith("conditioning.")),
        "sampler_bytes": sum(v for k, v in tensors.items() if k.startswith("sampler.")),
    }


def throughput(replicas: int, requests: int = 16) -> dict:
    # One intra-op thread per process: replicas and the edge share this machine's cores.
    stub, leave = served_cluster(["--pair", "shapes"], replicas, torch_threads=1)

    def call(seed: int) -> None:
        stub.Generate(
            pb.GenerateRequest(prompt="a circle", num_inference_steps=25, switch_step=25, seed=seed, scheduler="euler")
        )

    try:
        call(0)
        started = time.perf_counter()
        for seed in range(requests):
            call(seed)
        sequential = requests / (time.perf_counter() - started)
        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(call, range(requests)))
        concurrent = requests / (time.perf_counter() - started)
    finally:
        leave()
    return {"pair": "shapes", "replicas": replicas, "sequential_rps": sequential, "concurrent8_rps": concurrent}


def overhead_and_throughput(args: argparse.Namespace) -> dict:
    """The parts that run clusters: served against in-process, and replica throughput."""
    results: dict = {}
    results["overhead"] = [
        overhead(
            f"{name}, 64x64, {steps} steps, k={k}",
            name,
            HybridPipeline(load_pair(preset(name))),
            ["--pair", name],
            GenerationRequest(
                "a large red circle above a small blue square", switch_step=k, num_inference_steps=steps, seed=0
            ),
            args.tiny_repeats,
        )
        for name, steps, k in (("shapes", 20, 8), ("tiny-sd1", 25, 10))
        if name in args.pairs
    ]
    if args.sd15:
        with tempfile.TemporaryDirectory() as folder:
            pipe = sd15_random_pipeline()
            pipe.save_pretrained(folder)
            engine = HybridPipeline(ModelPair(Denoiser(pipe, folder), Denoiser(pipe, folder)))
            request = GenerationRequest(
                "a red circle above a blue square", switch_step=4, num_inference_steps=10, seed=0, width=256, height=256
            )
            results["overhead"].append(
                overhead(
                    "SD1.5 architecture (both sides), 256x256, 10 steps, k=4",
                    "sd15-random",
                    engine,
                    ["--cloud-model", folder, "--edge-model", folder],
                    request,
                    args.repeats,
                )
            )
    if not args.overhead_only:
        results["throughput"] = [throughput(replicas) for replicas in (1, 2)]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny-repeats", type=int, default=20)
    parser.add_argument("--sd15", action="store_true", help="also the SD 1.5-architecture overhead (minutes)")
    parser.add_argument("--bytes-only", action="store_true", help="only the handoff bytes (seconds, no cluster)")
    parser.add_argument("--overhead-only", action="store_true", help="only served against in-process")
    parser.add_argument("--pairs", nargs="*", default=["shapes", "tiny-sd1"], help="the 64x64 overhead cases")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serving.json"))
    args = parser.parse_args()
    results: dict = {"overhead": [], "throughput": [], "bytes": []}
    if not args.overhead_only:
        results["bytes"] = [
            handoff_bytes(family, size, dtype)
            for family, size in (("sd1", 512), ("sdxl", 1024))
            for dtype in (torch.float32, torch.float16)
        ]
    if not args.bytes_only:
        results.update(overhead_and_throughput(args))

    if results["overhead"]:
        print(
            f"{'overhead (same pair both ways)':58} {'in-process s':>13} {'served s':>9} {'ratio':>6} {'added ms':>9}"
        )
    for row in results["overhead"]:
        print(
            f"{row['case']:58} {row['in_process_s']:13.3f} {row['served_s']:9.3f} {row['ratio']:6.3f}"
            f" {row['added_ms']:9.1f}"
        )
    if results["bytes"]:
        print(f"\n{'handoff':24} {'full B':>10} {'lean B':>10} {'latents':>9} {'conditioning':>13} {'sampler':>9}")
    for row in results["bytes"]:
        print(
            f"{row['case']:24} {row['handoff_bytes']:10d} {row['lean_handoff_bytes']:10d} {row['latents_bytes']:9d}"
            f" {row['conditioning_bytes']:13d} {row['sampler_bytes']:9d}"
        )
    if results["throughput"]:
        print(f"\n{'pair':>8} {'replicas':>8} {'sequential rps':>15} {'8 clients rps':>14}")
    for row in results["throughput"]:
        print(f"{row['pair']:>8} {row['replicas']:8d} {row['sequential_rps']:15.2f} {row['concurrent8_rps']:14.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
