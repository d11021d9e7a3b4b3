"""Full against lean handoff over a real slow link: the edge worker (``hybrid-sd serve edge``) in a
network namespace behind a veth pair shaped by ``tc tbf`` to 5, 20 and 100 Mbit/s each way, the
cloud half in this process, the real gRPC Refine; repeats interleaved over rates and modes, medians.

The handoff is SD 1.x's at 512x512 in float32: DPM-Solver++ 2M mid-run, latents and two history
tensors of 4x64x64, and the prompt embeddings (2 x 77 x 768) of a text encoder shaped like SD 1.x's
(CLIP ViT-L/14's 12-layer text tower, random weights), whose cost the lean handoff moves to the
edge. The UNet and VAE are tiny (tests/wide_text_pair.py) and the schedule short (k = 2 of 4: the
same tensors as k = 10 of 25), since a full SD 1.5 run per repeat would take minutes on this CPU
and change neither the bytes nor the link, only bury them in noise. The edge returns the final
latents (64 KB), not a PNG, so the link carries the handoff and little else. Needs root.

    .venv/bin/python benchmarks/slow_link.py [--repeats 5] [--rates 5,20,100]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reporting import print_table  # noqa: E402
from hybrid_sd.denoiser import Denoiser  # noqa: E402
from hybrid_sd.edge_profile import EdgeProfile  # noqa: E402
from hybrid_sd.halves import cloud_half  # noqa: E402
from hybrid_sd.pairs import load_cloud  # noqa: E402
from hybrid_sd.presets import PairSpec  # noqa: E402
from hybrid_sd.request import GenerationRequest  # noqa: E402
from hybrid_sd.results import OutputSpec  # noqa: E402
from hybrid_sd.rpc_clients import GrpcEdgeClient  # noqa: E402
from tests.serving import LoopThread, grpc_edge_client, serve_edge_in, stop  # noqa: E402
from tests.shaped_link import ShapedLink, shaped_link, unavailable_reason  # noqa: E402
from tests.wide_text_pair import save_wide_text_pipeline  # noqa: E402

MODES = ("full", "lean")
REQUEST = GenerationRequest(
    "a photo of an astronaut riding a horse",
    switch_step=2,
    num_inference_steps=4,
    seed=0,
    width=512,
    height=512,
    scheduler="dpm++2m",
)


def one_request(loop: LoopThread, cloud: Denoiser, edge: GrpcEdgeClient, profile: EdgeProfile | None) -> dict:
    """The cloud half here, then Refine over the link: what orchestrate.generate does, timed."""
    started = time.perf_counter()
    handoff = cloud_half(cloud, REQUEST, profile)
    sent = time.perf_counter()
    result = loop.run(edge.refine(handoff, OutputSpec(decode=False)))
    done = time.perf_counter()
    return {
        "handoff_bytes": len(handoff.payload),
        "transfer_s": done - sent - sum(result.timings.values()),  # the link, both ways, and gRPC
        "edge_encode_s": result.timings["encode_prompt"],
        "total_s": done - started,
    }


def measure(link: ShapedLink, cloud: Denoiser, target: str, rates: list[float], repeats: int) -> list[dict]:
    loop = LoopThread()
    try:
        edge = loop.run(grpc_edge_client(target))
        profiles = {"full": None, "lean": loop.run(edge.describe())}
        for mode in MODES:  # warm-up
            one_request(loop, cloud, edge, profiles[mode])
        samples: dict[tuple[float, str], list[dict]] = {(rate, mode): [] for rate in rates for mode in MODES}
        for repeat in range(repeats):
            for rate in rates if repeat % 2 == 0 else rates[::-1]:
                link.set_rate(rate)
                for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
                    samples[rate, mode].append(one_request(loop, cloud, edge, profiles[mode]))
            print(f"repeat {repeat + 1} of {repeats} done", flush=True)
    finally:
        loop.close()
    rows = []
    for (rate, mode), runs in samples.items():
        row = {"rate_mbit": rate, "mode": mode, "handoff_bytes": runs[0]["handoff_bytes"], "repeats": repeats}
        for key in ("transfer_s", "edge_encode_s", "total_s"):
            row[key] = statistics.median(run[key] for run in runs)
            row[key.removesuffix("_s") + "_all_s"] = [run[key] for run in runs]
        rows.append(row)
    return rows


def _exit_on_sigterm(signum: int, frame) -> None:
    sys.exit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rates", default="5,20,100", help="link rates in Mbit/s, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side (the two take turns)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/slow_link.json"))
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        sys.exit(f"slow_link.py: {reason}")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that the namespace and the worker go too
    rates = [float(rate) for rate in args.rates.split(",")]
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder, shaped_link(rates[0]) as link:
        model = str(save_wide_text_pipeline(Path(folder)))
        worker, target = serve_edge_in(link, model, args.threads, timeout=600)
        try:
            rows = measure(link, load_cloud(PairSpec(model, model)), target, rates, args.repeats)
        finally:
            stop(worker)

    full = {row["rate_mbit"]: row for row in rows if row["mode"] == "full"}
    print_table(
        f"SD 1.x 512x512 handoff over a shaped link (medians of {args.repeats}, float32)",
        ["Mbit/s", "handoff", "KB", "link ms", "edge encode ms", "end to end s", "lean - full s"],
        [
            [
                row["rate_mbit"],
                row["mode"],
                row["handoff_bytes"] / 1000,
                1000 * row["transfer_s"],
                1000 * row["edge_encode_s"],
                row["total_s"],
                row["total_s"] - full[row["rate_mbit"]]["total_s"] if row["mode"] == "lean" else None,
            ]
            for row in rows
        ],
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"request": REQUEST.to_dict(), "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
