"""Step-level batching: cloud throughput with closed-loop clients, batching on against off, same pair, same
requests, same threads.

- engine: the replica's cloud half (``LocalCloud`` on a compute lane) in this process, lanes of
  ``--max-batch`` and of 1 interleaved, repeated, medians;
- served (``--served``): one replica through ``cluster up --max-batch N`` and ``--max-batch 1``, the two
  clusters alternated;
- a lone request's latency with batching on against off, in both;
- how far batched results are from alone (latents, decoded pixels).

Every request runs all ``--steps`` steps on the cloud (shapes pair, 64x64, guidance 7.5, DPM-Solver++).

    .venv/bin/python benchmarks/batching.py [--clients 1,2,4,8,16] [--repeats 3] [--served [--served-repeats 2]]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reporting import print_table  # noqa: E402
from benchmarks.serving import served_cluster  # noqa: E402
from hybrid_sd.halves import LocalCloud, cloud_half, edge_half  # noqa: E402
from hybrid_sd.lane import ComputeLane  # noqa: E402
from hybrid_sd.pairs import load_pair, preset  # noqa: E402
from hybrid_sd.request import GenerationRequest  # noqa: E402
from hybrid_sd.results import OutputSpec  # noqa: E402
from hybrid_sd.wire import request_to_pb, state_from_payload  # noqa: E402

PAIR = "shapes"
GUIDANCE = 7.5  # as measured for the README (the pair's own is 5; the cost is the same)
PROMPTS = ["a large red circle above a small blue square", "a small green triangle to the left of a large red square"]


def request(seed: int, steps: int) -> GenerationRequest:
    return GenerationRequest(
        PROMPTS[seed % 2],
        seed=seed,
        num_inference_steps=steps,
        switch_step=steps,
        scheduler="dpm++2m",
        guidance_scale=GUIDANCE,
    )


def requests_for(clients: int) -> int:
    """Requests per measurement: enough that every client sends a few."""
    return max(16, 2 * clients)


def engine_throughput(cloud: LocalCloud, clients: int, steps: int) -> float:
    """Requests per second of ``clients`` closed-loop clients against the in-process cloud half."""
    total = requests_for(clients)

    async def client(first: int) -> None:
        for seed in range(first, total, clients):
            await cloud.denoise(request(seed, steps), None)

    started = time.perf_counter()
    asyncio.run(_all(client(i) for i in range(clients)))
    return total / (time.perf_counter() - started)


async def _all(clients) -> None:
    await asyncio.gather(*clients)


def served_throughput(stub, clients: int, steps: int) -> float:
    total = requests_for(clients)
    messages = [request_to_pb(request(seed, steps)) for seed in range(total)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(stub.Generate, messages))
    return total / (time.perf_counter() - started)


def lone_latency(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def engine_rows(args: argparse.Namespace) -> list[dict]:
    pair = load_pair(preset(PAIR))
    lanes = {
        "on": LocalCloud(pair.cloud, lane=ComputeLane(args.max_batch)),
        "off": LocalCloud(pair.cloud, lane=ComputeLane(1)),
    }
    engine_throughput(lanes["on"], 2, args.steps)  # warm-up
    rows = []
    for clients in args.clients:
        rates: dict[str, list[float]] = {"on": [], "off": []}
        for repeat in range(args.repeats):
            for name in ("on", "off") if repeat % 2 == 0 else ("off", "on"):
                rates[name].append(engine_throughput(lanes[name], clients, args.steps))
        on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
        rows.append(
            {"where": "engine", "pair": PAIR, "clients": clients, "on_rps": on, "off_rps": off, "ratio": on / off}
        )
    lone = {
        name: lone_latency(
            lambda cloud=cloud: asyncio.run(cloud.denoise(request(0, args.steps), None)), 2 * args.repeats
        )
        for name, cloud in lanes.items()
    }
    rows.append(
        {
            "where": "engine",
            "pair": PAIR,
            "clients": "lone latency (s)",
            "on_rps": lone["on"],
            "off_rps": lone["off"],
            "ratio": lone["on"] / lone["off"],
        }
    )
    for lane in lanes.values():
        lane.lane.shutdown()
    return rows


def served_rows(args: argparse.Namespace) -> list[dict]:
    """Clusters with batching on and off, alternated ``served_repeats`` times; medians per client count."""
    rates: dict[str, dict[int, list[float]]] = {"on": {}, "off": {}}
    lone: dict[str, list[float]] = {"on": [], "off": []}
    for repeat in range(args.served_repeats):
        for name in ("on", "off") if repeat % 2 == 0 else ("off", "on"):
            max_batch = args.max_batch if name == "on" else 1
            # The threads of the in-process rows, as measured for the README (cluster up's own default shares
            # the cores among its processes).
            stub, leave = served_cluster(
                ["--pair", PAIR, "--max-batch", str(max_batch)], torch_threads=torch.get_num_threads()
            )
            try:
                served_throughput(stub, 2, args.steps)  # warm-up
                for clients in args.clients:
                    rates[name].setdefault(clients, []).append(served_throughput(stub, clients, args.steps))
                message = request_to_pb(request(0, args.steps))
                lone[name].append(lone_latency(lambda message=message, stub=stub: stub.Generate(message), 5))
            finally:
                leave()
    rows = []
    for clients in args.clients:
        on, off = statistics.median(rates["on"][clients]), statistics.median(rates["off"][clients])
        rows.append(
            {"where": "served", "pair": PAIR, "clients": clients, "on_rps": on, "off_rps": off, "ratio": on / off}
        )
    on, off = statistics.median(lone["on"]), statistics.median(lone["off"])
    rows.append(
        {
            "where": "served",
            "pair": PAIR,
            "clients": "lone latency (s)",
            "on_rps": on,
            "off_rps": off,
            "ratio": on / off,
        }
    )
    return rows


def tolerance(args: argparse.Namespace) -> dict:
    """Batched against alone: the largest latent difference after the cloud's steps at switch_step 8, and the
    largest pixel difference of the decoded images, over 8 requests sharing a lane."""
    pair = load_pair(preset(PAIR))
    batch = [
        GenerationRequest(
            PROMPTS[i % 2],
            seed=i,
            num_inference_steps=args.steps,
            switch_step=8 + i % 3 * 4,
            guidance_scale=GUIDANCE,
        )
        for i in range(8)
    ]
    alone = [cloud_half(pair.cloud, each, None) for each in batch]
    cloud = LocalCloud(pair.cloud, lane=ComputeLane(args.max_batch))

    async def together():
        return await asyncio.gather(*(cloud.denoise(each, None) for each in batch))

    batched = asyncio.run(together())
    latent = max(
        (state_from_payload(b.payload).latents - state_from_payload(a.payload).latents).abs().max().item()
        for a, b in zip(alone, batched, strict=True)
    )
    pixels = max(
        np.abs(
            np.asarray(edge_half(pair.edge, a, OutputSpec()).image, dtype=int)
            - np.asarray(edge_half(pair.edge, b, OutputSpec()).image, dtype=int)
        ).max()
        for a, b in zip(alone, batched, strict=True)
    )
    sizes = sorted({size for handoff in batched for size in handoff.batch_sizes})
    return {"pair": PAIR, "max_latent_diff": latent, "max_pixel_diff": int(pixels), "batch_sizes_seen": sizes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,2,4,8,16", help="closed-loop client counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--served", action="store_true", help="also through cluster up (one replica)")
    parser.add_argument("--served-repeats", type=int, default=2, help="cluster pairs started (each minutes)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/batching.json"))
    args = parser.parse_args()
    args.clients = [int(each) for each in args.clients.split(",")]
    results = {"threads": torch.get_num_threads(), "tolerance": tolerance(args), "throughput": engine_rows(args)}
    if args.served:
        results["throughput"] += served_rows(args)
    header = ("where", "pair", "clients", "batching on", "off", "on/off")
    table = [
        [r["where"], r["pair"], r["clients"], r["on_rps"], r["off_rps"], r["ratio"]] for r in results["throughput"]
    ]
    print_table(
        f"req/s (lone latency: s), all {args.steps} steps on the cloud, max batch {args.max_batch}", header, table
    )
    print(f"batched against alone: {results['tolerance']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
