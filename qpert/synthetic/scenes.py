"""Synthetic scenes of coloured shapes with exact boxes and captions, deterministic by seed.

A benchmark that runs anywhere needs images where "small object" is unambiguous and the
caption cannot be matched without seeing the small objects. Every scene holds 2-3 shapes
of distinct colours on a noisy grey background and every caption names every shape
(colour, shape, rough position), so a scene is retrieved only if all its shapes are seen:

* ``small`` scenes hold only small shapes (largest box < 10% of the image), so all their
  caption content sits in a few patches;
* ``large`` scenes hold one large shape (an easy anchor that narrows the gallery) and 1-2
  small ones that tell apart the scenes sharing a similar anchor.

Every scene also holds 1-2 large striped blobs in dull, unsaturated tones that no caption
names and no box covers, like the unannotated clutter of a Flickr30K photo: they fill many
patches and pull attention away from the small named shapes, which is what Q-Pert's boxes
are for. They come from a stream of their own, so ``distractors=(0, 0)`` gives the same
scenes without them.

``SceneConfig(caption_names="subset")`` gives captions that name only some of the shapes while the
boxes still hold all of them: what a detector gives a photo search, boxes of objects the query does
not name (the query-aware measurement, ``qpert.synthetic.query_aware``).

Scene ``index`` of stream ``seed`` is drawn from its own generator, so any scene can be
regenerated alone, and different seeds give independent, disjoint streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import ConfigError

#: Saturated colours, far from the grey background (channel spread > 100).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 175, 60),
    "blue": (50, 75, 215),
    "yellow": (225, 205, 40),
    "purple": (145, 50, 195),
    "orange": (235, 130, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
#: Names of the 3x3 regions of the image, row-major, by where a shape's centre falls.
POSITIONS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
_PREPOSITIONS = {
    "top": ("at the",),
    "bottom": ("at the",),
    "left": ("on the",),
    "right": ("on the",),
    "centre": ("in the",),
}
_CORNER_PREPOSITIONS = ("in the", "at the")
_CENTRE_NAMES = ("centre", "middle")
_SIZE_WORDS = {"small": ("small", "tiny"), "large": ("big", "large")}
_PREFIXES = ("", "there is", "a picture of", "an image with")
_JOINERS = ("and", "with")

SMALL_AREA = 0.1  # the paper's small-object bin: largest object below 10% of the image
#: What each caption names: "all" the shapes (the benchmark's default), or a random non-empty "subset"
#: that leaves at least one boxed shape unnamed (all of a one-shape scene).
CAPTION_NAMES = ("all", "subset")


@dataclass(frozen=True)
class SceneConfig:
    """What scenes look like. Sizes are box sides in pixels; ranges are inclusive."""

    image_size: int = 64
    small_fraction: float = 0.5
    small_side: tuple[int, int] = (5, 9)  # at most about one 8-px patch: hard to see, as in the paper
    large_side: tuple[int, int] = (22, 38)
    small_scene_objects: tuple[int, int] = (2, 3)
    large_scene_small_objects: tuple[int, int] = (1, 2)
    captions_per_image: int = 5
    background_noise: float = 16.0
    gap: int = 2
    distractors: tuple[int, int] = (1, 2)  # unnamed, unboxed textured blobs per scene
    distractor_side: tuple[int, int] = (18, 34)
    caption_names: str = "all"  # one of CAPTION_NAMES

    def __post_init__(self) -> None:
        if self.caption_names not in CAPTION_NAMES:
            raise ConfigError(f"unknown caption_names {self.caption_names!r}; choose one of {CAPTION_NAMES}")
        if self.small_side[1] ** 2 >= SMALL_AREA * self.image_size**2:
            raise ConfigError("small shapes must stay below 10% of the image area")
        if self.large_side[0] ** 2 < SMALL_AREA * self.image_size**2:
            raise ConfigError("large shapes must cover at least 10% of the image area")


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape; ``box`` is (x0, y0, x1, y1) in pixel edges, tight around its pixels."""

    colour: str
    shape: str
    size: str  # "small" or "large"
    box: tuple[int, int, int, int]
    position: str

    @property
    def area(self) -> int:
        x0, y0, x1, y1 = self.box
        return (x1 - x0) * (y1 - y0)

    @property
    def name(self) -> str:
        """The words a caption names it by; unique in a scene, whose colours are distinct."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True, eq=False)
class Scene:
    """An (H, W, 3) uint8 image, its shapes and captions naming them (all, or a subset: ``caption_names``)."""

    image_id: str
    kind: str  # "small" or "large"
    image: np.ndarray
    objects: tuple[SceneObject, ...]
    captions: tuple[str, ...]

    @property
    def boxes(self) -> np.ndarray:
        """(M, 4) float32 xyxy boxes, the form Q-Pert takes."""
        return np.array([o.box for o in self.objects], dtype=np.float32).reshape(-1, 4)

    @property
    def max_area(self) -> float:
        """Largest box over the image area (what the area bins of the metrics use)."""
        h, w = self.image.shape[:2]
        return max(o.area for o in self.objects) / (h * w)


def scene_id(seed: int, index: int) -> str:
    """A file-name-safe id that is unique across seeds (not numeric, so no id normalization applies)."""
    return f"s{seed}_{index:06d}"


def shape_mask(shape: str, side: int) -> np.ndarray:
    """(side, side) bool mask of a shape filling a side x side square."""
    c = np.arange(side) + 0.5 - side / 2
    dy, dx = c[:, None], c[None, :]
    r = side / 2
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "triangle":
        rows = np.arange(side)[:, None] + 1
        return np.abs(dx) <= rows * r / side
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "cross":
        return (np.abs(dx) <= side / 6) | (np.abs(dy) <= side / 6)
    raise ConfigError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def position_of(box: tuple[int, int, int, int], image_size: int) -> str:
    x0, y0, x1, y1 = box
    col = min(int(3 * (x0 + x1) / 2 / image_size), 2)
    row = min(int(3 * (y0 + y1) / 2 / image_size), 2)
    return POSITIONS[3 * row + col]


def make_scene(seed: int, index: int, config: SceneConfig = SceneConfig()) -> Scene:
    """Scene ``index`` of the stream ``seed``: the same arguments always give the same scene."""
    rng = np.random.default_rng([seed, index])
    size = config.image_size
    kind = "small" if rng.random() < config.small_fraction else "large"
    if kind == "small":
        sides = [
            int(rng.integers(*config.small_side, endpoint=True))
            for _ in range(rng.integers(*config.small_scene_objects, endpoint=True))
        ]
    else:
        sides = [int(rng.integers(*config.large_side, endpoint=True))]
        sides += [
            int(rng.integers(*config.small_side, endpoint=True))
            for _ in range(rng.integers(*config.large_scene_small_objects, endpoint=True))
        ]
    colours = rng.choice(len(COLOURS), size=len(sides), replace=False)
    shapes = rng.integers(len(SHAPES), size=len(sides))

    grey = int(rng.integers(70, 181))
    background = tuple(int(np.clip(grey + t, 0, 255)) for t in rng.integers(-12, 13, size=3))
    luminance = rng.normal(0.0, config.background_noise, size=(size, size, 1))
    image = np.asarray(background, dtype=np.float64) + luminance + rng.normal(0.0, 3.0, size=(size, size, 3))
    clutter = np.random.default_rng([seed, index, 1])  # its own stream: the same scene without it stays the same
    for _ in range(clutter.integers(*config.distractors, endpoint=True)):
        _draw_distractor(image, clutter, int(clutter.integers(*config.distractor_side, endpoint=True)))

    objects = []
    placed: list[tuple[int, int, int, int]] = []
    for side, c, s in zip(sides, colours, shapes):
        corner = _place(rng, side, size, placed, config.gap)
        if corner is None:  # no room left for this shape: the scene simply holds fewer
            continue
        x, y = corner
        colour, shape = list(COLOURS)[c], SHAPES[s]
        mask = shape_mask(shape, side)
        rgb = np.asarray(COLOURS[colour], dtype=np.float64) + rng.integers(-15, 16, size=3)
        region = image[y : y + side, x : x + side]
        region[mask] = rgb + rng.normal(0.0, 4.0, size=(int(mask.sum()), 3))
        rows, cols = np.nonzero(mask)
        box = (x + int(cols.min()), y + int(rows.min()), x + int(cols.max()) + 1, y + int(rows.max()) + 1)
        placed.append((x, y, x + side, y + side))
        objects.append(
            SceneObject(
                colour, shape, "small" if side**2 < SMALL_AREA * size**2 else "large", box, position_of(box, size)
            )
        )
    captions = tuple(caption(_named(objects, rng, config.caption_names), rng) for _ in range(config.captions_per_image))
    return Scene(
        scene_id(seed, index), kind, np.clip(np.rint(image), 0, 255).astype(np.uint8), tuple(objects), captions
    )


def _draw_distractor(image: np.ndarray, rng: np.random.Generator, side: int) -> None:
    """A large striped blob in dull, low-saturation tones, anywhere: like the unnamed, unboxed clutter of a
    Flickr30K photo, it covers many patches and draws attention, but no caption mentions it."""
    size = image.shape[0]
    x, y = (int(v) for v in rng.integers(-side // 4, size - 3 * side // 4, size=2))
    c = np.arange(side) + 0.5 - side / 2
    dy, dx = c[:, None], c[None, :]
    rx, ry = side / 2, side / 2 * rng.uniform(0.5, 1.0)
    theta = rng.uniform(0, np.pi)
    u, v = dx * np.cos(theta) + dy * np.sin(theta), -dx * np.sin(theta) + dy * np.cos(theta)
    mask = (u / rx) ** 2 + (v / ry) ** 2 <= 1
    phi = rng.uniform(0, np.pi)
    stripes = np.sin((dx * np.cos(phi) + dy * np.sin(phi)) * 2 * np.pi / rng.uniform(3, 7)) > 0
    tint = rng.integers(-12, 13, size=3)
    dark, light = int(rng.integers(20, 71)), int(rng.integers(170, 236))
    tone = np.where(stripes[..., None], light, dark) + tint
    ys, xs = slice(max(y, 0), min(y + side, size)), slice(max(x, 0), min(x + side, size))
    inner = (slice(ys.start - y, ys.stop - y), slice(xs.start - x, xs.stop - x))
    region, keep = image[ys, xs], mask[inner]
    region[keep] = tone[inner][keep] + rng.normal(0.0, 4.0, size=(int(keep.sum()), 3))


def make_scenes(seed: int, count: int, config: SceneConfig = SceneConfig(), start: int = 0) -> list[Scene]:
    """Scenes ``start .. start + count - 1`` of the stream ``seed``."""
    return [make_scene(seed, i, config) for i in range(start, start + count)]


def _named(objects: list[SceneObject], rng: np.random.Generator, mode: str) -> list[SceneObject]:
    """The shapes one caption names; "all" draws nothing from ``rng``, so default scenes stay as they were."""
    if mode == "all" or len(objects) < 2:
        return objects
    count = int(rng.integers(1, len(objects)))  # 1 .. M-1: at least one boxed shape goes unnamed
    return [objects[i] for i in sorted(rng.choice(len(objects), size=count, replace=False))]


def named_objects(text: str, objects: Sequence[SceneObject]) -> tuple[int, ...]:
    """Indexes of the ``objects`` that ``text`` names by colour and shape: the boxes a perfect
    open-vocabulary detector returns for the caption's phrases in that scene."""
    return tuple(i for i, o in enumerate(objects) if o.name in text)


