"""Prompt adherence for the shapes dataset, by image analysis alone: parse the caption, find the shapes
in the image, and check the count and each stated colour, kind, size and relation."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

from hybrid_sd.shapes.dataset import COLORS, RELATIONS, SHAPES, SIZES, SUPERSAMPLE, draw_shape

_COLOR_NAMES = list(COLORS)
_PALETTE = np.array(list(COLORS.values()), dtype=np.float64)
_OBJECT = rf"a ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
_GRAMMAR = (
    re.compile(_OBJECT),
    re.compile(rf"{_OBJECT} ({'|'.join(RELATIONS)}) {_OBJECT}"),
    re.compile(rf"{_OBJECT}, {_OBJECT} and {_OBJECT}"),
)
# Foreground is further from the background than this fraction of the distance to the nearest palette
# colour; each region is then cut again at half the distance to its own colour, the middle of its edge.
FOREGROUND_FRACTION = 0.4
MIN_CONTRAST = 40.0  # on an image without contrast, noise is not a shape
# A region smaller than this fraction of the smallest shape (a small triangle or diamond) is noise.
MIN_AREA_FRACTION = 0.4
# A shape is one colour blended with the background (anti-aliasing, blur): at least MIN_COHERENCE of its
# pixels lie within half the smallest distance between two palette colours of that blend.
MIN_COHERENCE = 0.6
_COHERENCE_DISTANCE = 0.5 * min(np.linalg.norm(a - b) for a, b in itertools.combinations(_PALETTE, 2))
MAX_CANDIDATES = 6  # the largest regions matched against the caption: at most 6P3 = 120 assignments


@dataclass(frozen=True)
class StatedObject:
    """One shape as a caption states it."""

    kind: str
    color: str
    size: str


@dataclass(frozen=True)
class ParsedCaption:
    """The stated shapes and, for two, the relation of the first to the second."""

    objects: tuple[StatedObject, ...]
    relation: str | None


@dataclass(frozen=True)
class Detection:
    """One shape found in an image: its colour, kind and size, its centroid (x, y) and area in pixels."""

    kind: str
    color: str
    size: str
    centroid: tuple[float, float]
    area: int


@dataclass(frozen=True)
class AdherenceScore:
    """Per-attribute agreement in [0, 1]; relation is None where the caption states none.

    count: min(found, stated) / max(found, stated); color, shape, size: the fraction of stated shapes
    whose matched detection has that attribute (an unmatched shape scores 0); relation: 1 if the
    matched centroids stand in the stated relation, else 0. overall: the mean of the attributes that are
    not None. Stated shapes are matched to detections by the assignment that agrees on most attributes."""

    count: float
    color: float
    shape: float
    size: float
    relation: float | None
    overall: float


# What the scorer can read, for messages about prompts it cannot.
GRAMMAR = (
    "'a <size> <colour> <shape>', two such joined by a relation, or three as 'A, B and C'; sizes "
    f"{'/'.join(SIZES)}, colours {'/'.join(COLORS)}, shapes {'/'.join(SHAPES)}, relations {'/'.join(RELATIONS)}"
    " (e.g. 'a small blue square to the left of a large red circle')"
)


def in_grammar(caption: str) -> bool:
    return any(pattern.fullmatch(caption) for pattern in _GRAMMAR)


def parse_caption(caption: str) -> ParsedCaption:
    """The shapes and relation a caption states; ValueError, naming the caption, if it is not in the grammar."""
    for pattern in _GRAMMAR:
        match = pattern.fullmatch(caption)
        if match is None:
            continue
        words = list(match.groups())
        relation = words.pop(3) if len(words) == 7 else None
        objects = tuple(StatedObject(words[i + 2], words[i + 1], words[i]) for i in range(0, len(words), 3))
        return ParsedCaption(objects, relation)
    raise ValueError(f"caption is not in the shapes grammar: {caption!r}")


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The 4-connected components of a boolean mask: labels 1..n (0 off the mask), and n."""
    height, width = mask.shape
    index = np.arange(height * width).reshape(height, width)
    across = mask[:, :-1] & mask[:, 1:]
    down = mask[:-1, :] & mask[1:, :]
    a = np.concatenate([index[:, :-1][across], index[:-1, :][down]])
    b = np.concatenate([index[:, 1:][across], index[1:, :][down]])
    # Union-find over all edges at once. Parents only ever point to smaller indices, so there are no
    # cycles; each round points every pixel at its root, then hooks the larger root of every edge whose
    # ends still differ onto the smaller one, so the number of roots falls every round.
    parent = np.arange(height * width)
    while True:
        while not np.array_equal(grandparent := parent[parent], parent):
            parent = grandparent
        root_a, root_b = parent[a], parent[b]
        apart = root_a != root_b
        if not apart.any():
            break
        np.minimum.at(parent, np.maximum(root_a, root_b)[apart], np.minimum(root_a, root_b)[apart])
    on = mask.ravel()
    labels = np.zeros(height * width, dtype=np.int64)
    roots, inverse = np.unique(parent[on], return_inverse=True)
    labels[on] = inverse + 1
    return labels.reshape(height, width), len(roots)


