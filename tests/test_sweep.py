"""``hybrid-sd sweep``: the rows, summary, plots and report it writes, resuming, and bad input."""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections import Counter

import numpy as np
import PIL.Image
import pytest

from hybrid_sd.cli.sweep import add_sweep_command
from hybrid_sd.pipeline import HybridPipeline
from hybrid_sd.sweep import COLUMNS, SweepConfig, run_sweep

STEPS = 4
KS = [0, 2, 4]
PROMPTS = ["a large red circle above a small blue square", "a small green triangle"]


class Interrupted(Exception):
    """Raised by a runner to stop a sweep part-way."""


@pytest.fixture(scope="module")
def runner(pairs):
    return HybridPipeline(pairs["sd1"])


def make_config(out, seeds=(0,), **changes) -> SweepConfig:
    fields = dict(
        switch_steps=KS,
        prompts=PROMPTS,
        seeds=list(seeds),
        num_inference_steps=STEPS,
        scheduler="euler",  # no PLMS warm-up evaluation: cloud evaluations == k
        guidance_scale=7.5,
        out=out,
    )
    return SweepConfig(**(fields | changes))


def read_rows(out) -> list[dict]:
    with open(out / "results.csv", newline="") as file:
        reader = csv.DictReader(file)
        assert tuple(reader.fieldnames) == COLUMNS
        return list(reader)


def keys(rows) -> list[tuple[str, str, str]]:
    return [(row["prompt_index"], row["seed"], row["switch_step"]) for row in rows]


def test_sweep_writes_rows_summary_plots_and_report(tmp_path, runner):
    summary = run_sweep(make_config(tmp_path, seeds=(0, 1)), runner, progress=False)
    rows = read_rows(tmp_path)
    assert len(rows) == len(PROMPTS) * 2 * len(KS)
    assert len(set(keys(rows))) == len(rows)
    for row in rows:
        k = int(row["switch_step"])
        assert int(row["cloud_unet_evaluations"]) == k
        assert int(row["edge_unet_evaluations"]) == STEPS - k
        assert (int(row["handoff_bytes"]) > 0) == (k > 0)
        assert 0.0 <= float(row["adherence"]) <= 1.0  # both prompts are shapes captions
        assert float(row["t_total_s"]) > 0
        if k == STEPS:
            assert row["psnr"] == "" and float(row["ssim"]) == 1.0
        else:
            assert float(row["psnr"]) > 0 and -1.0 <= float(row["ssim"]) <= 1.0
        assert PIL.Image.open(tmp_path / row["image"]).size == (64, 64)

    written = json.loads((tmp_path / "summary.json").read_text())
    assert written == summary
    assert set(written["switch_steps"]) == {str(k) for k in KS}
    for k in KS:
        entry = written["switch_steps"][str(k)]
        assert entry["n"] == len(PROMPTS) * 2
        assert entry["cloud_fraction"] == pytest.approx(k / STEPS)
        for column in ("adherence", "ssim", "t_total_s", "cloud_unet_evaluations"):
            stats = entry["metrics"][column]
            assert stats["n"] == len(PROMPTS) * 2
            assert stats["ci_low"] <= stats["mean"] <= stats["ci_high"]
    assert "psnr" not in written["switch_steps"][str(STEPS)]["metrics"]

    for k in KS:  # the summary is of the rows
        at_k = [float(row["adherence"]) for row in rows if int(row["switch_step"]) == k]
        assert written["switch_steps"][str(k)]["metrics"]["adherence"]["mean"] == pytest.approx(sum(at_k) / len(at_k))

    for name, size in (("quality_vs_k.png", (600, 400)), ("cost_vs_k.png", (900, 400))):
        with PIL.Image.open(tmp_path / name) as plot:
            assert plot.format == "PNG" and plot.size == size
            assert np.asarray(plot.convert("L")).std() > 0  # something is drawn
    with PIL.Image.open(tmp_path / "grid.png") as grid:
        grid = grid.convert("RGB")
    assert grid.size == (32 + 64 * len(KS), 16 + 64 * len(PROMPTS))
    for index in range(len(PROMPTS)):  # prompts by k, each cell the first seed's image
        for column, k in enumerate(KS):
            cell = grid.crop((32 + 64 * column, 16 + 64 * index, 32 + 64 * (column + 1), 16 + 64 * (index + 1)))
            with PIL.Image.open(tmp_path / "images" / f"p{index}_s0_k{k}.png") as image:
                assert np.array_equal(np.asarray(cell), np.asarray(image.convert("RGB"))), (index, k)
    report = (tmp_path / "report.md").read_text()
    assert all(f"({name})" in report for name in ("quality_vs_k.png", "cost_vs_k.png", "grid.png"))
    for k in KS:
        cloud_share = f"{written['switch_steps'][str(k)]['cloud_fraction']:.0%}"
        assert f"\n| {k} | {len(PROMPTS) * 2} | {cloud_share} | " in report, k


