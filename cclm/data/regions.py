"""The region path of multi-grained pretraining (X-VLM, the CCLM-4M setting): building blocks that turn a region
sample (an image-caption sample whose JSON also carries ``regions``, docs/regions.md) into region training
examples, and examples into a region batch.

Per image (reference ``RegionMultiTextDataset.__iter__``), all randomness from the ``random.Random`` passed in:

0. the decoded image must have the sample's recorded ``image_size`` (:func:`check_image_size`), and each box is
   cut to the image, or dropped and counted when it reaches past it further than the converters allow
   (:func:`box_in_image`);
1. one region is drawn and the image is randomly cropped so that the crop holds that whole box
   (:func:`crop_keeping_box`);
2. the crop is flipped horizontally with probability 1/2, but never when any caption of the sample names a side
   ("left", "links", "gauche", "izquierda", "左" ...; :func:`flip_allowed_for` -- the reference checks English
   only, and a caption in a language without a word list is never flipped);
3. the crop is resized to the square input (decoded straight to it, :func:`cclm.data.transforms.decode_crop`)
   and, optionally, photometric RandAugment ops that keep every box where it is (:data:`BOX_SAFE_OPS`, the
   reference's ``box_transform``);
4. up to ``max_regions`` targets: the whole-image caption (if the sample has one; box = the whole image, no box
   loss) and regions in random order whose part inside the crop is more than ``min_perc_in_image`` of the box;
   each keeps that part, in 0..1 coordinates of the (flipped) crop (:func:`box_in_crop`, inverse
   :func:`box_from_crop`), with one of its captions and, where the region has attributes in that language
   (Visual Genome), one of them prepended.

A batch (:func:`collate_regions`, reference ``collate_fn``) holds the images of ``max_images`` examples once and
``batch_size`` of their targets drawn at random, ``idx_to_group_img[i]`` naming the image of target ``i``, so a
region never re-encodes its image. Where the images hold fewer targets than ``batch_size`` the batch is filled
with copies re-drawn from its targets, as the reference does: every rank's batch has the same size, which the
contrastive all-gather of a multi-rank run expects (and the reference needs: its gather blocks otherwise). A copy
has its original's key and group id, and the region view's ITC counts rows of one group as positives, so a copy
is never a negative of its original (in the reference it is).
:func:`patch_masks` gives each target the vision tokens its box touches, on the tower's grid
(:func:`cclm.model.boxes.token_grid`).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from cclm.data.collate import group_id, stack_images
from cclm.data.examples import caption_choices, image_bytes, visible_text
from cclm.data.shards import SKIP_KEY
from cclm.data.skips import SkipSample
from cclm.data.stream import DROPPED_KEY
from cclm.data.transforms import RandAugment, decode_crop, mentions_side, to_array
from cclm.jsonl import lone_surrogate

Box = tuple[float, float, float, float]  # x0, y0, x1, y1
WHOLE_IMAGE: Box = (0.0, 0.0, 1.0, 1.0)
# RandAugment ops that move no pixel (the reference's region transform: RandomAugment(2, 7, augs=...)); each
# commutes with a horizontal flip.
BOX_SAFE_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness")
# The region converters' rule (data_prep/regions/common.py, docs/regions.md), mirrored here: a box may reach this
# many pixels past the decoded image (publishers' rounding) and is cut to it; the recorded ``image_size`` may differ
# from the decoded size by this many pixels.
BOX_TOLERANCE = 1.0
SIZE_TOLERANCE = 1


@dataclass(frozen=True)
class Region:
    box: Box  # pixels of the stored image, xyxy
    captions: tuple[tuple[str, str], ...]  # (lang, text)
    attributes: tuple[tuple[str, str], ...] = ()  # (lang, word), e.g. Visual Genome's "white" for "dog"
    label: str | None = None


@dataclass(frozen=True)
class RegionTarget:
    text: str
    lang: str
    box: Box  # 0..1 in the (flipped) crop, xyxy
    is_image: bool  # the whole-image caption: no box loss, the whole image visible
    index: int  # the region's index in the sample's ``regions`` (-1 for the whole-image caption)


@dataclass(frozen=True)
class RegionPlan:
    crop: tuple[int, int, int, int]  # pixels of the stored image, xyxy
    flip: bool
    targets: tuple[RegionTarget, ...]
    dropped: Counter[str] = field(default_factory=Counter)  # regions left out by the plan, by reason


# ------------------------------------------------------------------------------------------------ parsing
def _valid_box(value) -> Box | None:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        return None
    x0, y0, x1, y1 = (float(v) for v in value)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 and x0 >= 0 and y0 >= 0 else None


def parse_regions(meta: dict, allowed: frozenset[str]) -> tuple[list[Region], Counter[str]]:
    """The usable regions of a sample's JSON and the reasons the others were dropped (``region_bad_box``,
    ``region_missing_caption``, ``region_filtered_language``, ...). Raises SkipSample (``missing_regions``, or
    the first drop reason) when none is usable."""
    raw = meta.get("regions")
    if not isinstance(raw, list) or not raw:
        raise SkipSample("missing_regions", "no 'regions' list")
    regions, dropped = [], Counter()
    for entry in raw:
        entry = entry if isinstance(entry, dict) else {}
        box = _valid_box(entry.get("box"))
        if box is None:
            dropped["region_bad_box"] += 1
            continue
        try:
            captions = caption_choices({"captions": entry.get("captions")}, allowed)
        except SkipSample as err:
            dropped[f"region_{err.reason}"] += 1
            continue
        attributes = entry.get("attributes")
        pairs = [
            (lang, shown)
            for lang, words in (attributes.items() if isinstance(attributes, dict) else ())
            for word in (words if isinstance(words, list) else [words])
            if (shown := visible_text(word))
        ]
        label = entry.get("label") if isinstance(entry.get("label"), str) else None
        regions.append(Region(box, tuple(captions), tuple(pairs), label))
    if not regions:
        reason = next(iter(dropped))
        raise SkipSample(reason, f"none of the {len(raw)} regions is usable")
    return regions, dropped


# ------------------------------------------------------------------------------------------------ geometry
def box_in_image(box: Box, width: int, height: int, tolerance: float = BOX_TOLERANCE) -> Box | None:
    """``box`` cut to a ``width`` x ``height`` image, or None when it reaches further past it than ``tolerance``
    pixels or nothing of it is left (the converters' ``check_box`` rule)."""
    x0, y0, x1, y1 = box
    if x0 < -tolerance or y0 < -tolerance or x1 > width + tolerance or y1 > height + tolerance:
        return None
    cut = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))
    return cut if cut[2] > cut[0] and cut[3] > cut[1] else None


