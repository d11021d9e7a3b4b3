"""Switch-step sweeps: every (prompt, seed, k) generated, scored against the large-only image, summarised.

A sweep writes into its output folder ``results.csv`` (one row per image, appended as it goes, so an
interrupted sweep resumes where it stopped), ``images/``, ``summary.json`` (per k: means with 95%
confidence intervals), ``quality_vs_k.png``, ``cost_vs_k.png``, ``grid.png`` and ``report.md``.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from hybrid_sd.metrics import psnr, ssim
from hybrid_sd.request import MAX_SEED, GenerationRequest
from hybrid_sd.results import STAGES, CallOptions, GenerationResult, OutputSpec
from hybrid_sd.shapes.adherence import GRAMMAR, in_grammar, score

TIMING_COLUMNS = tuple(f"t_{stage}_s" for stage in STAGES)
KEY_COLUMNS = (
    *("prompt_index", "prompt", "seed", "switch_step", "num_inference_steps"),
    *("scheduler", "guidance_scale", "timestep_power"),
)
METRIC_COLUMNS = ("adherence", "psnr", "ssim", "cloud_unet_evaluations", "edge_unet_evaluations", "handoff_bytes")
COLUMNS = (*KEY_COLUMNS, *METRIC_COLUMNS, *TIMING_COLUMNS, "image")
PSNR_MAX = 100.0  # dB for identical images, so that means and intervals stay finite
# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom; beyond 30 the normal 1.96.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131)
T_975 += (2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
GRID_CELL = 256  # largest side of an image in grid.png
LABEL_HEIGHT, LABEL_WIDTH = 16, 32

logger = logging.getLogger(__name__)

Key = tuple[int, int, int]  # (prompt index, seed, switch step)
Row = dict[str, str]  # one results.csv row, as the csv module reads it back


# Generates one request: a HybridPipeline, or remote_runner's gRPC call.
Runner = Callable[[GenerationRequest], GenerationResult]


@dataclass(frozen=True)
class SweepConfig:
    """The grid of a sweep. The large-only reference k = num_inference_steps is always run, listed or not,
    because PSNR and SSIM are measured against it."""

    switch_steps: list[int]
    prompts: list[str]
    seeds: list[int]
    num_inference_steps: int
    scheduler: str | None
    guidance_scale: float | None  # None: the pair's own
    out: Path
    timestep_power: float | None = None  # None: the pair's own

    def __post_init__(self) -> None:
        GenerationRequest(
            "", num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
            timestep_power=self.timestep_power,
        ).check()  # fmt: skip
        for name in ("switch_steps", "prompts", "seeds"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"{name} must not be empty")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} must not repeat a value, got {values}")
        for name, values, high in (
            ("switch_steps", self.switch_steps, self.num_inference_steps),
            ("seeds", self.seeds, MAX_SEED),
        ):
            for value in values:
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
                    raise ValueError(f"{name} must be integers in [0, {high}], got {value!r}")
        if any(not prompt.strip() for prompt in self.prompts):
            raise ValueError("prompts must not contain an empty prompt")

    @property
    def ks(self) -> list[int]:
        """The switch steps run, ascending, the reference included."""
        return sorted({*self.switch_steps, self.num_inference_steps})

    def plan(self) -> Iterator[Key]:
        """Every (prompt index, seed, k) in run order: per prompt and seed, the reference first."""
        n = self.num_inference_steps
        for index in range(len(self.prompts)):
            for seed in self.seeds:
                yield index, seed, n
                yield from ((index, seed, k) for k in self.ks if k != n)

    def request(self, key: Key) -> GenerationRequest:
        index, seed, k = key
        return GenerationRequest(
            self.prompts[index],
            switch_step=k,
            num_inference_steps=self.num_inference_steps,
            seed=seed,
            scheduler=self.scheduler,
            guidance_scale=self.guidance_scale,
            timestep_power=self.timestep_power,
        )


def remote_runner(
    target: str,
    token: str | None = None,
    tls_ca: Path | None = None,
    timeout: float | None = None,
    pair: str | None = None,
) -> Runner:
    """A runner that calls ``Generate`` on a gateway or edge worker at ``target`` for a PNG."""
    # Imported here: the gRPC stack is only needed against a live cluster.
    from hybrid_sd.client import generate_remote

    options = CallOptions(output=OutputSpec(image_format="PNG", latents=False), pair=pair or "")

    def run(request: GenerationRequest) -> GenerationResult:
        return asyncio.run(generate_remote(target, request, options, token, tls_ca, timeout))

    return run


def run_sweep(config: SweepConfig, runner: Runner, progress: bool = True) -> dict:
    """Run every (prompt, seed, k) not already in ``results.csv``, then write the summary, plots,
    grid and report; return the summary."""
    (config.out / "images").mkdir(parents=True, exist_ok=True)
    warn_unscored(config.prompts)
    rows = _resume(config)
    plan = list(config.plan())
    todo = [key for key in plan if key not in rows]
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc="sweep", unit="image", disable=not progress)
    with open(config.out / "results.csv", "a", newline="") as file, bar:
        writer = csv.DictWriter(file, COLUMNS)
        for key in todo:
            rows[key] = _run_one(config, runner, key)
            writer.writerow(rows[key])
            file.flush()  # a row on disk is a row an interrupted sweep need not run again
            bar.update()
    done = [rows[key] for key in plan]
    summary = summarize(config, done)
    (config.out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    plot_quality(summary, config.out / "quality_vs_k.png")
    plot_cost(summary, config.out / "cost_vs_k.png")
    write_grid(config, config.out / "grid.png")
    write_report(config, summary, config.out / "report.md")
    return summary


def _resume(config: SweepConfig) -> dict[Key, Row]:
    """The complete rows of an earlier run of this sweep, with results.csv rewritten to hold only them
    (a row cut short by a kill, or whose image is gone, is run again)."""
    path = config.out / "results.csv"
    rows: dict[Key, Row] = {}
    if path.exists():
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            if tuple(reader.fieldnames or ()) != COLUMNS:
                raise ValueError(f"{path} has other columns than a sweep writes; choose another output folder")
            for row in reader:
                if None in row or None in row.values() or not (config.out / row["image"]).exists():
                    continue
                _check_same_sweep(config, row, path)
                rows[(int(row["prompt_index"]), int(row["seed"]), int(row["switch_step"]))] = row
    temporary = path.with_suffix(".tmp")
    with open(temporary, "w", newline="") as file:
        writer = csv.DictWriter(file, COLUMNS)
        writer.writeheader()
        writer.writerows(rows.values())
    os.replace(temporary, path)
    return rows


def _check_same_sweep(config: SweepConfig, row: Row, path: Path) -> None:
    """Refuse to mix rows generated with other settings into this sweep's means."""
    index = int(row["prompt_index"])
    same = (
        int(row["num_inference_steps"]) == config.num_inference_steps
        and row["scheduler"] == (config.scheduler or "")
        and row["guidance_scale"] == _setting_cell(config.guidance_scale)
        and row.get("timestep_power", "") == _setting_cell(config.timestep_power)  # absent in older files
        and (index >= len(config.prompts) or row["prompt"] == config.prompts[index])
    )
    if not same:
        raise ValueError(f"{path} holds rows of a different sweep (steps, scheduler, guidance, spacing or prompts)")