@cache
def _geometry(kind: str) -> tuple[float, float, float]:
    """The area and the centroid's offset (x, y) from the box centre of a shape as the dataset draws it,
    in units of its radius."""
    side = 256
    canvas = Image.new("L", (side, side), 0)
    draw_shape(ImageDraw.Draw(canvas), kind, (0, 0, side, side), 255)
    weight = np.asarray(canvas, dtype=np.float64) / 255
    ys, xs = np.indices(weight.shape) + 0.5
    r = side / 2
    total = weight.sum()
    return total / r**2, ((weight * xs).sum() / total - r) / r, ((weight * ys).sum() / total - r) / r


def _fit(coverage: np.ndarray, kind: str) -> tuple[float, float]:
    """The soft IoU of a coverage map with the shape of `kind` of the same area and centroid, and that
    shape's radius.

    Fitting area and centroid rather than the bounding box keeps a blurred diamond, whose tips are lost,
    a diamond; comparing coverage rather than thresholded masks averages pixel noise out."""
    area, offset_x, offset_y = _geometry(kind)
    total = coverage.sum()
    ys, xs = np.indices(coverage.shape) + 0.5
    r = math.sqrt(total / area)
    cx = (coverage * xs).sum() / total - offset_x * r
    cy = (coverage * ys).sum() / total - offset_y * r
    height, width = coverage.shape
    canvas = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    box = (cx - r, cy - r, cx + r, cy + r)
    draw_shape(ImageDraw.Draw(canvas), kind, tuple(SUPERSAMPLE * v for v in box), 255)
    shape = np.asarray(canvas.resize((width, height), Image.Resampling.BOX), dtype=np.float64) / 255
    return np.minimum(coverage, shape).sum() / np.maximum(coverage, shape).sum(), r


def detect(image: Image.Image) -> list[Detection]:
    """The shapes in an image, largest first: coherent one-colour regions that stand out from the background."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    height, width = pixels.shape[:2]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)  # shapes keep off the border, so the border is background
    threshold = max(MIN_CONTRAST, FOREGROUND_FRACTION * np.linalg.norm(_PALETTE - background, axis=1).min())
    labels, _ = label_components(np.linalg.norm(pixels - background, axis=2) > threshold)
    side = min(height, width)
    small, large = (fraction * side for fraction in SIZES.values())
    min_area = MIN_AREA_FRACTION * _geometry("triangle")[0] * small**2
    flat_labels = labels.ravel()
    order = np.argsort(flat_labels, kind="stable")
    areas = np.bincount(flat_labels)
    starts = np.cumsum(areas) - areas
    detections = []
    for label in np.flatnonzero(areas[1:] >= min_area) + 1:
        flat = order[starts[label] : starts[label] + areas[label]]
        ys, xs = np.divmod(flat, width)
        detection = _describe(pixels.reshape(-1, 3)[flat], ys, xs, background, min_area, math.sqrt(small * large))
        if detection is not None:
            detections.append(detection)
    return sorted(detections, key=lambda d: -d.area)


def _blends(values: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel (row of `values`) read as a blend of the background with each palette colour: how far
    along the blend it lies (its coverage, in [0, 1]) and how far off the blend, one column per colour."""
    directions = _PALETTE - background
    coverage = np.clip((values - background) @ directions.T / (directions**2).sum(axis=1), 0, 1)
    residual = np.linalg.norm(values[:, None] - (background + coverage[..., None] * directions), axis=2)
    return coverage, residual