def recorded_size(meta: dict) -> tuple[int, int] | None:
    """A sample's ``image_size`` ``(width, height)``; None when the JSON records none. Raises SkipSample
    (``image_size_mismatch``) when it is there but not two positive numbers."""
    value = meta.get("image_size")
    if value is None:
        return None
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        and min(value) > 0
    ):
        return value[0], value[1]
    raise SkipSample("image_size_mismatch", f"image_size {value!r} is not [width, height]")


def check_image_size(width: int, height: int, recorded: tuple[int, int] | None) -> None:
    """Raises SkipSample (``image_size_mismatch``) when the decoded image's size differs from the recorded one by
    more than :data:`SIZE_TOLERANCE` pixels: its boxes, in the recorded image's pixels, would be wrong."""
    if recorded is not None and (
        abs(width - recorded[0]) > SIZE_TOLERANCE or abs(height - recorded[1]) > SIZE_TOLERANCE
    ):
        raise SkipSample(
            "image_size_mismatch", f"the image is {width}x{height}, its image_size {list(recorded)}"
        )


def crop_keeping_box(width: int, height: int, box: Box, rng: random.Random) -> tuple[int, int, int, int]:
    """A random crop (integer pixels, xyxy) of a ``width`` x ``height`` image that holds all of ``box``: each side
    drawn uniformly between the box's edge and the image's (the reference's draw)."""
    x0, y0, x1, y1 = box
    left = rng.randint(0, math.floor(x0))
    top = rng.randint(0, math.floor(y0))
    right = rng.randint(min(math.ceil(x1), width), width)
    bottom = rng.randint(min(math.ceil(y1), height), height)
    return left, top, right, bottom


