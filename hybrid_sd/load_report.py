"""What a load benchmark writes: ``results.csv`` (one row per request sent), the per-rate summary of
``summary.json`` and the plots against rate."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

from hybrid_sd.load_bench import Outcome

COLUMNS = tuple(field.name for field in fields(Outcome))
PERCENTILES = (50, 95, 99)
# The plots a run over several rates draws: file, and the summary keys it shows (one panel each).
PLOTS = {
    "attainment_vs_rate.png": ("goodput",),
    "p95_vs_rate.png": ("latency_p95_s",),
    "k_quality_vs_rate.png": ("mean_switch_step", "mean_quality"),
}
LABELS = {
    "goodput": "attainment (share OK within the target)",
    "latency_p95_s": "p95 latency (s)",
    "mean_switch_step": "mean switch step k",
    "mean_quality": "mean profile quality",
}


def write_csv(outcomes: Sequence[Outcome], path: Path) -> None:
    """One row per request, by rate then index; batch sizes joined with ``;``, unset values empty."""
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, COLUMNS)
        writer.writeheader()
        for outcome in sorted(outcomes, key=lambda o: (o.rate, o.index)):
            row = asdict(outcome)
            row["cloud_batch_sizes"] = ";".join(map(str, outcome.cloud_batch_sizes))
            writer.writerow({column: "" if value is None else value for column, value in row.items()})


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile by linear interpolation between order statistics (numpy's default); None
    for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize_rate(rate: float, outcomes: Sequence[Outcome], latency_target_s: float | None) -> dict:
    """One rate's numbers: requests sent and completed OK, errors by status, throughput (OK answers per
    second of the run's span, from its start to its last answer), goodput (the share of those sent that
    completed OK within the target; None without one), latency percentiles and means over the OK answers."""
    ok = [outcome for outcome in outcomes if outcome.status == "OK"]
    latencies = [outcome.latency for outcome in ok]
    span = max((o.sent + o.latency for o in outcomes if o.latency is not None), default=0.0)
    summary = {
        "rate": rate,
        "sent": len(outcomes),
        "completed": len(ok),
        "errors": dict(sorted(Counter(o.status for o in outcomes if o.status != "OK").items())),
        "span_s": span,
        "throughput_rps": len(ok) / span if span > 0 else 0.0,
        "goodput": None,
    }
    if latency_target_s is not None and outcomes:
        summary["goodput"] = sum(latency <= latency_target_s for latency in latencies) / len(outcomes)
    summary.update({f"latency_p{q}_s": percentile(latencies, q) for q in PERCENTILES})
    summary["mean_switch_step"] = mean([outcome.switch_step for outcome in ok])
    summary["cloud_unet_s_per_request"] = mean([outcome.cloud_denoise_s for outcome in ok])
    summary["mean_quality"] = mean([outcome.quality for outcome in ok if outcome.quality is not None])
    return summary


def summarize(rates: Sequence[float], outcomes: Sequence[Outcome], latency_target_s: float | None) -> list[dict]:
    """:func:`summarize_rate` for each rate that sent a request, in the order given."""
    by_rate = {rate: [outcome for outcome in outcomes if outcome.rate == rate] for rate in rates}
    return [summarize_rate(rate, done, latency_target_s) for rate, done in by_rate.items() if done]


def plot_against_rate(series: dict[str, list[dict]], keys: Sequence[str], path: Path, title: str) -> None:
    """One panel per summary key against rate, a line per series (a policy's per-rate summaries); rates
    without a value (no OK answer, no quality) are left out."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    figure = Figure(figsize=(5 * len(keys), 4), layout="constrained")
    panels = figure.subplots(1, len(keys), squeeze=False)[0]
    for axes, key in zip(panels, keys, strict=True):
        for label, summaries in series.items():
            points = [(entry["rate"], entry[key]) for entry in summaries if entry[key] is not None]
            if points:
                axes.plot(*zip(*points, strict=True), marker="o", label=label)
        axes.set(xlabel="arrival rate (requests/s)", ylabel=LABELS[key])
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    figure.suptitle(title)
    figure.savefig(path, dpi=100)


def write_plots(series: dict[str, list[dict]], folder: Path, title: str) -> list[Path]:
    """The plots of :data:`PLOTS` into ``folder`` (attainment only where a target gave goodput)."""
    written = []
    for name, keys in PLOTS.items():
        if keys == ("goodput",) and all(entry["goodput"] is None for s in series.values() for entry in s):
            continue
        plot_against_rate(series, keys, folder / name, title)
        written.append(folder / name)
    return written


def write_report(
    folder: Path, settings: dict, rates: Sequence[float], outcomes: Sequence[Outcome], latency_target_s: float | None
) -> dict:
    """``results.csv``, ``summary.json`` (``settings`` and the per-rate summaries) and, for several rates,
    the plots; returns the summary."""
    write_csv(outcomes, folder / "results.csv")
    summary = {**settings, "latency_target_s": latency_target_s, "rates": summarize(rates, outcomes, latency_target_s)}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    if len(summary["rates"]) > 1:
        write_plots({settings["policy"]: summary["rates"]}, folder, f"policy {settings['policy']}")
    return summary
