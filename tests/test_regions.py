"""The region path (cclm.data.regions), its config, and the synthetic world's regions.

Specification: the crop keeps the chosen box; every normalised box maps back to the pixels it came from, and the
region's pixels land where its box says; a flip mirrors pixels and box exactly and never happens when a caption
(whole-image, region or attribute) names a side in any language of the world or the converters; region masks take
exactly the patches a box touches on a ViT grid and a Swin final-stage grid; a batch holds each image once and
points every target at its image; the world's boxes cover its drawn shapes, its descriptions exist in every
language, and switching regions on changes nothing else the world writes."""

from __future__ import annotations

import io
import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from cclm.config import (
    ConfigError,
    DataConfig,
    PretrainConfig,
    RegionsConfig,
    check_regions_config,
    from_dict,
    load_config,
)
from cclm.data.regions import (
    WHOLE_IMAGE,
    Region,
    RegionTarget,
    RegionTransform,
    box_from_crop,
    box_in_crop,
    collate_regions,
    crop_keeping_box,
    parse_regions,
    patch_masks,
    region_example,
    visible_part,
)
from cclm.data.shards import expand_shards, iter_tar_samples
from cclm.data.skips import SkipSample
from cclm.data.transforms import decode_crop, to_array
from data_prep.world.build import build_world
from data_prep.world.grammar import grammar
from data_prep.world.scenes import (
    ALL_LANGUAGES,
    BACKGROUND,
    RGB,
    Scene,
    item_box,
    render,
    sample_scene,
    scene_regions,
)

ANY_LANGUAGE = frozenset()  # no language filter


def random_box(rng: random.Random, width: int, height: int) -> tuple[float, float, float, float]:
    x0, y0 = rng.uniform(0, width - 2), rng.uniform(0, height - 2)
    return (x0, y0, rng.uniform(x0 + 1, width), rng.uniform(y0 + 1, height))


def region(box, text="a thing", lang="en", attributes=()) -> Region:
    return Region(tuple(float(v) for v in box), ((lang, text),), tuple(attributes))


def jpeg(img: Image.Image, quality: int = 95) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


# ------------------------------------------------------------------------------------------------ geometry
def test_the_crop_holds_the_whole_chosen_box_and_stays_in_the_image():
    rng = random.Random(0)
    for _ in range(500):
        width, height = rng.randint(2, 900), rng.randint(2, 900)
        box = random_box(rng, width, height)
        left, top, right, bottom = crop_keeping_box(width, height, box, rng)
        assert all(isinstance(v, int) for v in (left, top, right, bottom))
        assert (
            0 <= left <= box[0]
            and 0 <= top <= box[1]
            and box[2] <= right <= width
            and box[3] <= bottom <= height
        )


def test_every_normalised_box_maps_back_to_the_pixels_it_came_from():
    rng = random.Random(1)
    transform = RegionTransform(224, max_regions=8, min_perc_in_image=0.3, careful_hflip=False)
    seen_flip, seen_cut = set(), 0
    for _ in range(300):
        width, height = rng.randint(50, 800), rng.randint(50, 800)
        regions = [region(random_box(rng, width, height)) for _ in range(rng.randint(1, 6))]
        plan = transform.plan(width, height, regions, [], rng)
        seen_flip.add(plan.flip)
        assert any(visible_part(r.box, plan.crop, 0.999) for r in regions)  # the chosen one is whole
        for target in plan.targets:
            assert all(0 <= v <= 1 for v in target.box) and target.box[2] > target.box[0]
            original = regions[target.index].box
            part = visible_part(original, plan.crop, transform.min_perc_in_image)
            assert part is not None
            back = box_from_crop(target.box, plan.crop, plan.flip)
            np.testing.assert_allclose(back, part, rtol=0, atol=1e-9)
            seen_cut += part != original
        kept = {t.index for t in plan.targets}
        for i, r in enumerate(regions):  # a region left out is too little in the crop (or over the cap)
            if i not in kept and len(plan.targets) < transform.max_regions:
                assert visible_part(r.box, plan.crop, transform.min_perc_in_image) is None
    assert seen_flip == {True, False} and seen_cut > 0