def _describe(
    values: np.ndarray, ys: np.ndarray, xs: np.ndarray, background: np.ndarray, min_area: float, split: float
) -> Detection | None:
    """The shape a region's pixels show, None if they are not one shape. Its colour is the one whose blend
    with the background lies nearest the median pixel; anti-aliased and blurred edges are such blends."""
    coverage, residual = _blends(values, background)
    color = int(_blends(np.median(values, axis=0)[None], background)[1][0].argmin())
    covered = coverage[:, color] >= 0.5
    if (residual[:, color] < _COHERENCE_DISTANCE).mean() < MIN_COHERENCE or covered.sum() < min_area:
        return None
    # Pad the region's box by half its size, room for any fitted shape of the same area.
    pad = (max(np.ptp(ys), np.ptp(xs)) + 1) // 2 + 2
    top, left = ys.min() - pad, xs.min() - pad
    coverage_map = np.zeros((ys.max() - top + pad + 1, xs.max() - left + pad + 1))
    coverage_map[ys - top, xs - left] = coverage[:, color]
    fits = {kind: _fit(coverage_map, kind) for kind in SHAPES}
    kind = max(SHAPES, key=lambda k: fits[k][0])
    size = "large" if fits[kind][1] > split else "small"
    ys, xs = ys[covered], xs[covered]
    return Detection(kind, _COLOR_NAMES[color], size, (float(xs.mean()), float(ys.mean())), len(ys))


def centroids_in_relation(a: Detection, b: Detection, relation: str) -> bool:
    """Whether detection `a`'s centroid stands in `relation` to `b`'s."""
    (ax, ay), (bx, by) = a.centroid, b.centroid
    return {"to the left of": ax < bx, "to the right of": ax > bx, "above": ay < by, "below": ay > by}[relation]


def score(image: Image.Image, caption: str) -> AdherenceScore:
    """How well an image shows what its caption states, attribute by attribute (see AdherenceScore)."""
    stated = parse_caption(caption)
    found = detect(image)
    count = min(len(found), len(stated.objects)) / max(len(found), len(stated.objects))
    candidates = found[:MAX_CANDIDATES]
    # Every injective assignment of detections to the stated shapes (None: left unmatched); on a tie the
    # first in this fixed order wins.
    slots = list(range(len(candidates))) + [None] * len(stated.objects)
    best_total, best_agree, best_holds = -1, (0, 0, 0), False
    for assignment in itertools.permutations(slots, len(stated.objects)):
        matched = [(obj, candidates[i]) for obj, i in zip(stated.objects, assignment, strict=True) if i is not None]
        agree = (
            sum(d.color == obj.color for obj, d in matched),
            sum(d.kind == obj.kind for obj, d in matched),
            sum(d.size == obj.size for obj, d in matched),
        )
        holds = (
            stated.relation is not None
            and None not in assignment
            and centroids_in_relation(candidates[assignment[0]], candidates[assignment[1]], stated.relation)
        )
        if sum(agree) + holds > best_total:
            best_total, best_agree, best_holds = sum(agree) + holds, agree, holds
    color, shape, size = (matches / len(stated.objects) for matches in best_agree)
    relation = None if stated.relation is None else float(best_holds)
    parts = [count, color, shape, size] + ([] if relation is None else [relation])
    return AdherenceScore(count, color, shape, size, relation, sum(parts) / len(parts))


def score_batch(images: Sequence[Image.Image], captions: Sequence[str]) -> dict[str, float | None]:
    """The mean of each attribute over the captions that state it (None if none does), and of overall."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    scores = [score(image, caption) for image, caption in zip(images, captions, strict=True)]
    means: dict[str, float | None] = {}
    for field in ("count", "color", "shape", "size", "relation", "overall"):
        values = [getattr(s, field) for s in scores if getattr(s, field) is not None]
        means[field] = sum(values) / len(values) if values else None
    return means
