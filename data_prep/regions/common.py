"""What the region converters share: reading a publisher's JSON file, checking a box against its image, region
entries, and writing region samples with :class:`data_prep.common.SplitWriter` (its counting, splitting,
de-duplication and atomic publishing).

A region sample is an image-caption sample whose JSON also carries ``regions`` and ``image_size`` (docs/regions.md)::

    {"captions": {"en": ["..."]},            # whole-image captions, may be empty
     "regions": [{"box": [x0, y0, x1, y1],   # pixels of the stored image, corners (not x, y, w, h)
                  "captions": {"en": ["dog"]}, "label": "dog", "attributes": {"en": ["brown"]}}, ...],
     "image_size": [width, height]}          # of the stored image

Skips are counted by reason: whole samples (``missing_image``, ``bad_image``, ``image_size_mismatch``,
``no_region``) and single regions (``region_outside_image``, ``region_degenerate_box``, ``region_bad_box``,
``region_empty_caption``, ``region_filtered_language``, ``region_unknown_image`` and each converter's own).
"""

from __future__ import annotations

import functools
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from cclm.errors import DataError
from data_prep.common import SplitWriter, content_hash, require_file
from data_prep.image_caption import encode_image
from data_prep.workers import ordered_map

# A box may reach this many pixels past the image (the publishers' rounding: COCO's float boxes end up to ~1 px
# outside) and is then cut to the image; one reaching further is skipped.
BOX_TOLERANCE = 1.0
SIZE_TOLERANCE = 1  # pixels between the size a publisher's JSON gives and the image file's


def add_region_options(parser) -> None:
    parser.add_argument(
        "--box-tolerance",
        type=float,
        default=BOX_TOLERANCE,
        help=f"pixels a box may reach past the image before it is skipped (default {BOX_TOLERANCE})",
    )


def load_json(path: str | Path, what: str):
    """A publisher's JSON file, or a :class:`DataError` naming it."""
    path = require_file(path, what)
    try:
        with open(path, "rb") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{what} file {path} is not valid JSON: {err}") from None


def layout_error(path: str | Path, expected: str) -> DataError:
    return DataError(f"{path} does not have the expected layout: {expected}")


def xywh_box(x, y, w, h) -> list[float] | None:
    """Corners of an ``x, y, width, height`` box (COCO, Visual Genome); None when a value is not a number."""
    values = (x, y, w, h)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    return [float(x), float(y), float(x) + float(w), float(y) + float(h)]


def check_box(
    box: list[float] | None, width: int, height: int, tolerance: float
) -> tuple[list[float] | None, str]:
    """(the box cut to the image and rounded to 1/100 px, "") or (None, the reason it is skipped)."""
    if box is None or not all(math.isfinite(v) for v in box):
        return None, "region_bad_box"
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        return None, "region_degenerate_box"
    if x0 < -tolerance or y0 < -tolerance or x1 > width + tolerance or y1 > height + tolerance:
        return None, "region_outside_image"
    cut = [round(min(max(x0, 0.0), width), 2), round(min(max(y0, 0.0), height), 2)]
    cut += [round(min(max(x1, 0.0), width), 2), round(min(max(y1, 0.0), height), 2)]
    if cut[2] <= cut[0] or cut[3] <= cut[1]:
        return None, "region_degenerate_box"
    return cut, ""


def record_id(value):
    """An annotation's id as a dictionary key: an int or a string; anything else (a list, a float, null) is no id
    and reads as None, so the record counts as naming an unknown image or category."""
    return value if isinstance(value, (int, str)) and not isinstance(value, bool) else None


def check_new_image(images: dict, image_id, path, what: str) -> None:
    """Refuse an image record whose id is no id or repeats one: a repeated id would put one image's boxes on
    the other's pixels."""
    if record_id(image_id) is None:
        raise DataError(f"{path}: {what} {image_id!r} is not an id (an integer or a string)")
    if image_id in images:
        raise DataError(f"{path}: {what} {image_id!r} appears twice; each image needs its own id")


@dataclass
class RegionImage:
    """One image to write: where it is, the size its annotations are in, its regions and whole-image captions."""

    key: str
    path: str
    width: int
    height: int
    regions: list[dict] = field(default_factory=list)
    captions: dict[str, list[str]] = field(default_factory=dict)


def add_region(
    image: RegionImage,
    box: list[float] | None,
    texts: list,
    writer: SplitWriter,
    tolerance: float,
    lang: str = "en",
    label: str | None = None,
    attributes: list | None = None,
) -> None:
    """Append a region to ``image`` or count why it is skipped."""
    cut, reason = check_box(box, image.width, image.height, tolerance)
    if cut is None:
        writer.skip(reason)
        return
    if not writer.allowed_language(lang):
        writer.skip("region_filtered_language")
        return
    captions = list(dict.fromkeys(t.strip() for t in texts if isinstance(t, str) and t.strip()))
    if not captions:
        writer.skip("region_empty_caption")
        return
    entry: dict = {"box": cut, "captions": {lang: captions}}
    if label:
        entry["label"] = label
    words = [a.strip() for a in attributes or [] if isinstance(a, str) and a.strip()]
    if words:
        entry["attributes"] = {lang: list(dict.fromkeys(words))}
    image.regions.append(entry)


def _prepare(image: RegionImage, max_side: int, quality: int):
    """Worker: -> (image, jpeg bytes | None, stored (width, height) | None, skip reason | None)."""
    try:
        data = Path(image.path).read_bytes()
    except OSError:
        return image, None, None, "missing_image"
    try:
        original = Image.open(io.BytesIO(data)).size
        jpeg = encode_image(data, max_side, quality, upright=False)
        stored = Image.open(io.BytesIO(jpeg)).size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return image, None, None, "bad_image"
    if abs(original[0] - image.width) > SIZE_TOLERANCE or abs(original[1] - image.height) > SIZE_TOLERANCE:
        return image, None, None, "image_size_mismatch"
    return image, jpeg, stored, None


def _scaled(regions: list[dict], sx: float, sy: float) -> list[dict]:
    if sx == 1 and sy == 1:
        return regions
    out = []
    for region in regions:
        x0, y0, x1, y1 = region["box"]
        out.append(
            {**region, "box": [round(x0 * sx, 2), round(y0 * sy, 2), round(x1 * sx, 2), round(y1 * sy, 2)]}
        )
    return out


def write_region_images(images: list[RegionImage], writer: SplitWriter, args, desc: str) -> int:
    """Encode and write every image with at least one region (the others are counted as ``no_region``), close
    the writer and print its summary. Boxes follow the image when ``--max-side`` shrinks it."""
    usable = []
    for image in images:
        if image.regions:
            usable.append(image)
        else:
            writer.skip("no_region")
    prepare = functools.partial(_prepare, max_side=args.max_side, quality=args.jpeg_quality)
    for image, jpeg, stored, reason in ordered_map(
        prepare, usable, args.num_workers, len(usable), not args.no_progress, desc, unit="image"
    ):
        if reason:
            writer.skip(reason, detail=f"{image.key}: {image.path}")
            continue
        meta = {
            "captions": image.captions,
            "regions": _scaled(image.regions, stored[0] / image.width, stored[1] / image.height),
            "image_size": list(stored),
        }
        languages = sorted({*image.captions, *(lang for r in meta["regions"] for lang in r["captions"])})
        writer.write(
            image.key,
            {"jpg": jpeg, "json": json.dumps(meta, ensure_ascii=False).encode()},
            languages,
            content_hash(jpeg, meta),
        )
    manifests = writer.close()
    print(writer.summary(manifests))
    return 0
