"""``hybrid-sd bench load``: Poisson arrivals, the open-loop runner, the summary math, flag errors, and a
few seconds of load on a real gateway (tests/test_serving.py's cluster) with the files it writes."""

from __future__ import annotations

import asyncio
import csv
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import grpc
import numpy
import pytest

from hybrid_sd.cli import main
from hybrid_sd.load_bench import LoadPlan, Outcome, arrival_times, parse_policy, run_plan, run_rate
from hybrid_sd.load_report import percentile, summarize_rate, write_csv
from hybrid_sd.request import GenerationRequest
from tests.serving import ctrl_c_reaches
from tests.test_serving import cluster  # noqa: F401  (fixture: an edge worker and a gateway)


def test_arrivals_are_seeded_and_bounded_in_count_and_time():
    times = arrival_times(5.0, 20.0, None, seed=3)
    assert times == arrival_times(5.0, 20.0, None, seed=3)
    assert times != arrival_times(5.0, 20.0, None, seed=4)
    assert times == sorted(times) and 0 < times[0] and times[-1] < 20.0
    assert arrival_times(5.0, 20.0, 7, seed=3) == times[:7]
    assert arrival_times(5.0, 1000.0, 7, seed=3) == times[:7]  # the count bounds a long run
    with pytest.raises(ValueError, match="rate must be a positive number"):
        arrival_times(0.0, 1.0, None, seed=0)


def test_arrivals_are_poisson():
    """About rate x duration arrivals, exponential gaps: mean 1/rate, and e^-1 of them longer than the mean."""
    rate, duration = 4.0, 2500.0
    times = arrival_times(rate, duration, None, seed=11)
    gaps = numpy.diff([0.0, *times])
    assert len(times) == pytest.approx(rate * duration, rel=0.05)  # sd: 1%
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)  # sd: 1%
    assert (gaps > 1 / rate).mean() == pytest.approx(math.exp(-1), abs=0.03)  # sd: 0.005; uniform gaps: 0.5


def test_policies_set_the_switch_fields():
    template = GenerationRequest("a circle", num_inference_steps=20)
    assert parse_policy("cloud", 20, None).request(template).switch_step == 20
    assert parse_policy("edge", 20, None).request(template).switch_step == 0
    assert parse_policy("fixed:8", 20, 3.0).request(template).switch_step == 8
    auto = parse_policy("auto", 20, 3.0).request(template)
    assert (auto.switch_step, auto.auto_switch, auto.latency_target_s) == (None, True, 3.0)
    auto.check()
    with pytest.raises(ValueError, match="--policy auto needs --latency-target"):
        parse_policy("auto", 20, None)
    with pytest.raises(ValueError, match="--policy must be cloud, edge, fixed:K .* got 'fixed:x'"):
        parse_policy("fixed:x", 20, None)
    with pytest.raises(ValueError, match=r"--policy fixed:21: K must be in \[0, 20\]"):
        parse_policy("fixed:21", 20, None)


def ok(index: int, sent: float, latency: float, k: int = 4, quality: float | None = None) -> Outcome:
    return Outcome(2.0, index, sent, latency, "OK", k, k, 10 - k, (1,) * k, 0.1 * k, None, quality)


def test_summary_of_hand_made_outcomes():
    outcomes = [
        ok(0, 0.0, 1.0, k=2),
        ok(1, 0.5, 3.0, k=4, quality=0.5),
        ok(2, 1.0, 2.0, k=6, quality=0.7),
        Outcome(2.0, 3, 1.5, 0.01, "UNAVAILABLE"),
        Outcome(2.0, 4, 2.0, None, "CANCELLED"),
    ]
    summary = summarize_rate(2.0, outcomes, latency_target_s=2.5)
    assert (summary["sent"], summary["completed"]) == (5, 3)
    assert summary["errors"] == {"CANCELLED": 1, "UNAVAILABLE": 1}
    assert summary["span_s"] == 3.5  # the last answer: sent 0.5 s in, 3 s long
    assert summary["throughput_rps"] == pytest.approx(3 / 3.5)
    assert summary["goodput"] == pytest.approx(2 / 5)  # 1 s and 2 s of five sent
    assert summary["latency_p50_s"] == 2.0
    assert summary["latency_p95_s"] == pytest.approx(numpy.percentile([1.0, 3.0, 2.0], 95))
    assert summary["mean_switch_step"] == 4
    assert summary["cloud_unet_s_per_request"] == pytest.approx(0.4)
    assert summary["mean_quality"] == pytest.approx(0.6)
    plain = summarize_rate(2.0, outcomes[:1], latency_target_s=None)
    assert plain["goodput"] is None and plain["mean_quality"] is None


