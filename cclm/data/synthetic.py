"""The embedded world: procedurally drawn scenes with captions in several languages, built to be learnable by a
tiny model in a few CPU minutes, so the whole pipeline (and zero-shot cross-lingual transfer) can be demonstrated
without downloading anything.

Scenes use few, visually salient attributes -- 6 colours, 4 shapes, 2 sizes, 5 positions, counts 2-3, two
relations -- drawn large on a plain background (anti-aliased by 4x supersampling). Sentences come from the
per-language grammars in :mod:`cclm.data.world_grammar`.

``build_world(out_dir, ...)`` writes::

    image_caption/   shards + sizes.json + manifest.json; captions in ``caption_langs`` (default English only)
    parallel/        shards: English <-> each of ``parallel_langs`` (captions and hypothesis-style sentences)
    heldout/<lang>/  retrieval.jsonl + images/: new scenes (never in training), one folder per language, the same
                     images in every folder; one line per image:
                     {"image": "images/h0000001.jpg", "image_id": "h0000001", "captions": {"<lang>": ["..."]}}
    xvnli/           annotations/<lang>/{train,dev,test}.jsonl (IGLUE XVNLI fields) + images/<Flikr30kID>.jpg
    text/corpus.txt  every training sentence, one per line (for ``cclm prep tokenizer``)
    world.json       what was built (counts, languages, seed, paths)
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from cclm.data.shards import VIEW_IMAGE_CAPTION, VIEW_PARALLEL, ShardSink
from cclm.data.workers import ordered_map
from cclm.data.world_grammar import COLOURS, COUNTS, POSITIONS, RELATIONS, SHAPES, SIZES, grammar

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


# ---------------------------------------------------------------------------------------------------- world
def _render_jpeg(task: tuple[Scene, int]) -> bytes:
    scene, size = task
    return jpeg_bytes(render(scene, size))


def _render_all(
    scenes: list[Scene], size: int, num_workers: int, progress: bool, desc: str
) -> Iterator[bytes]:
    """JPEG bytes of ``scenes`` in order, drawn in ``num_workers`` processes, with an optional progress bar."""
    tasks = [(scene, size) for scene in scenes]
    return ordered_map(
        _render_jpeg, tasks, num_workers, len(tasks), progress, desc, unit="image", chunksize=64
    )


def _check_languages(langs, what: str) -> list[str]:
    langs = list(dict.fromkeys(langs))
    for lang in langs:
        grammar(lang)  # raises a clear error for a language without a grammar
    if not langs and what == "caption_langs":
        raise ValueError("caption_langs must name at least one language")
    return langs


def _unique_scenes(rng: random.Random, n: int, taken: set[str]) -> list[Scene]:
    scenes, tries = [], 0
    while len(scenes) < n:
        scene = sample_scene(rng)
        tries += 1
        caption = scene.caption("en")
        if caption not in taken:
            taken.add(caption)
            scenes.append(scene)
        elif tries > 100 * n + 10000:
            raise ValueError(f"cannot draw {n} scenes with distinct captions; ask for fewer held-out images")
    return scenes


def build_world(
    out_dir: str | Path,
    num_images: int = 2000,
    caption_langs=("en",),
    parallel_langs=("de", "fr", "es", "ja", "zh"),
    image_size: int = 64,
    seed: int = 0,
    num_parallel: int | None = None,
    heldout_images: int = 200,
    heldout_langs=None,
    xvnli_images: int = 150,
    shard_size: int | None = None,
    command: str | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> dict:
    """Write the synthetic world under ``out_dir`` (layout in the module docstring); returns ``world.json``.
    Images are drawn in ``num_workers`` processes (0 = inline); the output does not depend on it."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new folder")
    if num_images < 1 or image_size < 8:
        raise ValueError("num_images must be >= 1 and image_size >= 8")
    caption_langs = _check_languages(caption_langs, "caption_langs")
    parallel_langs = [lang for lang in _check_languages(parallel_langs, "parallel_langs") if lang != "en"]
    heldout_langs = _check_languages(
        heldout_langs or sorted(set(caption_langs) | set(parallel_langs) | {"en"}), "heldout_langs"
    )
    num_parallel = num_images if num_parallel is None else num_parallel
    shard_size = shard_size or max(25, math.ceil(num_images / 16))
    corpus: list[str] = []
    command = command or f"build_world(num_images={num_images}, seed={seed})"

    # Training images with captions.
    rng = random.Random(f"{seed}-train")
    scenes = [sample_scene(rng) for _ in range(num_images)]
    jpegs = _render_all(scenes, image_size, num_workers, progress, "training images")
    with ShardSink(
        out / "image_caption", VIEW_IMAGE_CAPTION, max_samples=shard_size, command=command
    ) as sink:
        for i, (scene, data) in enumerate(zip(scenes, jpegs)):
            captions = {lang: scene.caption(lang) for lang in caption_langs}
            corpus.extend(captions.values())
            meta = {"captions": captions, "scene": scene.kind}
            sink.write(
                f"img{i:07d}",
                {"jpg": data, "json": json.dumps(meta, ensure_ascii=False).encode()},
                list(captions),
            )
        ic_manifest = sink.close({"world_seed": seed, "image_size": image_size})

    # Parallel text, English <-> each other language.
    rng = random.Random(f"{seed}-parallel")
    par_manifest = None
    if parallel_langs and num_parallel > 0:
        par_shard = max(50, math.ceil(num_parallel * len(parallel_langs) / 16))
        with ShardSink(out / "parallel", VIEW_PARALLEL, max_samples=par_shard, command=command) as sink:
            for lang in parallel_langs:
                for i in range(num_parallel):
                    spec = parallel_sentence_spec(rng)
                    src, tgt = render_sentence(spec, "en"), render_sentence(spec, lang)
                    corpus.extend((src, tgt))
                    pair = {"src": src, "tgt": tgt, "src_lang": "en", "tgt_lang": lang}
                    sink.write(
                        f"{lang}{i:07d}",
                        {"json": json.dumps(pair, ensure_ascii=False).encode()},
                        ["en", lang],
                    )
            par_manifest = sink.close({"world_seed": seed})

    # Held-out retrieval: new scenes with distinct captions, the same images in every language folder.
    rng = random.Random(f"{seed}-heldout")
    heldout = _unique_scenes(rng, heldout_images, set())
    heldout_jpegs = list(_render_all(heldout, image_size, num_workers, progress, "held-out images"))
    for lang in heldout_langs:
        folder = out / "heldout" / lang
        (folder / "images").mkdir(parents=True)
        with open(folder / "retrieval.jsonl", "w", encoding="utf-8") as f:
            for i, (scene, data) in enumerate(zip(heldout, heldout_jpegs)):
                image_id = f"h{i:07d}"
                (folder / "images" / f"{image_id}.jpg").write_bytes(data)
                line = {
                    "image": f"images/{image_id}.jpg",
                    "image_id": image_id,
                    "captions": {lang: [scene.caption(lang)]},
                }
                f.write(json.dumps(line, ensure_ascii=False) + "\n")

    # XVNLI-style entailment set.
    rng = random.Random(f"{seed}-xvnli")
    xvnli_scenes = [sample_scene(rng) for _ in range(xvnli_images)]
    (out / "xvnli" / "images").mkdir(parents=True)
    items = []
    for i, scene in enumerate(xvnli_scenes):
        image_id = f"x{i:07d}"
        (out / "xvnli" / "images" / f"{image_id}.jpg").write_bytes(jpeg_bytes(render(scene, image_size)))
        items.append((image_id, scene, hypotheses(scene, rng)))
    splits = {
        "train": items[: int(0.6 * len(items))],
        "dev": items[int(0.6 * len(items)) : int(0.8 * len(items))],
        "test": items[int(0.8 * len(items)) :],
    }
    for lang in heldout_langs:
        folder = out / "xvnli" / "annotations" / lang
        folder.mkdir(parents=True)
        for split, split_items in splits.items():
            with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for image_id, scene, hyps in split_items:
                    for label, spec in hyps:
                        line = {
                            "gold_label": label,
                            "sentence1": scene.caption(lang),
                            "sentence2": render_hypothesis(spec, lang),
                            "captionID": f"{image_id}.jpg#0",
                            "pairID": f"{image_id}.jpg#0r1{label[0]}",
                            "Flikr30kID": image_id,
                        }
                        f.write(json.dumps(line, ensure_ascii=False) + "\n")

    (out / "text").mkdir()
    (out / "text" / "corpus.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    world = {
        "seed": seed,
        "image_size": image_size,
        "caption_langs": caption_langs,
        "parallel_langs": parallel_langs,
        "heldout_langs": heldout_langs,
        "images": num_images,
        "parallel_pairs": par_manifest["samples"] if par_manifest else 0,
        "heldout_images": len(heldout),
        "xvnli_images": len(xvnli_scenes),
        "paths": {
            "image_caption": "image_caption",
            "parallel": "parallel" if par_manifest else None,
            "heldout": {lang: f"heldout/{lang}" for lang in heldout_langs},
            "xvnli": "xvnli",
            "corpus": "text/corpus.txt",
        },
        "image_caption_manifest": ic_manifest,
    }
    (out / "world.json").write_text(json.dumps(world, indent=1, ensure_ascii=False))
    return world
