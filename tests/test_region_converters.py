"""``cclm prep coco-regions`` and ``cclm prep vg-regions`` on small files in each publisher's layout: the samples
and regions written (boxes on the drawn objects, also after ``--max-side`` shrinks an image), every skip counted
by reason, the samples readable by the region path, nothing published when a conversion fails part-way, and
clear errors for bad input."""

from __future__ import annotations

import errno
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import data_prep.regions.vg
from cclm.cli import main as cclm_main
from cclm.data.regions import RegionTransform, region_example
from cclm.data.shards import ShardSink, expand_shards, iter_tar_samples

RED = (220, 20, 20)


def prep(*args) -> int:
    return cclm_main(["prep", *map(str, args), "--no-progress"])


def picture(path: Path, size: tuple[int, int], box=None) -> None:
    """A grey JPEG with a red rectangle filling the pixel box (x0, y0, x1, y1)."""
    img = Image.new("RGB", size, (200, 200, 200))
    if box:
        ImageDraw.Draw(img).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=RED)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=95)


def samples(folder: Path) -> dict[str, dict]:
    return {
        s["__key__"]: {**s, "meta": json.loads(s["json"])}
        for url in expand_shards(str(folder))
        for s in iter_tar_samples(url)
    }


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def red_extent(jpeg: bytes) -> list[int]:
    import io

    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=int)
    ys, xs = np.nonzero(np.abs(pixels - np.array(RED)).sum(axis=2) < 100)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


# ------------------------------------------------------------------------------------------------------ COCO
def coco_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = tmp_path / "train2017"
    picture(root / "000000000001.jpg", (100, 80), (10, 20, 50, 60))
    picture(root / "000000000004.jpg", (200, 160), (40, 40, 120, 100))  # shrunk to 100 x 80 by --max-side
    picture(root / "000000000005.jpg", (90, 90))  # the JSON says 100 x 80
    picture(root / "000000000003.jpg", (100, 80))
    image = {"license": 1, "coco_url": "", "date_captured": "2013-11-14 17:02:52", "flickr_url": ""}
    images = [
        {**image, "id": 1, "file_name": "000000000001.jpg", "width": 100, "height": 80},
        {**image, "id": 2, "file_name": "000000000002.jpg", "width": 100, "height": 80},  # no file
        {**image, "id": 3, "file_name": "000000000003.jpg", "width": 100, "height": 80},  # no annotation
        {**image, "id": 4, "file_name": "000000000004.jpg", "width": 200, "height": 160},
        {**image, "id": 5, "file_name": "000000000005.jpg", "width": 100, "height": 80},
    ]

    def ann(i, image_id, bbox, category=18, crowd=0):
        return {"id": i, "image_id": image_id, "category_id": category, "bbox": bbox, "area": 1.0,
                "iscrowd": crowd, "segmentation": [[0, 0, 1, 1, 1, 0]]}  # fmt: skip

    annotations = [
        ann(1, 1, [10.0, 20.0, 40.0, 40.0]),
        ann(2, 1, [60.3, 10.0, 40.5, 30.0], category=1),  # 0.8 px past the right edge: cut to it
        ann(3, 1, [70.0, 10.0, 45.0, 30.0]),  # 15 px past it
        ann(4, 1, [5.0, 5.0, 0.0, 10.0]),  # no width
        ann(5, 1, [0.0, 0.0, 100.0, 80.0], crowd=1),
        ann(6, 1, [1.0, 1.0, 5.0, 5.0], category=999),
        ann(7, 2, [1.0, 1.0, 5.0, 5.0]),
        ann(8, 4, [40.0, 40.0, 80.0, 60.0]),
        ann(9, 5, [1.0, 1.0, 5.0, 5.0]),
        ann(10, 77, [1.0, 1.0, 5.0, 5.0]),
    ]
    categories = [
        {"supercategory": "animal", "id": 18, "name": "dog"},
        {"supercategory": "person", "id": 1, "name": "person"},
    ]
    instances = tmp_path / "instances_train2017.json"
    info = {"description": "COCO 2017 Dataset", "version": "1.0", "year": 2017}
    instances.write_text(json.dumps({"info": info, "licenses": [], "images": images, "annotations": annotations,
                                     "categories": categories}))  # fmt: skip
    captions = tmp_path / "captions_train2017.json"
    caption_anns = [
        {"image_id": 1, "id": 1, "caption": "A dog standing on grass. "},
        {"image_id": 4, "id": 2, "caption": "A red box."},
        {"image_id": 42, "id": 3, "caption": "No such image."},
    ]
    captions.write_text(
        json.dumps({"info": info, "licenses": [], "images": images, "annotations": caption_anns})
    )
    return instances, captions, root