def test_csv_rows_by_rate_and_index(tmp_path):
    write_csv([Outcome(2.0, 1, 0.5, None, "CANCELLED"), ok(0, 0.1, 1.5, k=2, quality=0.25)], tmp_path / "r.csv")
    first, second = read_rows(tmp_path, "r.csv")
    assert (first["index"], first["status"], first["cloud_batch_sizes"], first["quality"]) == ("0", "OK", "1;1", "0.25")
    assert (first["predicted_latency_s"], second["latency"], second["switch_step"]) == ("", "", "")


def test_percentile_is_numpys_linear():
    values = [0.3, 5.0, 1.2, 9.9, 2.2, 2.2, 7.1]
    for q in (0, 1, 50, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(numpy.percentile(values, q))
    assert percentile([4.0], 99) == 4.0 and percentile([], 50) is None


def test_arrivals_do_not_wait_for_answers():
    """A server slower than the arrivals: every request still goes out on time, and those unanswered when the
    grace ends are CANCELLED rows; errors are rows with their status."""
    arrivals = [0.05 * i for i in range(1, 11)]

    async def slow(request: GenerationRequest):
        if request.seed % 2:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())
        await asyncio.sleep(30)

    outcomes: list[Outcome] = []
    started = time.monotonic()
    asyncio.run(run_rate(1.0, arrivals, lambda i: GenerationRequest("x", seed=i), slow, outcomes, 0.2))
    assert time.monotonic() - started < 2
    outcomes.sort(key=lambda outcome: outcome.index)
    assert [outcome.index for outcome in outcomes] == list(range(10))
    for outcome, at in zip(outcomes, arrivals, strict=True):
        assert at <= outcome.sent < at + 0.05
    assert [outcome.status for outcome in outcomes] == ["CANCELLED", "UNAVAILABLE"] * 5
    assert all(outcome.latency is None for outcome in outcomes[::2])


def test_plan_gives_each_request_its_prompt_and_seed():
    policy = parse_policy("fixed:1", 4, None)
    plan = LoadPlan([50.0], 1.0, 3, 1.0, 40, policy, ["a", "b"], GenerationRequest("", num_inference_steps=4))
    sent: list[GenerationRequest] = []

    async def record(request: GenerationRequest):
        sent.append(request)
        raise grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata())

    asyncio.run(run_plan(plan, record, [], progress=False))
    assert [(r.prompt, r.seed, r.switch_step) for r in sent] == [("a", 40, 1), ("b", 41, 1), ("a", 42, 1)]


