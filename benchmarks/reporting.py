"""What the benchmarks share: interleaved timing, a plain text table and the relative error of an output."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch


def interleaved_times(
    variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, inner: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each variant in each of ``repeats`` rounds (the mean of ``inner`` calls), after
    ``warmup`` untimed calls each; the order rotates every round, so that drift on a noisy machine hits all
    alike (two variants alternate)."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for _ in range(inner):
                variants[name]()
            times[name].append((time.perf_counter() - start) / inner)
    return times


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain text table: floats to 3 significant places (whole numbers from 100), missing values as ``-``."""

    def cell(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    cells = [[cell(value) for value in row] for row in rows]
    widths = [max(len(str(h)), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]
    print(f"\n== {title}")
    for row in [[str(h) for h in header], *cells]:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    print(flush=True)


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    y, reference = y.float(), reference.float()
    return ((y - reference).norm() / reference.norm()).item()
