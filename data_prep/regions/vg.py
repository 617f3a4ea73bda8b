"""``cclm prep vg-regions``: Visual Genome objects and region descriptions as region shards (the reference's
``vg_object`` and ``vg_region`` data).

Input, as Visual Genome releases them (v1.2 - v1.4):

* ``image_data.json``: ``[{"image_id", "width", "height", "url": ".../VG_100K_2/1.jpg", ...}]``;
* ``objects.json`` (or ``attributes.json``, the same layout with ``attributes``): ``[{"image_id" (or "id"),
  "objects": [{"x", "y", "w", "h", "names": [...], "attributes": [...]?}]}]`` -- each object a region captioned
  with its names, ``label`` its first name, attributes kept (the region path prepends one, as the reference);
* ``region_descriptions.json``: ``[{"id", "regions": [{"image_id", "x", "y", "width", "height", "phrase"}]}]`` --
  each region captioned with its phrase.

Given both, objects and descriptions of an image go into one sample (convert them separately to keep the
reference's two datasets apart). Images are looked up under ``--image-root`` as ``<folder>/<file>`` from the URL
(``VG_100K_2/1.jpg``), then ``<file>``, ``VG_100K/<file>``, ``VG_100K_2/<file>``.
"""

from __future__ import annotations

from pathlib import Path

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

FOLDERS = ("", "VG_100K", "VG_100K_2")


def _entries(data, path, inner: str) -> list[dict]:
    if not isinstance(data, list):
        raise layout_error(path, f"a JSON list of images, each with an {inner!r} list")
    return [e for e in data if isinstance(e, dict)]


def _image_path(root: Path, image_id, url) -> Path:
    parts = str(url).rstrip("/").split("/") if isinstance(url, str) and url else []
    name = parts[-1] if parts else f"{image_id}.jpg"
    candidates = [root / parts[-2] / name] if len(parts) >= 2 else []
    candidates += [root / folder / name for folder in FOLDERS]
    return next((c for c in candidates if c.is_file()), candidates[0])


def _images(path, root: Path) -> dict:
    images, keys = {}, SampleKeys()
    for entry in _entries(load_json(path, "--image-data"), path, "image_id"):
        try:
            image_id, width, height = entry["image_id"], int(entry["width"]), int(entry["height"])
        except (KeyError, TypeError, ValueError, OverflowError):
            raise layout_error(path, f"images need image_id, width, height: {str(entry)[:120]}") from None
        check_new_image(images, image_id, path, "image_id")
        where = _image_path(root, image_id, entry.get("url"))
        images[image_id] = RegionImage(keys(f"vg_{image_id}"), str(where), width, height)
    return images


def _add_objects(path, images: dict, writer: SplitWriter, tolerance: float) -> None:
    for entry in _entries(load_json(path, "--objects"), path, "objects"):
        image = images.get(record_id(entry.get("image_id", entry.get("id"))))
        objects = entry.get("objects") if isinstance(entry.get("objects"), list) else []
        for obj in objects:
            obj = obj if isinstance(obj, dict) else {}
            if image is None:
                writer.skip("region_unknown_image")
                continue
            names = obj.get("names") if isinstance(obj.get("names"), list) else [obj.get("name")]
            box = xywh_box(obj.get("x"), obj.get("y"), obj.get("w"), obj.get("h"))
            label = next((n.strip() for n in names if isinstance(n, str) and n.strip()), None)
            attributes = obj.get("attributes") if isinstance(obj.get("attributes"), list) else None
            add_region(image, box, names, writer, tolerance, label=label, attributes=attributes)


def _add_descriptions(path, images: dict, writer: SplitWriter, tolerance: float) -> None:
    for entry in _entries(load_json(path, "--regions"), path, "regions"):
        regions = entry.get("regions") if isinstance(entry.get("regions"), list) else []
        for region in regions:
            region = region if isinstance(region, dict) else {}
            image = images.get(record_id(region.get("image_id", entry.get("id"))))
            if image is None:
                writer.skip("region_unknown_image")
                continue
            box = xywh_box(region.get("x"), region.get("y"), region.get("width"), region.get("height"))
            add_region(image, box, [region.get("phrase")], writer, tolerance)


def run(args) -> int:
    if not (args.objects or args.regions):
        raise ValueError("give --objects, --regions or both")
    root = Path(args.image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"--image-root {root} is not a folder")
    images = _images(args.image_data, root)
    with SplitWriter(args, VIEW_IMAGE_CAPTION) as writer:
        if args.objects:
            _add_objects(args.objects, images, writer, args.box_tolerance)
        if args.regions:
            _add_descriptions(args.regions, images, writer, args.box_tolerance)
        return write_region_images(list(images.values()), writer, args, "vg-regions")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "vg-regions", help="region shards from Visual Genome objects and/or region descriptions"
    )
    p.add_argument("--image-data", required=True, help="Visual Genome image_data.json")
    p.add_argument("--objects", default="", help="objects.json or attributes.json")
    p.add_argument("--regions", default="", help="region_descriptions.json")
    p.add_argument(
        "--image-root", required=True, help="folder holding VG_100K/ and VG_100K_2/ (or the images)"
    )
    add_region_options(p)
    add_output_options(p, images=True)
    p.set_defaults(run=run)