def test_coco_instances_become_region_samples_with_every_skip_counted(tmp_path, capsys):
    instances, captions, root = coco_files(tmp_path)
    out = tmp_path / "out"
    assert prep("coco-regions", "--instances", instances, "--captions", captions, "--image-root", root,
                "--out", out, "--max-side", 100) == 0  # fmt: skip
    written = samples(out)
    assert sorted(written) == ["coco_1", "coco_4"]
    one, four = written["coco_1"]["meta"], written["coco_4"]["meta"]
    assert one["captions"] == {"en": ["A dog standing on grass."]} and one["image_size"] == [100, 80]
    assert one["regions"] == [
        {"box": [10.0, 20.0, 50.0, 60.0], "captions": {"en": ["dog"]}, "label": "dog"},
        {"box": [60.3, 10.0, 100.0, 40.0], "captions": {"en": ["person"]}, "label": "person"},
    ]
    assert four["image_size"] == [100, 80] and four["regions"][0]["box"] == [20.0, 20.0, 60.0, 50.0]
    for sample in written.values():  # the box is where the red object is, in the stored image
        box = sample["meta"]["regions"][0]["box"]
        np.testing.assert_allclose(red_extent(sample["jpg"]), box, atol=1)
    m = manifest(out)
    assert m["samples"] == 2 and m["languages"] == {"en": 2}
    assert m["skipped"] == {
        "caption_unknown_image": 1,
        "image_size_mismatch": 1,
        "missing_image": 1,
        "no_region": 1,
        "region_crowd": 1,
        "region_degenerate_box": 1,
        "region_outside_image": 1,
        "region_unknown_category": 1,
        "region_unknown_image": 1,
    }
    assert "wrote train: 2 samples" in capsys.readouterr().out
    sample = next(iter_tar_samples(next(iter(expand_shards(str(out))))))
    example = region_example(sample, RegionTransform(32), frozenset(), random.Random(0))
    assert {t.text for t in example["targets"]} <= {"A dog standing on grass.", "dog", "person"}


def test_coco_keep_crowd_and_the_language_filter(tmp_path):
    instances, _, root = coco_files(tmp_path)
    assert prep("coco-regions", "--instances", instances, "--image-root", root, "--out", tmp_path / "crowd",
                "--keep-crowd", "--max-side", 100) == 0  # fmt: skip
    assert len(samples(tmp_path / "crowd")["coco_1"]["meta"]["regions"]) == 3
    assert prep("coco-regions", "--instances", instances, "--image-root", root, "--out", tmp_path / "de",
                "--languages", "de") == 0  # fmt: skip
    m = manifest(tmp_path / "de")
    assert (
        m["samples"] == 0 and m["skipped"]["region_filtered_language"] == 5 and m["skipped"]["no_region"] == 5
    )