def _run_one(config: SweepConfig, runner: Runner, key: Key) -> Row:
    """Generate one image, save it and score it; its results.csv row."""
    index, seed, k = key
    result = runner(config.request(key))
    image = result.image.convert("RGB")
    relative = Path("images") / f"p{index}_s{seed}_k{k}.png"
    image.save(config.out / relative, format="PNG")
    if k == config.num_inference_steps:
        psnr_db, similarity = None, 1.0
    else:
        # Its reference ran first: in this process, or in the run this one resumes.
        reference_path = config.out / "images" / f"p{index}_s{seed}_k{config.num_inference_steps}.png"
        with Image.open(reference_path) as reference:
            reference = reference.convert("RGB")
        psnr_db, similarity = min(PSNR_MAX, psnr(image, reference)), ssim(image, reference)
    row = dict.fromkeys(COLUMNS)
    row.update(
        prompt_index=index,
        prompt=config.prompts[index],
        seed=seed,
        switch_step=k,
        num_inference_steps=config.num_inference_steps,
        scheduler=config.scheduler or "",
        guidance_scale=_setting_cell(config.guidance_scale),
        timestep_power=_setting_cell(config.timestep_power),
        adherence=adherence(image, config.prompts[index]),
        psnr=psnr_db,
        ssim=similarity,
        cloud_unet_evaluations=result.unet_evaluations["cloud"],
        edge_unet_evaluations=result.unet_evaluations["edge"],
        handoff_bytes=result.handoff_bytes,
        image=relative.as_posix(),
    )
    row.update({f"t_{stage}_s": seconds for stage, seconds in result.timings.items()})
    # As strings, like the rows read back on resume, so that both summarise the same way.
    return {column: "" if value is None else str(value) for column, value in row.items()}