def visible_part(box: Box, crop: tuple[int, int, int, int], min_fraction: float) -> Box | None:
    """The part of ``box`` inside ``crop``, or None when it is no more than ``min_fraction`` of the box."""
    x0, y0 = max(box[0], crop[0]), max(box[1], crop[1])
    x1, y1 = min(box[2], crop[2]), min(box[3], crop[3])
    if x1 <= x0 or y1 <= y0:
        return None
    area = (box[2] - box[0]) * (box[3] - box[1])
    return (x0, y0, x1, y1) if (x1 - x0) * (y1 - y0) / area > min_fraction else None


def box_in_crop(box: Box, crop: tuple[int, int, int, int], flip: bool) -> Box:
    """A pixel box inside ``crop`` -> 0..1 coordinates of the crop as the model sees it (resized to the square
    input, mirrored when ``flip``)."""
    width, height = crop[2] - crop[0], crop[3] - crop[1]
    x0, x1 = (box[0] - crop[0]) / width, (box[2] - crop[0]) / width
    y0, y1 = (box[1] - crop[1]) / height, (box[3] - crop[1]) / height
    if flip:
        x0, x1 = 1.0 - x1, 1.0 - x0
    return (x0, y0, x1, y1)


def box_from_crop(box: Box, crop: tuple[int, int, int, int], flip: bool) -> Box:
    """The inverse of :func:`box_in_crop`: a 0..1 box of the model input -> pixels of the stored image."""
    x0, y0, x1, y1 = box
    if flip:
        x0, x1 = 1.0 - x1, 1.0 - x0
    width, height = crop[2] - crop[0], crop[3] - crop[1]
    return (crop[0] + x0 * width, crop[1] + y0 * height, crop[0] + x1 * width, crop[1] + y1 * height)


def flip_allowed_for(texts: Iterable[tuple[str, str]]) -> bool:
    """True when no ``(lang, text)`` names a side; a language without a word list forbids the flip."""
    return all(mentions_side(text, lang) is False for lang, text in texts)


def patch_masks(boxes: torch.Tensor, rows: int, cols: int, eps: float = 1e-6) -> torch.Tensor:
    """[N, 4] 0..1 ``xyxy`` boxes -> [N, 1 + rows * cols] bool: the summary token (always) and, row-major, every
    patch the box overlaps by more than ``eps`` of a patch side (a box edge on a patch border, up to rounding,
    does not take in the next patch); at least one patch per box (the reference's ``get_image_attns``)."""
    col_first = (boxes[:, 0] * cols + eps).floor().clamp(0, cols - 1)
    col_end = torch.maximum(col_first + 1, (boxes[:, 2] * cols - eps).ceil().clamp(max=cols))
    row_first = (boxes[:, 1] * rows + eps).floor().clamp(0, rows - 1)
    row_end = torch.maximum(row_first + 1, (boxes[:, 3] * rows - eps).ceil().clamp(max=rows))
    c = torch.arange(cols, device=boxes.device, dtype=boxes.dtype)
    r = torch.arange(rows, device=boxes.device, dtype=boxes.dtype)
    in_cols = (c >= col_first[:, None]) & (c < col_end[:, None])
    in_rows = (r >= row_first[:, None]) & (r < row_end[:, None])
    patches = (in_rows[:, :, None] & in_cols[:, None, :]).flatten(1)
    return torch.cat([patches.new_ones(len(boxes), 1), patches], dim=1)