def caption(objects: list[SceneObject], rng: np.random.Generator) -> str:
    """One caption naming every object, in a random order and with random wording."""
    phrases = [_phrase(objects[i], rng) for i in rng.permutation(len(objects))]
    text = phrases[0]
    for p in phrases[1:]:
        text += f" {_JOINERS[rng.integers(len(_JOINERS))]} {p}"
    prefix = _PREFIXES[rng.integers(len(_PREFIXES))]
    return f"{prefix} {text}".strip()


def _phrase(obj: SceneObject, rng: np.random.Generator) -> str:
    words = []
    if rng.random() < 0.5:
        options = _SIZE_WORDS[obj.size]
        words.append(options[rng.integers(len(options))])
    words += [obj.colour, obj.shape]
    words.insert(0, "an" if words[0][0] in "aeiou" else "a")
    if obj.position == "centre":
        where = _CENTRE_NAMES[rng.integers(len(_CENTRE_NAMES))]
    else:
        where = obj.position
    options = _PREPOSITIONS.get(obj.position, _CORNER_PREPOSITIONS)
    words += [options[rng.integers(len(options))], where]
    return " ".join(words)


def vocabulary() -> list[str]:
    """Every word a caption can contain (for a word-level tokenizer)."""
    words = {"a", *COLOURS, *SHAPES, *_JOINERS, *_CENTRE_NAMES}
    for group in (POSITIONS, _PREFIXES, _CORNER_PREPOSITIONS, *_PREPOSITIONS.values(), *_SIZE_WORDS.values()):
        for text in group:
            words.update(text.split())
    return sorted(words)


def _place(
    rng: np.random.Generator, side: int, size: int, placed: list[tuple[int, int, int, int]], gap: int, tries: int = 200
) -> Optional[tuple[int, int]]:
    """Top-left corner of a side x side square at least ``gap`` pixels from every placed square."""
    for _ in range(tries):
        x, y = (int(v) for v in rng.integers(1, size - side, size=2))
        if all(x + side + gap <= a or a2 + gap <= x or y + side + gap <= b or b2 + gap <= y for a, b, a2, b2 in placed):
            return x, y
    return None