def _setting_cell(value: float | None) -> str:
    """A guidance scale or timestep power as results.csv holds it: empty for the pair's own."""
    return "" if value is None else str(float(value))


def adherence(image: Image.Image, prompt: str) -> float | None:
    """The shapes adherence score of ``image``, or None if ``prompt`` is not a shapes caption."""
    return score(image, prompt).overall if in_grammar(prompt) else None


def warn_unscored(prompts: list[str]) -> list[str]:
    """The prompts outside the shapes grammar, which the adherence column leaves empty, said once."""
    unscored = [prompt for prompt in prompts if not in_grammar(prompt)]
    if unscored:
        logger.warning(
            "adherence is not scored for %d of %d prompts, outside the shapes grammar (%s): %s",
            len(unscored),
            len(prompts),
            GRAMMAR,
            ", ".join(repr(prompt) for prompt in unscored),
        )
    return unscored


def mean_interval(values: list[float]) -> dict:
    """Mean, n and a two-sided 95% Student-t confidence interval of the mean (None for n < 2)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci_low": None, "ci_high": None, "n": n}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = (T_975[n - 2] if n - 1 <= len(T_975) else 1.96) * std / math.sqrt(n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def summarize(config: SweepConfig, rows: list[Row]) -> dict:
    """Per k: mean and 95% t-interval of every numeric column that has values (adherence: null without
    one, when no prompt is in the shapes grammar), and the cloud's share of the UNet evaluations."""
    per_k = {}
    for k in config.ks:
        at_k = [row for row in rows if int(row["switch_step"]) == k]
        metrics: dict[str, dict | None] = {"adherence": None}
        for column in (*METRIC_COLUMNS, *TIMING_COLUMNS):
            values = [float(row[column]) for row in at_k if row[column] != ""]
            if values:
                metrics[column] = mean_interval(values)
        cloud = sum(int(row["cloud_unet_evaluations"]) for row in at_k)
        edge = sum(int(row["edge_unet_evaluations"]) for row in at_k)
        per_k[str(k)] = {"n": len(at_k), "cloud_fraction": cloud / (cloud + edge) if cloud + edge else 0.0}
        per_k[str(k)]["metrics"] = metrics
    return {
        "num_inference_steps": config.num_inference_steps,
        "scheduler": config.scheduler,
        "guidance_scale": config.guidance_scale,
        "timestep_power": config.timestep_power,
        "prompts": config.prompts,
        "seeds": config.seeds,
        "unscored_prompts": [prompt for prompt in config.prompts if not in_grammar(prompt)],
        "confidence_interval": "95%, mean ± t(0.975, n-1)·s/√n",
        "switch_steps": per_k,
    }


def _series(summary: dict, column: str) -> tuple[list[int], list[float], list[list[float]]]:
    """k, means and error bar lengths (below, above) of one column; an interval of n = 1 draws none."""
    ks, means, errors = [], [], [[], []]
    for k, entry in summary["switch_steps"].items():
        stats = entry["metrics"].get(column)
        if stats is None:
            continue
        ks.append(int(k))
        means.append(stats["mean"])
        errors[0].append(0.0 if stats["ci_low"] is None else stats["mean"] - stats["ci_low"])
        errors[1].append(0.0 if stats["ci_high"] is None else stats["ci_high"] - stats["mean"])
    return ks, means, errors


