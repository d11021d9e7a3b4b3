"""The "shapes" dataset: one to three coloured shapes on white, each image with a caption that states
every shape's size, colour and kind and, for two shapes, where one stands relative to the other."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
# Pairwise at least 145 apart in RGB and at least 240 from the background, so that the nearest palette
# colour survives blur, noise and the colour drift of a generative model.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 0),
    "purple": (170, 40, 190),
    "black": (20, 20, 20),
}
# Radius (half the side of the shape's square box) as a fraction of the image side: 7 and 13 pixels at 64;
# at 6 pixels a small diamond blurred by one pixel is often taken for a circle.
SIZES: dict[str, float] = {"small": 0.11, "large": 0.2}
# The caption reads "<first shape> <relation> <second shape>".
RELATIONS = ("to the left of", "to the right of", "above", "below")
BACKGROUND = (255, 255, 255)
SHAPE_COUNTS = (1, 2, 3)
COUNT_WEIGHTS = (0.25, 0.5, 0.25)  # two-shape scenes carry the relations, so they get half the data
BORDER = 2  # pixels left free at each image edge
GAP = 3  # pixels between the boxes of two shapes, and the margin by which a stated relation holds
SUPERSAMPLE = 4  # shapes are drawn at this many times the size and box-filtered down, for smooth edges
MAX_ATTEMPTS = 1000  # placements tried before a scene's shapes are taken not to fit the image

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Shape:
    """One shape: its kind, colour and size words, and where it is drawn (in pixels)."""

    kind: str
    color: str
    size: str
    center: tuple[int, int]
    radius: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in pixel-edge coordinates: the shape lies within [left, right) x [top, bottom)."""
        x, y = self.center
        return x - self.radius, y - self.radius, x + self.radius, y + self.radius

    @property
    def phrase(self) -> str:
        """The noun phrase that states this shape, e.g. "a small red circle"."""
        return f"a {self.size} {self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """The shapes of one image of side `size`; `relation` (two shapes only) is shapes[0]'s to shapes[1]."""

    shapes: tuple[Shape, ...]
    relation: str | None
    size: int


def radius(size_word: str, image_size: int) -> int:
    """The radius in pixels of a shape of size `size_word` in an image of side `image_size`."""
    return round(SIZES[size_word] * image_size)


def relation_holds(a: Box, b: Box, relation: str, margin: float = 0) -> bool | np.ndarray:
    """Whether box `a` stands in `relation` to box `b`, clear of it by `margin` pixels along that axis.

    Works elementwise when the coordinates of `b` are numpy arrays."""
    if relation == "to the left of":
        return a[2] + margin <= b[0]
    if relation == "to the right of":
        return b[2] + margin <= a[0]
    if relation == "above":
        return a[3] + margin <= b[1]
    if relation == "below":
        return b[3] + margin <= a[1]
    raise ValueError(f"relation must be one of {', '.join(RELATIONS)}, got {relation!r}")


def caption(scene: Scene) -> str:
    """The caption of a scene: "a small red circle", "a large blue square above a small green diamond",
    or "a small red circle, a large blue square and a small black triangle"."""
    phrases = [shape.phrase for shape in scene.shapes]
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2:
        return f"{phrases[0]} {scene.relation} {phrases[1]}"
    return f"{', '.join(phrases[:-1])} and {phrases[-1]}"


def vocabulary() -> list[str]:
    """Every word that can appear in a caption, the comma counted as a word of its own, sorted."""
    words = {"a", "and", ","} | set(SHAPES) | set(COLORS) | set(SIZES)
    words |= {word for relation in RELATIONS for word in relation.split()}
    return sorted(words)


def sample_scene(rng: np.random.Generator, size: int = 64) -> Scene:
    """A random scene: shapes of distinct looks, inside the image, apart, and in the stated relation."""
    count = int(rng.choice(SHAPE_COUNTS, p=COUNT_WEIGHTS))
    relation = RELATIONS[rng.integers(len(RELATIONS))] if count == 2 else None
    looks: list[tuple[str, ...]] = []
    while len(looks) < count:  # distinct looks, so that a caption names each shape unambiguously
        look = tuple(str(rng.choice(words)) for words in (SHAPES, list(COLORS), list(SIZES)))
        if look not in looks:
            looks.append(look)
    for _ in range(MAX_ATTEMPTS):
        shapes: list[Shape] = []
        for kind, color, size_word in looks:
            center = _free_center(rng, radius(size_word, size), size, shapes, relation)
            if center is None:
                break
            shapes.append(Shape(kind, color, size_word, center, radius(size_word, size)))
        else:
            return Scene(tuple(shapes), relation, size)
    raise ValueError(f"could not place {count} shapes in a {size}x{size} image")


def _free_center(
    rng: np.random.Generator, r: int, size: int, placed: list[Shape], relation: str | None
) -> tuple[int, int] | None:
    """A uniformly drawn centre at which a shape of radius `r` fits inside the image, clear of `placed`
    and (as the second shape) in `relation` to the first one; None where there is none."""
    coords = np.arange(BORDER + r, size - BORDER - r + 1)
    xs, ys = np.meshgrid(coords, coords)
    box = (xs - r, ys - r, xs + r, ys + r)
    free = np.ones(xs.shape, dtype=bool)
    for other in placed:
        free &= np.logical_or.reduce([relation_holds(other.box, box, rel, GAP) for rel in RELATIONS])
    if relation is not None and len(placed) == 1:
        free &= relation_holds(placed[0].box, box, relation, GAP)
    candidates = np.flatnonzero(free)
    if candidates.size == 0:
        return None
    pick = candidates[rng.integers(candidates.size)]
    return int(xs.flat[pick]), int(ys.flat[pick])


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: Box, fill: tuple[int, int, int] | int) -> None:
    """Draw a filled shape of `kind` filling the pixel-edge box (left, top, right, bottom)."""
    # Pillow's coordinates name the last pixel covered, one less than the right and bottom edges.
    left, top, right, bottom = box[0], box[1], box[2] - 1, box[3] - 1
    mid_x, mid_y = (left + right) / 2, (top + bottom) / 2
    if kind == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif kind == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    elif kind == "triangle":
        draw.polygon([(mid_x, top), (right, bottom), (left, bottom)], fill=fill)
    elif kind == "diamond":
        draw.polygon([(mid_x, top), (right, mid_y), (mid_x, bottom), (left, mid_y)], fill=fill)
    else:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {kind!r}")


def render(scene: Scene) -> Image.Image:
    """The RGB image of a scene, with anti-aliased edges."""
    side = scene.size * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for shape in scene.shapes:
        box = tuple(SUPERSAMPLE * v for v in shape.box)
        draw_shape(draw, shape.kind, box, COLORS[shape.color])
    return canvas.resize((scene.size, scene.size), Image.Resampling.BOX)


class ShapesDataset:
    """`length` captioned images; item i depends only on (seed, i)."""

    def __init__(self, length: int, seed: int = 0, size: int = 64) -> None:
        self.length = length
        self.seed = seed
        self.size = size

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        """The scene of item `index`."""
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        return sample_scene(np.random.default_rng([self.seed, index % self.length]), self.size)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        """Item `index`: the image and its caption."""
        scene = self.scene(index)
        return render(scene), caption(scene)