BENCH = ["bench", "load", "--target", "127.0.0.1:1", "--rate", "1", "--policy", "edge", "--prompts", "shapes:2"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--policy", "fixed:x"], "--policy must be cloud, edge, fixed:K"),
        (["--policy", "fixed:30"], "--policy fixed:30: K must be in [0, 25]"),
        (["--policy", "auto"], "--policy auto needs --latency-target"),
        (["--rate", "0"], "--rate must be a positive number (requests per second), got '0'"),
        (["--rate", "x"], "--rate must be a positive number"),
        (["--rate", "nan"], "--rate must be a positive number"),
        (["--rate", None, "--rates", "1,-2"], "--rates must be a comma-separated list of positive numbers"),
        (["--rate", None, "--rates", "1,1"], "--rates must not repeat a rate"),
        (["--duration", "0"], "--duration must be a positive number"),
        (["--latency-target", "-1"], "--latency-target must be a positive number"),
        (["--max-requests", "0"], "--max-requests must be a positive number"),
        (["--prompts", "shapes:0"], "--prompts: shapes:N needs a positive N"),
        (["--steps", "0"], "num_inference_steps must be in [1, 1000]"),
        (["--timestep-power", "9"], "timestep_power must be in [1"),
    ],
)
def test_bad_flags_are_named(tmp_path, capsys, change, message):
    args = [*BENCH, "--out", str(tmp_path / "out")]
    for flag, value in zip(change[::2], change[1::2], strict=True):
        position = args.index(flag) if flag in args else None
        if position is None:
            args += [flag, value]
        elif value is None:
            del args[position : position + 2]
        else:
            args[position + 1] = value
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_unwritable_out_is_named(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main([*BENCH, "--out", str(tmp_path / "file")]) == 2
    assert "--out: cannot write to" in capsys.readouterr().err


@pytest.fixture(scope="module")
def gateway(request) -> str:
    """The target of the module's gateway (tests/test_serving.py's cluster, brought up once here)."""
    return f"127.0.0.1:{request.getfixturevalue('cluster')['gateway']}"


def read_rows(folder, name: str = "results.csv") -> list[dict]:
    with open(folder / name, newline="") as file:
        return list(csv.DictReader(file))


def test_load_on_a_live_gateway_writes_consistent_files(gateway, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    out = tmp_path / "load"
    args = ["bench", "load", "--target", gateway, "--rates", "1,2", "--duration", "2"]
    args += ["--policy", "fixed:2", "--steps", "4", "--seed", "5", "--latency-target", "30"]
    assert main([*args, "--prompts", str(prompts), "--out", str(out)]) == 0
    assert "rate" in capsys.readouterr().out  # the table
    rows = read_rows(out)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["policy"], summary["latency_target_s"], summary["interrupted"]) == ("fixed:2", 30.0, False)
    assert summary["steps"] == 4 and summary["timestep_power"] is None  # the pair's spacing
    for rate, entry in zip((1.0, 2.0), summary["rates"], strict=True):
        at_rate = [row for row in rows if float(row["rate"]) == rate]
        assert len(at_rate) == entry["sent"] == len(arrival_times(rate, 2.0, None, seed=5)) > 0
        assert [int(row["index"]) for row in at_rate] == list(range(entry["sent"]))
        assert {row["status"] for row in at_rate} == {"OK"} and entry["completed"] == entry["sent"]
        latencies = [float(row["latency"]) for row in at_rate]
        sent = [float(row["sent"]) for row in at_rate]
        assert min(latencies) > 0 and sent == sorted(sent)
        # Open loop: each request goes out at its arrival time (a busy machine may add a little), whatever came back.
        scheduled = arrival_times(rate, 2.0, None, seed=5)
        assert all(0 <= actual - planned < 0.5 for actual, planned in zip(sent, scheduled, strict=True))
        span = max(s + latency for s, latency in zip(sent, latencies, strict=True))
        assert entry["throughput_rps"] == pytest.approx(entry["completed"] / span)
        assert entry["goodput"] == 1.0 and entry["errors"] == {}
        for q in (50, 95, 99):
            assert entry[f"latency_p{q}_s"] == pytest.approx(numpy.percentile(latencies, q))
        assert entry["mean_switch_step"] == statistics.mean(int(row["switch_step"]) for row in at_rate) == 2
        for row in at_rate:
            assert (row["cloud_unet_evaluations"], row["edge_unet_evaluations"]) == ("2", "2")
            sizes = row["cloud_batch_sizes"]  # empty from a server that does not report them
            assert sizes == "" or all(int(size) >= 1 for size in sizes.split(";"))
        cloud = statistics.mean(float(row["cloud_denoise_s"]) for row in at_rate)
        assert entry["cloud_unet_s_per_request"] == pytest.approx(cloud) and cloud > 0
    for plot in ("attainment_vs_rate.png", "p95_vs_rate.png", "k_quality_vs_rate.png"):
        assert (out / plot).read_bytes().startswith(b"\x89PNG")


def test_auto_policy_records_what_the_server_answers(gateway, tmp_path):
    """The server side of auto is not settled: whatever it answers, every request sent is a row."""
    out = tmp_path / "auto"
    args = ["bench", "load", "--target", gateway, "--rate", "5", "--max-requests", "2"]
    args += ["--policy", "auto", "--latency-target", "20", "--steps", "4", "--prompts", "shapes:2", "--out", str(out)]
    assert main(args) == 0
    rows = read_rows(out)
    assert len(rows) == json.loads((out / "summary.json").read_text())["rates"][0]["sent"] == 2
    assert all(row["status"] in grpc.StatusCode.__members__ for row in rows)
    assert not list(out.glob("*.png"))  # one rate: no plots


def test_ctrl_c_stops_and_writes_what_it_has(gateway, tmp_path):
    out = tmp_path / "stopped"
    command = [sys.executable, "-m", "hybrid_sd.cli", "bench", "load", "--target", gateway]
    command += ["--rate", "4", "--duration", "60", "--policy", "fixed:2", "--steps", "4"]
    command += ["--prompts", "shapes:2", "--out", str(out)]
    bench = ctrl_c_reaches(lambda: subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        seen = b""
        while b"req/s" not in seen:  # the progress bar: requests are going out
            chunk = os.read(bench.stderr.fileno(), 4096)
            assert chunk, bench.stdout.read().decode()
            seen += chunk
        time.sleep(1.0)
        bench.send_signal(signal.SIGINT)
        stdout, stderr = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert bench.returncode == 130, stderr.decode()
    assert b"Traceback" not in stderr and b"interrupted" in stderr
    rows = read_rows(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and 0 < len(rows) == summary["rates"][0]["sent"]
    assert {row["status"] for row in rows} <= {"OK", "CANCELLED"}