def plot_quality(summary: dict, path: Path) -> None:
    """Adherence and SSIM against k, with 95% intervals."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.subplots()
    for column, label in (("adherence", "shapes adherence"), ("ssim", "SSIM vs. large-only")):
        ks, means, errors = _series(summary, column)
        if ks:
            axes.errorbar(ks, means, yerr=errors, marker="o", capsize=3, label=label)
    axes.set(xlabel="switch step k (cloud steps)", ylabel="score", ylim=(-0.05, 1.05), title="Quality against k")
    axes.legend()
    figure.savefig(path, dpi=100)


def plot_cost(summary: dict, path: Path) -> None:
    """Mean total latency and cloud UNet evaluations against k, in two panels."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4), layout="constrained")
    latency, cloud = figure.subplots(1, 2)
    ks, means, errors = _series(summary, "t_total_s")
    latency.errorbar(ks, means, yerr=errors, marker="o", capsize=3)
    latency.set(xlabel="switch step k", ylabel="seconds", title="Total latency (mean, 95% CI)")
    ks, means, _ = _series(summary, "cloud_unet_evaluations")
    cloud.plot(ks, means, marker="o")
    cloud.set(xlabel="switch step k", ylabel="evaluations", title="Cloud UNet evaluations per image")
    figure.savefig(path, dpi=100)


def write_grid(config: SweepConfig, path: Path) -> None:
    """Prompts by k (ascending) for the first seed, as saved, with the k and prompt index as labels."""
    seed = config.seeds[0]
    cells = [
        [Image.open(config.out / "images" / f"p{index}_s{seed}_k{k}.png").convert("RGB") for k in config.ks]
        for index in range(len(config.prompts))
    ]
    for row in cells:
        for image in row:
            image.thumbnail((GRID_CELL, GRID_CELL))
    width, height = cells[0][0].size
    grid = Image.new("RGB", (LABEL_WIDTH + width * len(config.ks), LABEL_HEIGHT + height * len(cells)), "white")
    draw = ImageDraw.Draw(grid)
    for column, k in enumerate(config.ks):
        draw.text((LABEL_WIDTH + column * width + 2, 2), f"k={k}", fill="black")
    for index, row in enumerate(cells):
        top = LABEL_HEIGHT + index * height
        draw.text((2, top + 2), f"p{index}", fill="black")
        for column, image in enumerate(row):
            grid.paste(image, (LABEL_WIDTH + column * width, top))
    grid.save(path, format="PNG")


def _cell(stats: dict | None, digits: int) -> str:
    """'mean ± half-width' for a report table; '–' without values."""
    if stats is None:
        return "–"
    if stats["ci_high"] is None:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['ci_high'] - stats['mean']:.{digits}f}"


def write_report(config: SweepConfig, summary: dict, path: Path) -> None:
    """A Markdown page: the settings, a table per k, and the plots and grid."""
    lines = [
        "# Switch-step sweep",
        "",
        f"{config.num_inference_steps} steps, scheduler {config.scheduler or '(cloud default)'}, "
        f"guidance {_setting_cell(config.guidance_scale) or 'of the pair'}, "
        f"timestep power {_setting_cell(config.timestep_power) or 'of the pair'}, "
        f"seeds {', '.join(map(str, config.seeds))}. "
        f"k = cloud steps before the handoff; k = {config.num_inference_steps} is the large model alone, "
        "the reference of PSNR and SSIM. Cells: mean ± half-width of the 95% t-interval.",
        "",
        "| k | n | cloud share | adherence | PSNR (dB) | SSIM | total latency (s) | handoff (bytes) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, entry in summary["switch_steps"].items():
        metrics = entry["metrics"]
        lines.append(
            f"| {k} | {entry['n']} | {entry['cloud_fraction']:.0%} | {_cell(metrics.get('adherence'), 3)} "
            f"| {_cell(metrics.get('psnr'), 2)} | {_cell(metrics.get('ssim'), 3)} "
            f"| {_cell(metrics.get('t_total_s'), 3)} | {_cell(metrics.get('handoff_bytes'), 0)} |"
        )
    lines += ["", "## Prompts", ""]
    lines += [f"- p{index}: {prompt}" for index, prompt in enumerate(config.prompts)]
    lines += [
        "",
        "## Quality against k",
        "",
        "![quality against k](quality_vs_k.png)",
        "",
        "## Latency and cloud cost against k",
        "",
        "![latency and cloud cost against k](cost_vs_k.png)",
        "",
        f"## Images (seed {config.seeds[0]}; rows: prompts, columns: k)",
        "",
        "![image grid](grid.png)",
        "",
    ]
    path.write_text("\n".join(lines))
