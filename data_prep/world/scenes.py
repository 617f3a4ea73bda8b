"""Scenes of the synthetic world: what is in a picture (:class:`Scene`), how scenes are drawn at random, how they
are rendered, and the sentences said about them (captions, XVNLI-style hypotheses, parallel-text sentences).

Scenes use few, visually salient attributes -- 6 colours, 4 shapes, 2 sizes, 5 positions, counts 2-3, two
relations -- drawn large on a plain background (anti-aliased by 4x supersampling). Sentences come from the
per-language grammars in :mod:`data_prep.world.grammar`.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from data_prep.world.grammar import COLOURS, COUNTS, POSITIONS, RELATIONS, SHAPES, SIZES, grammar

RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
    "black": (25, 25, 25),
}
BACKGROUND = (245, 245, 240)
RADIUS = {"big": 0.29, "small": 0.16, "count": 0.12, "relation": 0.16}
ANCHOR = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "centre": (0.5, 0.5),
}
ALL_LANGUAGES = ("en", "de", "fr", "es", "ja", "zh")
# How far each drawn outline (see `render`) reaches from the shape's centre, in radii: left, top, right, bottom.
# The star's outer points sit at -90, -18, 54, 126 and 198 degrees.
SHAPE_EXTENT = {
    "circle": (1.0, 1.0, 1.0, 1.0),
    "square": (0.85, 0.85, 0.85, 0.85),
    "triangle": (0.95, 1.0, 0.95, 0.75),
    "star": (math.cos(math.pi / 10), 1.0, math.cos(math.pi / 10), math.cos(math.pi / 5)),
}


@dataclass(frozen=True)
class Item:
    shape: str
    colour: str
    radius: float  # fraction of the image side
    x: float  # centre, fraction of the image side
    y: float


@dataclass(frozen=True)
class Scene:
    kind: str  # single | count | relation
    items: tuple[Item, ...]
    size: str | None = None  # single
    position: str | None = None  # single
    relation: str | None = None  # relation: items[0] is left of / above items[1]

    def caption(self, lang: str) -> str:
        g, first = grammar(lang), self.items[0]
        if self.kind == "single":
            return g.single(self.size, first.colour, first.shape, self.position)
        if self.kind == "count":
            return g.count(len(self.items), first.colour, first.shape)
        second = self.items[1]
        return g.relation((first.colour, first.shape), self.relation, (second.colour, second.shape))

    def object_counts(self) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        for item in self.items:
            counts[(item.colour, item.shape)] = counts.get((item.colour, item.shape), 0) + 1
        return counts


# ------------------------------------------------------------------------------------------------- sampling
def sample_scene(rng: random.Random) -> Scene:
    kind = rng.choices(("single", "count", "relation"), weights=(0.4, 0.2, 0.4))[0]

    def jitter() -> float:
        return rng.uniform(-0.04, 0.04)

    if kind == "single":
        size, position = rng.choice(SIZES), rng.choice(POSITIONS)
        ax, ay = ANCHOR[position]
        item = Item(rng.choice(SHAPES), rng.choice(COLOURS), RADIUS[size], ax + jitter(), ay + jitter())
        return Scene(kind, (item,), size=size, position=position)
    if kind == "count":
        n, shape, colour, r = rng.choice(COUNTS), rng.choice(SHAPES), rng.choice(COLOURS), RADIUS["count"]
        centres: list[tuple[float, float]] = []
        while len(centres) < n:
            c = (rng.uniform(r + 0.03, 1 - r - 0.03), rng.uniform(r + 0.03, 1 - r - 0.03))
            if all(math.dist(c, d) > 2.2 * r for d in centres):
                centres.append(c)
        return Scene(kind, tuple(Item(shape, colour, r, x, y) for x, y in centres))
    relation = rng.choice(RELATIONS)
    a = (rng.choice(COLOURS), rng.choice(SHAPES))
    b = a
    while b == a:
        b = (rng.choice(COLOURS), rng.choice(SHAPES))
    near, far, across = rng.uniform(0.2, 0.33), rng.uniform(0.67, 0.8), 0.5 + rng.uniform(-0.1, 0.1)
    across_b = 0.5 + rng.uniform(-0.1, 0.1)
    if relation == "left_of":
        pa, pb = (near, across), (far, across_b)
    else:
        pa, pb = (across, near), (across_b, far)
    r = RADIUS["relation"]
    items = (Item(a[1], a[0], r, *pa), Item(b[1], b[0], r, *pb))
    return Scene(kind, items, relation=relation)


# ------------------------------------------------------------------------------------------------ rendering
def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else 0.45 * r
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def render(scene: Scene, size: int, supersample: int = 4) -> Image.Image:
    canvas = size * supersample
    img = Image.new("RGB", (canvas, canvas), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for item in scene.items:
        cx, cy, r, fill = item.x * canvas, item.y * canvas, item.radius * canvas, RGB[item.colour]
        if item.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif item.shape == "square":
            h = 0.85 * r
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif item.shape == "triangle":
            draw.polygon(
                [(cx, cy - r), (cx - 0.95 * r, cy + 0.75 * r), (cx + 0.95 * r, cy + 0.75 * r)], fill=fill
            )
        elif item.shape == "star":
            draw.polygon(_star(cx, cy, r), fill=fill)
        else:
            raise ValueError(f"unknown shape {item.shape!r}")
    return img.resize((size, size), Image.Resampling.LANCZOS)


def jpeg_bytes(img: Image.Image, quality: int = 92) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# -------------------------------------------------------------------------------------------------- regions
def item_box(item: Item, image_size: int) -> list[float]:
    """The pixel box (x0, y0, x1, y1) of a drawn shape in a ``image_size`` image, cut to the image (a big shape
    near an edge reaches past it), to 1/100 px."""
    left, top, right, bottom = SHAPE_EXTENT[item.shape]
    r = item.radius
    box = (item.x - left * r, item.y - top * r, item.x + right * r, item.y + bottom * r)
    return [round(min(max(v, 0.0), 1.0) * image_size, 2) for v in box]


def scene_regions(scene: Scene, langs, image_size: int) -> list[dict]:
    """Region entries (docs/regions.md), one per kind of shape in the scene: a shape of its own described alone
    (with the size of a ``single`` scene: "a big red circle"; each shape of a ``relation`` scene: "a red
    circle"), the identical shapes of a ``count`` scene together, as their caption says ("two red circles"),
    boxed by the union of their boxes. Descriptions in every language of ``langs``; drawing nothing at random,
    they leave the world's random streams as they are."""
    groups: dict[tuple[str, str], list[Item]] = {}
    for item in scene.items:
        groups.setdefault((item.colour, item.shape), []).append(item)
    regions = []
    for (colour, shape), items in groups.items():
        boxes = [item_box(item, image_size) for item in items]
        box = [
            min(b[0] for b in boxes),
            min(b[1] for b in boxes),
            max(b[2] for b in boxes),
            max(b[3] for b in boxes),
        ]
        if len(items) == 1:
            captions = {lang: grammar(lang).thing(colour, shape, scene.size) for lang in langs}
        else:
            captions = {lang: grammar(lang).count(len(items), colour, shape) for lang in langs}
        regions.append({"box": box, "captions": captions, "label": f"{colour} {shape}"})
    return regions


# ------------------------------------------------------------------------------------------------ sentences
def hypotheses(scene: Scene, rng: random.Random) -> list[tuple[str, tuple]]:
    """Three (label, sentence spec) pairs for an XVNLI-style item: spec = ("exists", n, colour, shape) or
    ("neutral", colour, shape); rendered per language by :func:`render_hypothesis`."""
    counts = scene.object_counts()
    (colour, shape), n = rng.choice(sorted(counts.items()))
    entail = ("exists", n, colour, shape)
    if n > 1 and rng.random() < 0.5:
        contradiction = ("exists", 5 - n, colour, shape)  # two <-> three
    else:
        wrong = [c for c in COLOURS if (c, shape) not in counts]
        contradiction = ("exists", n, rng.choice(wrong), shape)
    return [("entailment", entail), ("contradiction", contradiction), ("neutral", ("neutral", colour, shape))]


def render_hypothesis(spec: tuple, lang: str) -> str:
    g = grammar(lang)
    return g.exists(*spec[1:]) if spec[0] == "exists" else g.neutral(*spec[1:])


def parallel_sentence_spec(rng: random.Random) -> tuple:
    """Mostly captions, some hypothesis-style sentences so every language meets the XVNLI vocabulary."""
    draw = rng.random()
    if draw < 0.8:
        return ("caption", sample_scene(rng))
    if draw < 0.9:
        return ("exists", rng.choice((1, 1, 2, 3)), rng.choice(COLOURS), rng.choice(SHAPES))
    return ("neutral", rng.choice(COLOURS), rng.choice(SHAPES))


def render_sentence(spec: tuple, lang: str) -> str:
    return spec[1].caption(lang) if spec[0] == "caption" else render_hypothesis(spec, lang)
