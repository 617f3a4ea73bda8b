"""Writing the synthetic world to disk: scenes from :mod:`data_prep.world.scenes`, in the formats the training
pipeline and the evaluation read. ``build_world(out_dir, ...)`` writes::

    image_caption/   shards + sizes.json + manifest.json; captions in ``caption_langs`` (default English only)
    parallel/        shards: English <-> each of ``parallel_langs`` (captions and hypothesis-style sentences)
    heldout/<lang>/  retrieval.jsonl + images/: new scenes (never in training), one folder per language, the same
                     images in every folder; one line per image:
                     {"image": "images/h0000001.jpg", "image_id": "h0000001", "captions": {"<lang>": ["..."]}}
    xvnli/           annotations/<lang>/{train,dev,test}.jsonl (IGLUE XVNLI fields) + images/<Flikr30kID>.jpg
    text/corpus.txt  every training sentence, one per line (for ``cclm prep tokenizer``)
    world.json       what was built (counts, languages, seed, paths)

With ``regions=True`` the image-caption samples also carry ``regions`` (boxes of the shapes a description singles
out, described in ``region_langs``; docs/regions.md), and every held-out folder a ``grounding.jsonl``, one line
per such shape: ``{"image", "image_id", "box": [x0, y0, x1, y1] (pixels), "text", "lang"}``. Nothing else
changes: the same images, captions, order and random draws as without.

``parallel_phrases=N`` adds N phrase pairs per language to the parallel text, after the sentences: one object
named alone, as region descriptions name it ("a small red circle" <-> "ein kleiner roter Kreis"), drawn from a
random stream of their own, so the sentences before them stay as they were.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from pathlib import Path

from cclm.data.shards import VIEW_IMAGE_CAPTION, VIEW_PARALLEL, ShardSink
from data_prep.workers import ordered_map
from data_prep.world.grammar import COLOURS, SHAPES, SIZES, grammar
from data_prep.world.scenes import (
    Scene,
    hypotheses,
    jpeg_bytes,
    parallel_sentence_spec,
    render,
    render_hypothesis,
    render_sentence,
    sample_scene,
    scene_regions,
)


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


def _write_grounding(path: Path, scenes: list[Scene], lang: str, image_size: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, scene in enumerate(scenes):
            for region in scene_regions(scene, [lang], image_size):
                line = {
                    "image": f"images/h{i:07d}.jpg",
                    "image_id": f"h{i:07d}",
                    "box": region["box"],
                    "text": region["captions"][lang],
                    "lang": lang,
                }
                f.write(json.dumps(line, ensure_ascii=False) + "\n")


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
    regions: bool = False,
    region_langs=None,
    parallel_phrases: int = 0,
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
    region_langs = _check_languages(region_langs or heldout_langs, "region_langs") if regions else []
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
            if regions:
                meta["regions"] = scene_regions(scene, region_langs, image_size)
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

            def write_pair(key: str, src: str, tgt: str, lang: str) -> None:
                corpus.extend((src, tgt))
                pair = {"src": src, "tgt": tgt, "src_lang": "en", "tgt_lang": lang}
                sink.write(key, {"json": json.dumps(pair, ensure_ascii=False).encode()}, ["en", lang])

            for lang in parallel_langs:
                for i in range(num_parallel):
                    spec = parallel_sentence_spec(rng)
                    write_pair(
                        f"{lang}{i:07d}", render_sentence(spec, "en"), render_sentence(spec, lang), lang
                    )
            phrase_rng = random.Random(f"{seed}-phrases")
            for lang in parallel_langs:
                for i in range(parallel_phrases):
                    colour, shape = phrase_rng.choice(COLOURS), phrase_rng.choice(SHAPES)
                    size = phrase_rng.choice((None, *SIZES))
                    en, xx = (
                        grammar("en").thing(colour, shape, size),
                        grammar(lang).thing(colour, shape, size),
                    )
                    write_pair(f"{lang}p{i:06d}", en, xx, lang)
            par_manifest = sink.close({"world_seed": seed, "parallel_phrases": parallel_phrases})

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
        if regions:
            _write_grounding(folder / "grounding.jsonl", heldout, lang, image_size)

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
        "parallel_phrases": parallel_phrases if par_manifest else 0,
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
    if regions:
        world["region_langs"] = region_langs
        world["paths"]["grounding"] = {lang: f"heldout/{lang}/grounding.jsonl" for lang in heldout_langs}
    (out / "world.json").write_text(json.dumps(world, indent=1, ensure_ascii=False))
    return world