# ---------------------------------------------------------------------------------------------- transform
class RegionTransform:
    """One region sample -> the crop's pixels (``size`` x ``size`` uint8 HWC) and its :class:`RegionPlan`.
    ``randaugment``: applied to the resized crop; only ops that move no pixel keep the boxes right (a
    :class:`~cclm.data.transforms.RandAugment` over :data:`BOX_SAFE_OPS`). ``code_switch``: a region's
    attribute is drawn from every language it has, not only the caption's (the reference's ``code_switch``)."""

    def __init__(
        self,
        size: int,
        max_regions: int = 5,
        min_perc_in_image: float = 0.5,
        hflip: bool = True,
        careful_hflip: bool = True,
        image_caption: bool = True,
        randaugment: RandAugment | None = None,
        code_switch: bool = False,
    ):
        if max_regions < 1:
            raise ValueError(f"max_regions must be >= 1, got {max_regions}")
        if not 0 <= min_perc_in_image < 1:
            raise ValueError(f"min_perc_in_image must be in [0, 1), got {min_perc_in_image}")
        self.size, self.max_regions, self.min_perc_in_image = size, max_regions, min_perc_in_image
        self.hflip, self.careful_hflip, self.image_caption = hflip, careful_hflip, image_caption
        if randaugment is not None and set(randaugment.op_names) - set(BOX_SAFE_OPS):
            moving = sorted(set(randaugment.op_names) - set(BOX_SAFE_OPS))
            raise ValueError(f"RegionTransform: RandAugment ops {moving} move pixels away from their boxes")
        self.randaugment, self.code_switch = randaugment, code_switch

    def plan(
        self,
        width: int,
        height: int,
        regions: list[Region],
        image_captions: list[tuple[str, str]],
        rng: random.Random,
    ) -> RegionPlan:
        inside, dropped = [], Counter()
        for i, region in enumerate(regions):
            box = box_in_image(region.box, width, height)
            if box is None:
                dropped["region_outside_image"] += 1
            else:
                inside.append((i, region if box == region.box else replace(region, box=box)))
        if not inside:
            raise SkipSample("region_outside_image", f"no region box inside the {width}x{height} image")
        crop = crop_keeping_box(width, height, inside[rng.randrange(len(inside))][1].box, rng)
        flip = self.hflip and rng.random() < 0.5
        if flip and self.careful_hflip:
            texts = [*image_captions]
            for region in regions:
                texts += [*region.captions, *region.attributes]
            flip = flip_allowed_for(texts)
        targets: list[RegionTarget] = []
        if self.image_caption and image_captions:
            lang, text = image_captions[rng.randrange(len(image_captions))]
            targets.append(RegionTarget(text, lang, WHOLE_IMAGE, True, -1))
        for index, region in rng.sample(inside, len(inside)):
            if len(targets) >= self.max_regions:
                break
            part = visible_part(region.box, crop, self.min_perc_in_image)
            if part is None:
                continue
            lang, text = region.captions[rng.randrange(len(region.captions))]
            words = [word for code, word in region.attributes if self.code_switch or code == lang]
            if words:
                text = f"{words[rng.randrange(len(words))]} {text}"
            targets.append(RegionTarget(text, lang, box_in_crop(part, crop, flip), False, index))
        return RegionPlan(crop, flip, tuple(targets), dropped)

    def __call__(
        self,
        data: bytes,
        regions: list[Region],
        image_captions: list[tuple[str, str]],
        rng: random.Random,
        image_size: tuple[int, int] | None = None,
    ) -> tuple[np.ndarray, RegionPlan]:
        """``image_size``: the size the boxes are in (the sample's recorded ``image_size``); a decoded image of
        another size raises SkipSample (:func:`check_image_size`)."""
        plans: list[RegionPlan] = []

        def choose_crop(width: int, height: int) -> tuple[int, int, int, int]:
            check_image_size(width, height, image_size)
            plans.append(self.plan(width, height, regions, image_captions, rng))
            return plans[0].crop

        image = decode_crop(data, self.size, choose_crop)
        if self.randaugment is not None:
            image = self.randaugment(image, rng)
        if plans[0].flip:  # a PIL transpose, not a mirrored numpy view (see cclm.data.transforms: Memory)
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_array(image), plans[0]


