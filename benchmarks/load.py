"""Open-loop load on ``cluster up`` (one replica, the default shapes pair, 20 steps): for the policies cloud,
fixed:8 (40% of the steps), edge and auto, the attainment of a latency target, the p95 latency and the mean
switch step at each arrival rate (``hybrid-sd bench load``).

The target is twice a lone hybrid request's latency (k = 8, the median of a few, measured first). The rates
default to 0.3, 0.6 and 1.2 requests per lone latency (the last one past what one request at a time serves).
Writes benchmarks/results/load.json, load.png and each policy's bench folder under benchmarks/results/load/.

    .venv/bin/python benchmarks/load.py [--duration 20] [--rates 0.2,0.4,0.8] [--policies cloud,auto]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reporting import print_table  # noqa: E402
from benchmarks.serving import PROMPT, served_cluster  # noqa: E402
from hybrid_sd.cli import main as hybrid_sd  # noqa: E402
from hybrid_sd.load_report import plot_against_rate  # noqa: E402
from hybrid_sd.v1 import hybrid_sd_pb2 as pb  # noqa: E402
from tests.serving import free_port  # noqa: E402

STEPS = 20
HYBRID_K = 8  # 40% of the steps: the default switch step
LOAD_PER_LONE_LATENCY = (0.3, 0.6, 1.2)


def lone_latency(stub, repeats: int) -> float:
    """The median seconds of one hybrid request (k = 8) with nothing else running, after a warm-up."""
    times = []
    for seed in range(repeats + 1):
        start = time.perf_counter()
        stub.Generate(pb.GenerateRequest(prompt=PROMPT, num_inference_steps=STEPS, switch_step=HYBRID_K, seed=seed))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def bench_policy(target: str, policy: str, rates: str, latency_target: float, args: argparse.Namespace) -> dict:
    """``hybrid-sd bench load`` of one policy over the rates; its summary."""
    out = args.out.parent / "load" / policy.replace(":", "_")
    command = ["bench", "load", "--target", target, "--rates", rates, "--duration", str(args.duration)]
    command += ["--policy", policy, "--latency-target", f"{latency_target:.3f}", "--steps", str(STEPS)]
    command += ["--prompts", "shapes:8", "--out", str(out)]
    if hybrid_sd(command) != 0:
        raise RuntimeError(f"bench load --policy {policy} failed")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per rate (default: 20)")
    parser.add_argument("--rates", help="comma-separated rates per second (default: 0.3, 0.6, 1.2 per lone latency)")
    parser.add_argument("--policies", default=f"cloud,fixed:{HYBRID_K},edge,auto")
    parser.add_argument("--repeats", type=int, default=5, help="lone requests timed for the target (default: 5)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/load.json"))
    args = parser.parse_args()
    port = free_port()
    target = f"127.0.0.1:{port}"
    stub, leave = served_cluster(["--pair", "shapes"], port=port)
    try:
        lone = lone_latency(stub, args.repeats)
        rates = args.rates or ",".join(f"{load / lone:.3g}" for load in LOAD_PER_LONE_LATENCY)
        print(f"lone hybrid request (k = {HYBRID_K} of {STEPS}): {lone:.3f} s; target {2 * lone:.3f} s; rates {rates}")
        summaries = {policy: bench_policy(target, policy, rates, 2 * lone, args) for policy in args.policies.split(",")}
    finally:
        leave()
    rows = [
        (entry["rate"], policy, entry["goodput"], entry["latency_p95_s"], entry["mean_switch_step"], entry["errors"])
        for policy, summary in summaries.items()
        for entry in summary["rates"]
    ]
    rows.sort(key=lambda row: row[0])
    print_table(
        f"open-loop load, shapes pair, {STEPS} steps, target {2 * lone:.2f} s (2x lone), {args.duration:g} s a rate",
        ("rate/s", "policy", "attainment", "p95 s", "mean k", "errors"),
        [(f"{rate:.3g}", policy, goodput, p95, k, errors or "-") for rate, policy, goodput, p95, k, errors in rows],
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = {"lone_latency_s": lone, "latency_target_s": 2 * lone, "duration_s": args.duration, "runs": summaries}
    args.out.write_text(json.dumps(results, indent=2))
    plot = args.out.with_suffix(".png")
    series = {policy: summary["rates"] for policy, summary in summaries.items()}
    plot_against_rate(series, ("goodput", "latency_p95_s", "mean_switch_step"), plot, "open-loop load, shapes pair")
    print(f"wrote {args.out} and {plot}")


if __name__ == "__main__":
    main()