def _extent(pixels: np.ndarray, colour: tuple[int, int, int]) -> tuple[float, float, float, float]:
    """Pixel-edge box of the pixels close to ``colour``."""
    near = np.abs(pixels.astype(int) - np.array(colour)).sum(axis=2) < 60
    ys, xs = np.nonzero(near)
    return (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_a_regions_pixels_land_where_its_normalised_box_says_flipped_or_not():
    img = Image.new("RGB", (320, 240), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    red, blue = (220, 20, 20), (20, 20, 220)
    draw.rectangle((40, 60, 139, 119), fill=red)  # pixels 40..139 x 60..119: box (40, 60, 140, 120)
    draw.rectangle((200, 30, 289, 199), fill=blue)
    regions = [region((40, 60, 140, 120), "a red box"), region((200, 30, 290, 200), "a blue box")]
    data = jpeg(img)
    size = 96
    transform = RegionTransform(size, max_regions=2, min_perc_in_image=0.99)
    flips = set()
    for seed in range(12):
        pixels, plan = transform(data, regions, [], random.Random(seed))
        flips.add(plan.flip)
        assert pixels.shape == (size, size, 3)
        for target in plan.targets:
            colour = red if target.index == 0 else blue
            expected = [v * size for v in target.box]
            np.testing.assert_allclose(_extent(np.asarray(pixels), colour), expected, atol=1.6)
    assert flips == {True, False}


def test_a_flip_mirrors_the_pixels_and_the_box_exactly():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    data = jpeg(img)
    regions = [region((30, 20, 90, 70)), region((100, 50, 150, 110))]
    transform = RegionTransform(64, min_perc_in_image=0.2)
    seed = next(s for s in range(50) if transform.plan(160, 120, regions, [], random.Random(s)).flip)
    pixels, plan = transform(data, regions, [], random.Random(seed))
    unflipped = to_array(decode_crop(data, 64, lambda w, h: plan.crop))
    np.testing.assert_array_equal(np.asarray(pixels), unflipped[:, ::-1])
    # a flipped copy, not a mirrored view: the batch copies it with one memcpy instead of byte by byte
    assert pixels.flags.c_contiguous
    for target in plan.targets:
        x0, y0, x1, y1 = box_in_crop(visible_part(regions[target.index].box, plan.crop, 0), plan.crop, False)
        assert target.box == (1.0 - x1, y0, 1.0 - x0, y1)


# --------------------------------------------------------------------------------------------- careful flip
def side_captions() -> list[tuple[str, str]]:
    """Captions that name a side: every world language's left/right sentences, and the converters' English."""
    out = []
    for lang in ALL_LANGUAGES:
        g = grammar(lang)
        out += [(lang, g.single("big", "red", "circle", side)) for side in ("left", "right")]
        out.append((lang, g.relation(("red", "circle"), "left_of", ("blue", "star"))))
    out += [
        ("en", "the man on the left"),
        ("en", "Right hand of the player"),
        ("en", "a left-handed pitcher"),
    ]
    return out


@pytest.mark.parametrize("where", ["image caption", "region caption", "attribute"])
def test_a_caption_that_names_a_side_is_never_flipped(where):
    transform = RegionTransform(32)
    for lang, text in side_captions():
        plain = region((10, 10, 50, 50), grammar(lang).thing("red", "circle"), lang)
        if where == "image caption":
            regions, captions = [plain], [(lang, text)]
        elif where == "region caption":
            regions, captions = [plain, region((5, 5, 20, 20), text, lang)], []
        else:
            regions, captions = [region((10, 10, 50, 50), "hand", lang, [(lang, text)])], []
        flips = [transform.plan(64, 64, regions, captions, random.Random(s)).flip for s in range(40)]
        assert not any(flips), (lang, text)


def test_captions_without_a_side_flip_half_the_time_and_an_unlisted_language_never():
    transform = RegionTransform(32)
    regions = [region((10, 10, 50, 50), grammar(lang).thing("red", "circle"), lang) for lang in ALL_LANGUAGES]
    flips = [
        transform.plan(64, 64, regions, [("en", "a bright day")], random.Random(s)).flip for s in range(400)
    ]
    assert 0.4 < sum(flips) / len(flips) < 0.6
    finnish = [region((10, 10, 50, 50), "punainen ympyrä", "fi")]
    assert not any(transform.plan(64, 64, finnish, [], random.Random(s)).flip for s in range(40))
    careless = RegionTransform(32, careful_hflip=False)
    assert any(careless.plan(64, 64, finnish, [], random.Random(s)).flip for s in range(40))


# ------------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("patch", [16, 32, 56], ids=["vit-b-16-grid-14", "swin-final-grid-7", "grid-4"])
def test_a_region_mask_takes_exactly_the_patches_its_box_touches(patch):
    size, grid = 224, 224 // patch
    rng = random.Random(patch)
    boxes = []
    for _ in range(300):
        x0, y0 = rng.randrange(0, size - 1), rng.randrange(0, size - 1)
        boxes.append((x0, y0, rng.randrange(x0 + 1, size + 1), rng.randrange(y0 + 1, size + 1)))
    boxes += [
        (patch, patch, 2 * patch, 3 * patch),
        (0, 0, size, size),
        (patch - 1, 0, patch + 1, 1),
    ]  # borders
    masks = patch_masks(torch.tensor(boxes, dtype=torch.float32) / size, grid, grid)
    assert masks.shape == (len(boxes), 1 + grid * grid) and masks[:, 0].all()
    for box, mask in zip(boxes, masks):
        pixels = np.zeros((size, size), dtype=bool)
        pixels[box[1] : box[3], box[0] : box[2]] = True
        touched = pixels.reshape(grid, patch, grid, patch).any(axis=(1, 3)).reshape(-1)
        np.testing.assert_array_equal(mask[1:].numpy(), touched, err_msg=str(box))


# ------------------------------------------------------------------------------------------------- batches
def example(key: str, fill: int, n_targets: int, whole: bool = False) -> dict:
    targets = [RegionTarget(f"{key}: the whole", "en", WHOLE_IMAGE, True, -1)] if whole else []
    for i in range(n_targets):
        targets.append(RegionTarget(f"{key} region {i}", "en", (0.1 * i, 0.0, 0.1 * i + 0.25, 0.5), False, i))
    return {"image": np.full((8, 8, 3), fill, dtype=np.uint8), "key": key, "targets": tuple(targets)}


def test_a_batch_holds_each_image_once_and_points_every_target_at_its_image():
    examples = [
        example("a", 10, 3, whole=True),
        example("b", 20, 0),
        example("c", 30, 5),
        example("d", 40, 2),
    ]
    batch = collate_regions(examples, batch_size=7, rng=random.Random(0), grid=(2, 2))
    n = len(batch["texts"])
    assert n == 7 and batch["boxes"].shape == (7, 4) and batch["image_atts"].shape == (7, 5)
    fills = batch["images"][:, 0, 0, 0].tolist()
    assert len(fills) == len(set(fills)) and 20 not in fills  # once each; b has no target
    for i in range(n):
        owner = next(e for e in examples if batch["texts"][i] in {t.text for t in e["targets"]})
        assert fills[batch["idx_to_group_img"][i]] == owner["image"][0, 0, 0]
        target = next(t for t in owner["targets"] if t.text == batch["texts"][i])
        assert batch["is_image"][i] == target.is_image and tuple(batch["boxes"][i].tolist()) == pytest.approx(
            target.box
        )
        expected_mask = patch_masks(torch.tensor([target.box]), 2, 2)[0]
        assert batch["image_atts"][i].tolist() == ([True] * 5 if target.is_image else expected_mask.tolist())
    assert len(set(batch["keys"])) == n and len(set(batch["group_ids"].tolist())) == n
    again = collate_regions(examples, batch_size=7, rng=random.Random(0), grid=(2, 2))
    assert again["texts"] == batch["texts"]
    everything = collate_regions(examples, batch_size=11, rng=random.Random(0))
    assert (
        len(everything["texts"]) == 11
        and len(set(everything["keys"])) == 11
        and everything["images"].shape[0] == 3
        and "image_atts" not in everything
    )


@pytest.mark.parametrize("batch_size", [8, 11, 25])
def test_a_batch_short_of_targets_is_filled_to_its_size_with_copies_of_them(batch_size):
    """Every rank's region batch must have one size (the contrastive all-gather): 6 targets fill 8, 11 or 25
    rows, each target once and then copies with its key, group id, text, box, image and mask (the reference's
    padding), each target as often as any other, give or take one."""
    examples = [example("a", 10, 2, whole=True), example("b", 20, 0), example("c", 30, 3)]
    batch = collate_regions(examples, batch_size=batch_size, rng=random.Random(0), grid=(2, 2))
    tensors = ("idx_to_group_img", "group_ids", "boxes", "is_image", "image_atts")
    assert len(batch["texts"]) == batch_size and all(batch[k].shape[0] == batch_size for k in tensors)
    assert batch["images"].shape[0] == 2 and len(set(batch["keys"][:6])) == 6  # every target once, first
    first = {key: i for i, key in reversed(list(enumerate(batch["keys"])))}
    for i, key in enumerate(batch["keys"]):
        j = first[key]  # the original of row i (itself for an original)
        assert batch["texts"][i] == batch["texts"][j] and batch["langs"][i] == batch["langs"][j]
        for name in tensors:
            assert torch.equal(batch[name][i], batch[name][j]), name
    group_sizes = Counter(batch["group_ids"].tolist())
    assert len(group_sizes) == 6 and max(group_sizes.values()) - min(group_sizes.values()) <= 1
    again = collate_regions(examples, batch_size=batch_size, rng=random.Random(0), grid=(2, 2))
    assert again["keys"] == batch["keys"]


def shard_sample(meta, img=None) -> dict:
    img = img or Image.new("RGB", (100, 80), (200, 200, 200))
    return {"__key__": "s1", "jpg": jpeg(img), "json": json.dumps(meta).encode()}


def test_a_region_sample_becomes_an_example_and_bad_regions_are_counted():
    meta = {
        "captions": {"en": ["a grey picture"]},
        "regions": [
            {"box": [10, 10, 60, 50], "captions": {"en": ["a square"], "de": "ein Quadrat"}},
            {"box": [50, 50, 40, 70], "captions": {"en": "backwards"}},
            {"box": [5, 5, 20, 20], "captions": {"xx-unknown": "?"}},
            {"box": [1, 2, 30, 40], "captions": {"de": "nur deutsch"}},
        ],
        "image_size": [100, 80],
    }
    ex = region_example(shard_sample(meta), RegionTransform(32), frozenset({"en"}), random.Random(0))
    assert ex["dropped"] == {"region_bad_box": 1, "region_unknown_language": 1, "region_filtered_language": 1}
    assert ex["image"].shape == (32, 32, 3) and ex["key"] == "s1"
    assert {t.text for t in ex["targets"]} == {"a grey picture", "a square"}
    regions, _ = parse_regions(meta, ANY_LANGUAGE)
    assert [r.captions for r in regions][0] == (("en", "a square"), ("de", "ein Quadrat"))
    for bad, reason in [
        ({"captions": {"en": "x"}}, "missing_regions"),
        ({"regions": [{"box": [0, 0, 0, 5], "captions": {"en": "x"}}]}, "region_bad_box"),
    ]:
        with pytest.raises(SkipSample) as err:
            region_example(shard_sample(bad), RegionTransform(32), ANY_LANGUAGE, random.Random(0))
        assert err.value.reason == reason
    beyond = {"regions": [{"box": [90, 10, 140, 50], "captions": {"en": "x"}}]}
    with pytest.raises(SkipSample, match="region_outside_image"):
        region_example(shard_sample(beyond), RegionTransform(32), ANY_LANGUAGE, random.Random(0))
    with pytest.raises(SkipSample, match="bad_json"):
        region_example(
            {"__key__": "s", "jpg": b"", "json": b"{"}, RegionTransform(32), ANY_LANGUAGE, random.Random(0)
        )


def test_attributes_in_the_captions_language_are_prepended():
    regions = [region((0, 0, 50, 50), "dog", "en", [("en", "brown"), ("de", "braun")])]
    texts = {
        t.text
        for s in range(30)
        for t in RegionTransform(32).plan(64, 64, regions, [], random.Random(s)).targets
    }
    assert texts == {"brown dog"}
    switched = {
        t.text
        for s in range(30)
        for t in RegionTransform(32, code_switch=True).plan(64, 64, regions, [], random.Random(s)).targets
    }
    assert switched == {"brown dog", "braun dog"}  # code switching: an attribute of any language


# --------------------------------------------------------------------------------------------------- config
def test_regions_are_off_by_default_and_configurable_with_checked_values():
    assert from_dict(DataConfig, {}).regions is None
    cfg = load_config(
        PretrainConfig, None, ["data.regions.shards=/r/{000000..000003}.tar", "data.regions.prob=0.5"]
    )
    assert cfg.data.regions.max_regions == 5 and cfg.data.regions.batch_size == 128
    check_regions_config(cfg.data.regions)
    with pytest.raises(ConfigError, match="data.regions.max_region"):
        load_config(PretrainConfig, None, ["data.regions.max_region=3"])
    with pytest.raises(ConfigError, match="data.regions.max_images"):
        load_config(PretrainConfig, None, ["data.regions.max_images=many"])
    for key, value in [
        ("prob", 0.0),
        ("prob", 1.5),
        ("batch_size", 0),
        ("max_regions", 0),
        ("min_perc_in_image", 1.0),
    ]:
        bad = OmegaConf.structured(RegionsConfig(shards="x", **{key: value}))
        with pytest.raises(ConfigError, match=f"data.regions.{key}"):
            check_regions_config(bad)


# ---------------------------------------------------------------------------------------------------- world
def test_the_worlds_boxes_cover_the_drawn_shapes():
    """Each region's box against the pixels of its shapes drawn alone (half-covered pixels count)."""
    rng = random.Random(3)
    size, kinds = 128, Counter()
    for _ in range(60):
        scene = sample_scene(rng)
        entries = scene_regions(scene, ["en"], size)
        assert len(entries) == len(scene.object_counts())
        for (colour, shape), entry in zip(scene.object_counts(), entries):
            items = tuple(i for i in scene.items if (i.colour, i.shape) == (colour, shape))
            alone = np.asarray(render(Scene(scene.kind, items), size), dtype=int)
            full = np.abs(np.array(RGB[colour]) - np.array(BACKGROUND)).sum()
            ys, xs = np.nonzero(np.abs(alone - np.array(BACKGROUND)).sum(axis=2) > full / 2)
            np.testing.assert_allclose(
                (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), entry["box"], atol=1.0
            )
            if len(items) == 1:
                assert entry["box"] == item_box(items[0], size)
            kinds[scene.kind] += 1
    assert min(kinds.values()) >= 5 and len(kinds) == 3


@pytest.mark.parametrize("lang", ALL_LANGUAGES)
def test_every_shape_is_described_in_every_language_and_a_description_says_which(lang):
    rng = random.Random(4)
    g = grammar(lang)
    for scene in (sample_scene(rng) for _ in range(200)):
        descriptions = [r["captions"][lang] for r in scene_regions(scene, ALL_LANGUAGES, 64)]
        assert len(set(descriptions)) == len(descriptions) == len(scene.object_counts())
        for (colour, shape), text in zip(scene.object_counts(), descriptions):
            assert any(word in text for word in g.colour_words(colour))
            assert text == g.thing(colour, shape, scene.size) or scene.kind == "count"
        if scene.kind != "relation":  # a lone shape's description is its caption's noun phrase
            assert descriptions[0] in scene.caption(lang)


def _members(folder) -> list[tuple]:
    out = []
    for url in expand_shards(str(folder)):
        for s in iter_tar_samples(url):
            meta = json.loads(s["json"])
            regions = meta.pop("regions", None)
            out.append((s["__key__"], s.get("jpg"), json.dumps(meta, sort_keys=True), regions))
    return out


def test_regions_on_change_nothing_else_the_world_writes(tmp_path):
    kw = dict(num_images=30, num_parallel=10, heldout_images=6, xvnli_images=5, image_size=24, seed=5)
    off, on = tmp_path / "off", tmp_path / "on"
    build_world(off, **kw)
    world = build_world(on, regions=True, region_langs=["en", "de"], **kw)
    plain, with_regions = _members(off / "image_caption"), _members(on / "image_caption")
    assert [m[:3] for m in plain] == [m[:3] for m in with_regions]  # keys, order, JPEG bytes, captions
    assert all(m[3] is None for m in plain) and sum(bool(m[3]) for m in with_regions) > 10
    assert all(set(r["captions"]) == {"en", "de"} for m in with_regions for r in m[3] or [])
    files = [p.relative_to(off) for p in sorted(off.rglob("*")) if p.is_file() and p.suffix != ".tar"]
    for rel in files:
        if rel.name not in ("manifest.json", "world.json"):  # both hold a creation time
            assert (off / rel).read_bytes() == (on / rel).read_bytes(), rel
    assert _members(off / "parallel") == _members(on / "parallel")
    extra = sorted(
        str(p.relative_to(on))
        for p in on.rglob("*")
        if p.is_file() and not (off / p.relative_to(on)).exists()
    )
    assert extra == sorted(f"heldout/{lang}/grounding.jsonl" for lang in world["heldout_langs"])
    lines = [
        json.loads(x) for x in (on / "heldout/ja/grounding.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert lines and all(
        line["lang"] == "ja" and (on / "heldout/ja" / line["image"]).is_file() for line in lines
    )


def test_world_region_shards_make_region_batches(tmp_path):
    build_world(tmp_path / "w", num_images=24, num_parallel=0, heldout_images=2, xvnli_images=2, image_size=32,
                regions=True, region_langs=["en"])  # fmt: skip
    transform, rng = RegionTransform(32, max_regions=3), random.Random(0)
    examples = [
        region_example(sample, transform, frozenset({"en"}), rng)
        for url in expand_shards(str(tmp_path / "w" / "image_caption"))
        for sample in iter_tar_samples(url)
    ]
    assert len(examples) == 24 and not any(e["dropped"] for e in examples)
    batch = collate_regions(examples, batch_size=32, rng=rng, grid=(4, 4))
    assert len(batch["texts"]) == 32 and batch["images"].shape[1:] == (3, 32, 32)
    regions = batch["image_atts"][~batch["is_image"]]
    assert (
        regions[:, 1:].any(dim=1).all() and not regions[:, 1:].all(dim=1).all()
    )  # some masks leave patches out
