"""A pair's quality and latency against the switch step, read from a sweep's ``summary.json`` or a trained pair's
``evaluation.json``: what the switch-point policy (:mod:`hybrid_sd.switch_policy`) chooses from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hybrid_sd.presets import EMBEDDED_PRESETS


@dataclass(frozen=True)
class SwitchProfile:
    """Per switch step k of an N-step schedule: the quality (adherence, else SSIM against the large-only
    image; None where the file has neither) and the measured end-to-end seconds (None where absent)."""

    source: str  # the file it was read from
    num_inference_steps: int
    quality: dict[int, float | None]
    total_s: dict[int, float | None]

    def quality_at(self, k: int, steps: int) -> float | None:
        """The quality at ``k`` of ``steps``, interpolated at the same fraction of this profile's schedule."""
        known = {j: quality for j, quality in self.quality.items() if quality is not None}
        return _interpolate(known, k * self.num_inference_steps / steps)

    def cold_step_costs(self) -> tuple[float, float] | None:
        """(cloud, edge) seconds per step before any measurement: the cloud-alone and edge-alone totals over the
        steps (their fixed costs folded in, a coarse seed); None unless the profile times both ends."""
        n = self.num_inference_steps
        cloud, edge = self.total_s.get(n), self.total_s.get(0)
        return None if cloud is None or edge is None else (cloud / n, edge / n)


def load_profile(path: Path) -> SwitchProfile:
    """Read a ``summary.json`` (hybrid_sd.sweep) or an ``evaluation.json`` (a trained pair's); a bad file raises
    ``ValueError`` naming it and what is wrong."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"switch profile {path}: cannot read it as JSON: {error}") from error
    try:
        return _parse(data, str(path))
    except (TypeError, KeyError, AttributeError) as error:
        raise ValueError(f"switch profile {path}: not a sweep summary or pair evaluation ({error!r})") from error


def default_profile(pair_name: str | None) -> SwitchProfile | None:
    """The evaluation of an embedded pair (the shapes pair) or of a trained pair's folder, else None."""
    folder = EMBEDDED_PRESETS.get(pair_name or "") or Path(pair_name or "")
    evaluation = folder / "evaluation.json"
    return load_profile(evaluation) if pair_name and evaluation.is_file() else None


def _parse(data: dict, source: str) -> SwitchProfile:
    steps = data["num_inference_steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"switch profile {source}: num_inference_steps must be a positive integer, got {steps!r}")
    entries = data["switch_steps"]
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"switch profile {source}: switch_steps must be a non-empty object")
    quality, total = {}, {}
    for key, entry in entries.items():
        if not key.isdigit() or int(key) > steps:
            raise ValueError(f"switch profile {source}: switch step {key!r} is not an integer in [0, {steps}]")
        k = int(key)
        if "metrics" in entry:  # a sweep's summary: means per column
            metrics = entry["metrics"]
            adherence = _mean(metrics.get("adherence"))
            quality[k] = adherence if adherence is not None else _mean(metrics.get("ssim"))
            total[k] = _mean(metrics.get("t_total_s"))
        else:  # a pair's evaluation
            quality[k] = (entry.get("adherence") or {}).get("overall")
            total[k] = entry.get("median_total_s")
        for name, value in (("quality", quality[k]), ("total seconds", total[k])):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < 0):
                raise ValueError(f"switch profile {source}: {name} at switch step {k} must be a number >= 0")
    if all(q is None for q in quality.values()):
        raise ValueError(f"switch profile {source}: no switch step has a quality (adherence or ssim)")
    return SwitchProfile(source, steps, quality, total)


def _mean(stats: dict | None) -> float | None:
    return None if stats is None else stats["mean"]


def _interpolate(points: dict[int, float], x: float) -> float | None:
    """Linear interpolation of ``points`` at ``x``, clamped to the ends; None without points."""
    if not points:
        return None
    xs = sorted(points)
    if x <= xs[0]:
        return points[xs[0]]
    for low, high in zip(xs, xs[1:], strict=False):
        if x <= high:
            return points[low] + (points[high] - points[low]) * (x - low) / (high - low)
    return points[xs[-1]]