# -------------------------------------------------------------------------------------------- Visual Genome
def vg_files(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    root = tmp_path / "vg"
    picture(root / "VG_100K_2" / "1.jpg", (120, 90), (20, 10, 70, 60))
    picture(root / "VG_100K" / "2.jpg", (80, 80), (0, 0, 40, 40))
    base = "https://cs.stanford.edu/people/rak248"
    image_data = [
        {"width": 120, "url": f"{base}/VG_100K_2/1.jpg", "height": 90, "image_id": 1, "coco_id": None, "flickr_id": None},
        {"width": 80, "url": f"{base}/VG_100K/2.jpg", "height": 80, "image_id": 2, "coco_id": 9, "flickr_id": None},
        {"width": 80, "url": f"{base}/VG_100K/3.jpg", "height": 80, "image_id": 3, "coco_id": None, "flickr_id": None},
    ]  # fmt: skip

    def obj(i, x, y, w, h, names, **extra):
        return {
            "object_id": i,
            "x": x,
            "y": y,
            "w": w,
            "h": h,
            "names": names,
            "synsets": ["dog.n.01"],
            **extra,
        }

    objects = [
        {"image_id": 1, "image_url": image_data[0]["url"], "objects": [
            obj(1, 20, 10, 50, 50, ["dog", "puppy"], attributes=["brown", " "]),
            obj(2, 100, 80, 30, 30, ["ball"]),  # past the corner
            obj(3, 5, 5, 0, 4, ["line"]),
        ]},
        {"id": 2, "objects": [obj(4, 0, 0, 40, 40, ["box"]), obj(5, 1, 1, 3, 3, [""])]},  # v1.0: "id"
        {"image_id": 3, "objects": [obj(6, 1, 1, 3, 3, ["cat"])]},  # no image file
        {"image_id": 99, "objects": [obj(7, 1, 1, 3, 3, ["cat"])]},
    ]  # fmt: skip
    regions = [
        {"id": 1, "regions": [
            {"region_id": 11, "width": 50, "height": 50, "image_id": 1, "phrase": "a brown dog on the left", "y": 10, "x": 20},
            {"region_id": 12, "width": 10, "height": 10, "image_id": 1, "phrase": "", "y": 1, "x": 1},
            {"region_id": 13, "width": 10, "height": 200, "image_id": 1, "phrase": "too tall", "y": 1, "x": 1},
        ]},
        {"id": 2, "regions": []},
    ]  # fmt: skip
    paths = tmp_path / "image_data.json", tmp_path / "objects.json", tmp_path / "region_descriptions.json"
    for path, data in zip(paths, (image_data, objects, regions)):
        path.write_text(json.dumps(data))
    return (*paths, root)


def test_vg_objects_and_region_descriptions_become_region_samples_with_every_skip_counted(tmp_path):
    image_data, objects, regions, root = vg_files(tmp_path)
    out = tmp_path / "out"
    assert prep("vg-regions", "--image-data", image_data, "--objects", objects, "--regions", regions,
                "--image-root", root, "--out", out) == 0  # fmt: skip
    written = samples(out)
    assert sorted(written) == ["vg_1", "vg_2"]
    one = written["vg_1"]["meta"]
    assert one["captions"] == {} and one["image_size"] == [120, 90]
    assert one["regions"] == [
        {"box": [20.0, 10.0, 70.0, 60.0], "captions": {"en": ["dog", "puppy"]}, "label": "dog",
         "attributes": {"en": ["brown"]}},
        {"box": [20.0, 10.0, 70.0, 60.0], "captions": {"en": ["a brown dog on the left"]}},
    ]  # fmt: skip
    assert written["vg_2"]["meta"]["regions"] == [
        {"box": [0.0, 0.0, 40.0, 40.0], "captions": {"en": ["box"]}, "label": "box"}
    ]
    for sample in written.values():
        np.testing.assert_allclose(red_extent(sample["jpg"]), sample["meta"]["regions"][0]["box"], atol=1)
    assert manifest(out)["skipped"] == {
        "missing_image": 1,
        "region_degenerate_box": 1,
        "region_empty_caption": 2,
        "region_outside_image": 2,
        "region_unknown_image": 1,
    }
    only_regions = tmp_path / "regions_only"
    assert prep("vg-regions", "--image-data", image_data, "--regions", regions, "--image-root", root,
                "--out", only_regions) == 0  # fmt: skip
    assert sorted(samples(only_regions)) == ["vg_1"] and manifest(only_regions)["skipped"]["no_region"] == 2


# ------------------------------------------------------------------------------------------ failing part-way
def test_a_conversion_failing_part_way_publishes_nothing(tmp_path, monkeypatch, capsys):
    image_data, objects, regions, root = vg_files(tmp_path)
    real_write = ShardSink.write

    def write_until_full(self, key, members, languages=()):
        if self.count == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, key, members, languages)

    monkeypatch.setattr(ShardSink, "write", write_until_full)
    out = tmp_path / "full"
    assert prep("vg-regions", "--image-data", image_data, "--objects", objects, "--image-root", root,
                "--out", out, "--shard-samples", 1) == 2  # fmt: skip
    assert "cclm prep vg-regions: [Errno 28] No space left on device" in capsys.readouterr().err
    assert [p.name for p in out.rglob("*")] == []
    monkeypatch.undo()

    def interrupted(path, images, writer, tolerance):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_prep.regions.vg, "_add_descriptions", interrupted)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        prep("vg-regions", "--image-data", image_data, "--objects", objects, "--regions", regions,
             "--image-root", root, "--out", out)  # fmt: skip
    assert [p.name for p in out.rglob("*")] == []


def test_bad_input_fails_clearly(tmp_path, capsys):
    instances, _, root = coco_files(tmp_path)
    image_data, objects, _, vg_root = vg_files(tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    cases = [
        (["coco-regions", "--instances", broken, "--image-root", root], "broken.json is not valid JSON"),
        (
            ["coco-regions", "--instances", objects, "--image-root", root],
            "'images', 'annotations' and 'categories'",
        ),
        (
            ["coco-regions", "--instances", tmp_path / "nope.json", "--image-root", root],
            "nope.json does not exist",
        ),
        (["coco-regions", "--instances", instances, "--image-root", tmp_path / "none"], "is not a folder"),
        (
            ["vg-regions", "--image-data", image_data, "--image-root", vg_root],
            "give --objects, --regions or both",
        ),
        (
            ["vg-regions", "--image-data", instances, "--objects", objects, "--image-root", vg_root],
            "a JSON list",
        ),
    ]
    for i, (args, message) in enumerate(cases):
        assert prep(*args, "--out", tmp_path / f"out{i}") == 2
        assert message in capsys.readouterr().err, message