def region_example(
    sample: dict, transform: RegionTransform, allowed: frozenset[str], rng: random.Random
) -> dict:
    """A raw shard sample -> ``{"image", "key", "targets", "dropped"}`` (``dropped``, the stream's
    :data:`~cclm.data.stream.DROPPED_KEY`: regions left out, by reason, for the stream's skip counts); any
    problem with the sample raises :class:`SkipSample`."""
    if SKIP_KEY in sample:
        raise SkipSample(sample[SKIP_KEY], sample.get("detail", ""))
    try:
        meta = json.loads(sample["json"]) if "json" in sample else None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SkipSample("bad_json", f"{sample['__key__']}: {err}") from None
    if not isinstance(meta, dict):
        raise SkipSample("missing_regions", f"{sample['__key__']} has no JSON object")
    surrogate = lone_surrogate(sample["json"], meta)
    if surrogate:
        raise SkipSample("bad_json", f"{sample['__key__']}: {surrogate}")
    regions, dropped = parse_regions(meta, allowed)
    try:
        image_captions = caption_choices(meta, allowed) if meta.get("captions") else []
    except SkipSample:
        image_captions = []
    data = image_bytes(sample)
    try:
        pixels, plan = transform(data, regions, image_captions, rng, recorded_size(meta))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise SkipSample("bad_image", f"{sample['__key__']}: {type(err).__name__}: {err}") from None
    except SkipSample as err:
        raise SkipSample(err.reason, f"{sample['__key__']}: {err.detail}") from None
    dropped.update(plan.dropped)
    return {"image": pixels, "key": sample["__key__"], "targets": plan.targets, DROPPED_KEY: dropped}


# ---------------------------------------------------------------------------------------------------- batch
def target_key(image_key: str, target: RegionTarget) -> str:
    """Equal keys are the same pairing (the contrastive positives): an image's whole-image caption, or a region."""
    return image_key if target.is_image else f"{image_key}#r{target.index}"


def fill_to(count: int, size: int, rng: random.Random) -> list[int]:
    """Indices of ``size`` rows made of ``count`` < ``size`` targets: each target once, then copies, in order,
    each target ``size // count`` or one more times, those with one more drawn at random (the reference's
    padding: ``random.sample`` of the targets when that is enough, the list repeated otherwise)."""
    repeats, extra = divmod(size, count)
    return list(range(count)) * repeats + sorted(rng.sample(range(count), extra))


def collate_regions(
    examples: list[dict], batch_size: int, rng: random.Random, grid: tuple[int, int] | None = None
) -> dict:
    """Examples of :func:`region_example` -> a region batch: ``images`` [M,3,H,W] uint8 (each image once, only
    those with a kept target), ``idx_to_group_img`` [N] long, ``texts``/``langs``/``keys`` (N each),
    ``group_ids`` [N] long (:func:`target_key` hashed), ``boxes`` [N,4] float 0..1 ``xyxy``, ``is_image`` [N]
    bool and, with ``grid`` = (rows, cols), ``image_atts`` [N, 1 + rows * cols] bool (:func:`patch_masks`; all
    tokens for a whole-image caption). N = ``batch_size`` always: targets drawn at random when the examples hold
    more, every target and then copies re-drawn from them when they hold fewer (:func:`fill_to`)."""
    if batch_size < 1:
        raise ValueError(f"collate_regions: batch_size must be >= 1, got {batch_size}")
    flat = [(i, t) for i, example in enumerate(examples) for t in example["targets"]]
    if not flat:
        raise ValueError("collate_regions: the examples hold no target")
    if len(flat) > batch_size:
        flat = [flat[k] for k in sorted(rng.sample(range(len(flat)), batch_size))]
    elif len(flat) < batch_size:
        flat = [flat[k] for k in fill_to(len(flat), batch_size, rng)]
    used = sorted({i for i, _ in flat})
    position = {i: n for n, i in enumerate(used)}
    keys = [target_key(examples[i]["key"], t) for i, t in flat]
    batch = {
        "images": stack_images([examples[i]["image"] for i in used]),
        "idx_to_group_img": torch.tensor([position[i] for i, _ in flat], dtype=torch.long),
        "texts": [t.text for _, t in flat],
        "langs": [t.lang for _, t in flat],
        "keys": keys,
        "group_ids": torch.tensor([group_id(k) for k in keys], dtype=torch.long),
        "boxes": torch.tensor([t.box for _, t in flat], dtype=torch.float32),
        "is_image": torch.tensor([t.is_image for _, t in flat], dtype=torch.bool),
    }
    if grid is not None:
        masks = patch_masks(batch["boxes"], *grid)
        masks[batch["is_image"]] = True
        batch["image_atts"] = masks
    return batch
