"""``cclm prep coco-regions``: COCO object boxes as region shards (the reference's ``coco_object`` data).

Input: COCO's released ``instances_<split>.json`` (``images``: ``id, file_name, width, height``; ``annotations``:
``image_id, category_id, bbox = [x, y, width, height]`` in pixels, ``iscrowd``; ``categories``: ``id, name``),
the image folder (``train2017/``), and optionally ``captions_<split>.json`` for whole-image captions. Each object
becomes a region captioned with its category name in English (``label`` = the name). Crowd annotations (one box
around many objects) are skipped unless ``--keep-crowd``.
"""

from __future__ import annotations

from pathlib import Path

from cclm.data.examples import visible_text
from cclm.data.shards import VIEW_IMAGE_CAPTION
from data_prep.common import SampleKeys, SplitWriter, add_output_options
from data_prep.regions.common import (
    RegionImage,
    add_region,
    add_region_options,
    check_new_image,
    layout_error,
    load_json,
    record_id,
    write_region_images,
    xywh_box,
)

LAYOUT = "a JSON object with 'images', 'annotations' and 'categories' lists (COCO instances_*.json)"


def _records(data: dict, name: str, path) -> list[dict]:
    value = data.get(name) if isinstance(data, dict) else None
    if not isinstance(value, list):
        raise layout_error(path, LAYOUT)
    return [r for r in value if isinstance(r, dict)]


def _images(data: dict, root: Path, path) -> dict:
    images, keys = {}, SampleKeys()
    for record in _records(data, "images", path):
        try:
            image_id, name = record["id"], str(record["file_name"])
            width, height = int(record["width"]), int(record["height"])
        except (KeyError, TypeError, ValueError, OverflowError):
            raise layout_error(
                path, f"images need id, file_name, width, height: {str(record)[:120]}"
            ) from None
        check_new_image(images, image_id, path, "image id")
        images[image_id] = RegionImage(keys(f"coco_{image_id}"), str(root / name), width, height)
    return images


def run(args) -> int:
    root = Path(args.image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"--image-root {root} is not a folder")
    data = load_json(args.instances, "--instances")
    images = _images(data, root, args.instances)
    categories = {record_id(c.get("id")): c.get("name") for c in _records(data, "categories", args.instances)}
    categories.pop(None, None)  # a category whose id is no id is never named
    captions = load_json(args.captions, "--captions") if args.captions else None
    with SplitWriter(args, VIEW_IMAGE_CAPTION) as writer:
        for ann in _records(data, "annotations", args.instances):
            image = images.get(record_id(ann.get("image_id")))
            name = categories.get(record_id(ann.get("category_id")))
            if image is None:
                writer.skip("region_unknown_image")
            elif not isinstance(name, str):
                writer.skip("region_unknown_category")
            elif ann.get("iscrowd") and not args.keep_crowd:
                writer.skip("region_crowd")
            else:
                box = (
                    xywh_box(*ann["bbox"])
                    if isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4
                    else None
                )
                add_region(image, box, [name], writer, args.box_tolerance, label=name)
        if captions is not None:
            for ann in _records(captions, "annotations", args.captions):
                image = images.get(record_id(ann.get("image_id")))
                text = ann.get("caption")
                if image is None:
                    writer.skip("caption_unknown_image")
                elif not writer.allowed_language("en"):
                    writer.skip("caption_filtered_language")
                elif not visible_text(text):
                    writer.skip("caption_empty")
                else:
                    image.captions.setdefault("en", []).append(visible_text(text))
        return write_region_images(list(images.values()), writer, args, "coco-regions")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("coco-regions", help="region shards from COCO instances (object boxes)")
    p.add_argument("--instances", required=True, help="COCO instances_<split>.json")
    p.add_argument("--image-root", required=True, help="folder of the split's images (e.g. train2017/)")
    p.add_argument(
        "--captions", default="", help="COCO captions_<split>.json: whole-image captions (optional)"
    )
    p.add_argument("--keep-crowd", action="store_true", help="keep crowd annotations (iscrowd=1)")
    add_region_options(p)
    add_output_options(p, images=True)
    p.set_defaults(run=run)