def test_interrupted_sweep_resumes_without_rerunning(tmp_path, runner):
    calls = []

    def interrupted(request):
        if len(calls) == 3:
            raise Interrupted
        calls.append(request)
        return runner(request)

    # k = 4, the reference, is added to the grid: the fourth call, p0's k = 2, fails.
    config = make_config(tmp_path, switch_steps=[0, 1, 2, 3])
    with pytest.raises(Interrupted):
        run_sweep(config, interrupted, progress=False)
    assert len(read_rows(tmp_path)) == 3

    resumed = []

    def counting(request):
        resumed.append((request.prompt, request.seed, request.switch_step))
        return runner(request)

    run_sweep(config, counting, progress=False)
    rows = read_rows(tmp_path)
    assert len(rows) == len(PROMPTS) * 5
    assert not [key for key, count in Counter(keys(rows)).items() if count > 1]
    first = {(request.prompt, request.seed, request.switch_step) for request in calls}
    assert len(resumed) == len(rows) - len(first) and not first & set(resumed)
    assert resumed[0] == (PROMPTS[0], 0, 2)  # scored against the reference read back from disk
    assert all(row["ssim"] != "" for row in rows)


def test_prompts_outside_the_grammar_are_named_not_averaged(tmp_path, runner, caplog):
    config = make_config(tmp_path, switch_steps=[0], prompts=["a photo of a cat"], seeds=[1])
    with caplog.at_level(logging.WARNING, logger="hybrid_sd.sweep"):
        summary = run_sweep(config, runner, progress=False)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'a photo of a cat'" in warnings[0] and "shapes grammar" in warnings[0]
    assert summary["unscored_prompts"] == ["a photo of a cat"]
    written = json.loads((tmp_path / "summary.json").read_text())
    assert all(entry["metrics"]["adherence"] is None for entry in written["switch_steps"].values())
    assert written["switch_steps"]["0"]["metrics"]["ssim"]["mean"] <= 1.0  # the rest is still measured


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"switch_steps": [0, 5]}, "switch_steps"),
        ({"switch_steps": [2, 2]}, "switch_steps"),
        ({"prompts": []}, "prompts"),
        ({"seeds": []}, "seeds"),
        ({"seeds": [-1]}, "seeds"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"timestep_power": 0.5}, "timestep_power"),
    ],
)
def test_bad_config_names_the_field(tmp_path, changes, field):
    with pytest.raises(ValueError, match=field):
        make_config(tmp_path, **changes)


def sweep_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_sweep_command(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["sweep", *argv])


def test_cli_sweep_in_process(tmp_path, capsys, pair_specs):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small green triangle\n\n")
    out = tmp_path / "sweep"
    args = sweep_args(
        "--switch-steps", "0,2", "--prompts", str(prompts), "--seeds", "3", "--steps", "2", "--scheduler", "euler",
        "--timestep-power", "2", "--out", str(out),
    )  # fmt: skip
    args.handler(args)
    printed = capsys.readouterr().out
    assert str(out / "report.md") in printed
    rows = read_rows(out)
    assert sorted((row["prompt"], row["seed"], row["switch_step"]) for row in rows) == [
        ("a small green triangle", "3", "0"),
        ("a small green triangle", "3", "2"),
    ]
    for row in rows:
        assert (row["num_inference_steps"], row["scheduler"], row["timestep_power"]) == ("2", "euler", "2.0")
        k = int(row["switch_step"])
        assert (int(row["cloud_unet_evaluations"]), int(row["edge_unet_evaluations"])) == (k, 2 - k)
        assert 0.0 <= float(row["adherence"]) <= 1.0
        assert PIL.Image.open(out / row["image"]).size == (64, 64)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompts"] == ["a small green triangle"] and summary["seeds"] == [3]
    assert summary["timestep_power"] == 2.0
    # The same folder at another spacing would mix two sweeps' rows: refused, naming what differs.
    args.timestep_power = None
    with pytest.raises(ValueError, match="spacing"):
        args.handler(args)
    assert {k: entry["n"] for k, entry in summary["switch_steps"].items()} == {"0": 1, "2": 1}
    report = (out / "report.md").read_text()
    assert (
        "- p0: a small green triangle" in report and "\n| 0 | 1 | 0% | " in report and "\n| 2 | 1 | 100% | " in report
    )

    with pytest.raises(ValueError, match="--seeds"):
        bad = sweep_args("--switch-steps", "0", "--prompts", str(prompts), "--seeds", "1,x", "--out", str(out))
        bad.handler(bad)
