"""Annotation files under damage or odd typing, each found by a tester: evaluation sets, the retrieval-set and
region converters and the tokenizer trainer either read them right or stop with one line naming the file (and
record); never a traceback, never a silently merged image or a caption split into characters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cclm.cli import main as cclm_main
from cclm.config import RetrievalDataConfig, from_dict
from cclm.data.shards import VIEW_IMAGE_CAPTION, ShardSink, expand_shards, iter_tar_samples
from cclm.errors import DataError
from cclm.evaluation.datasets import load_retrieval_set
from data_prep.corpora.retrieval_sets import read_lines


def prep(*args) -> int:
    return cclm_main(["prep", *map(str, args)])


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("cclm prep ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def images(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (100, 80), (200, 0, 0)).save(folder / name)
    return folder


def data(tmp_path: Path, **cfg) -> RetrievalDataConfig:
    return from_dict(RetrievalDataConfig, {"root": str(tmp_path), **cfg})


# ------------------------------------------------------------------------------------------- evaluation sets
def test_line_files_with_a_byte_order_mark_read_their_first_line(tmp_path):
    """Before, the image list's first name became "\\ufeffa.jpg" (missing), and a caption gained the mark."""
    (tmp_path / "images.txt").write_bytes("\ufeffa.jpg\r\nb.jpg\r\n".encode())
    (tmp_path / "en.txt").write_bytes("\ufeffa red box\r\na blue box\r\n".encode())
    cfg = data(tmp_path, format="lines", images_file="images.txt", captions={"en": ["en.txt"]})
    found = load_retrieval_set(cfg, "en")
    assert [Path(str(i)).name for i in found.images] == ["a.jpg", "b.jpg"]
    assert found.texts == ["a red box", "a blue box"]
    assert read_lines(tmp_path / "images.txt") == ["a.jpg", "b.jpg"]  # what `cclm prep xtd10` checks


def test_a_line_file_that_is_not_utf8_names_itself_and_its_line(tmp_path):
    (tmp_path / "images.txt").write_text("a.jpg\nb.jpg\n")
    (tmp_path / "en.txt").write_bytes("a red box\nun caf\xe9\n".encode("latin-1"))
    cfg = data(tmp_path, format="lines", images_file="images.txt", captions={"en": ["en.txt"]})
    with pytest.raises(DataError, match=r"en\.txt:2: not UTF-8 \(byte 0xe9\)"):
        load_retrieval_set(cfg, "en")
    with pytest.raises(DataError, match=r"en\.txt:2: not UTF-8 \(byte 0xe9\)"):
        read_lines(tmp_path / "en.txt")  # the converters' reader (it said only "byte 15")


def test_a_caption_given_as_a_string_is_one_caption_not_one_per_character(tmp_path):
    records = [
        {"image/key": "a", "en": {"caption": ["x"]}},
        {"image/key": "b", "en": {"caption": "a whole caption"}},
    ]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    found = load_retrieval_set(data(tmp_path, format="xm3600"), "en")
    assert found.texts == ["x", "a whole caption"] and found.txt2img == [0, 1]


def test_two_images_under_one_id_are_refused_not_merged(tmp_path):
    """Before, the second image vanished and its caption was scored against the first."""
    entries = [
        {"image": "a.jpg", "caption": "a cat", "image_id": 1},
        {"image": "b.jpg", "caption": "a dog", "image_id": 1},
    ]
    (tmp_path / "test.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"image id '1' names two images \(.*a\.jpg and .*b\.jpg\)"):
        load_retrieval_set(data(tmp_path, format="json", captions={"en": ["test.json"]}), "en")
    entries[1]["image"] = "a.jpg"  # one image, captions in two entries: merged as before
    (tmp_path / "test.json").write_text(json.dumps(entries))
    found = load_retrieval_set(data(tmp_path, format="json", captions={"en": ["test.json"]}), "en")
    assert len(found.images) == 1 and found.texts == ["a cat", "a dog"]


@pytest.mark.parametrize(
    "fmt, file, content, message",
    [
        ("json", "test.json", [{"image": "a.jpg", "caption": "x"}, 5], "entry 1 is not an object"),
        ("json", "test.json", [{"image": None, "caption": "x"}], "entry 0: 'image' must be a file name"),
        (
            "xm3600",
            "captions.jsonl",
            [{"en": {"caption": ["x"]}}],
            "record 1: 'image/key' must be an image id",
        ),
        (
            "xm3600",
            "captions.jsonl",
            [{"image/key": "a", "en": {"caption": ["x"]}}, {"image/key": "b", "en": "y"}],
            "record 2: 'en' must be an object with a 'caption' list",
        ),  # fmt: skip
        (
            "demo_world",
            "retrieval.jsonl",
            [{"image": "a.jpg", "image_id": 1, "captions": ["x"]}],
            "record 1: 'captions' must be an object {language: captions}",
        ),  # fmt: skip
    ],
    ids=["json-int-item", "json-null-image", "xm3600-no-key", "xm3600-string-language", "world-caption-list"],
)
def test_a_wrongly_typed_record_names_its_file_and_record(tmp_path, fmt, file, content, message):
    path = tmp_path / file
    if file.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in content))
    else:
        path.write_text(json.dumps(content))
    cfg = data(tmp_path, format=fmt, captions={"en": [file]} if fmt == "json" else {})
    with pytest.raises((DataError, ValueError)) as err:
        load_retrieval_set(cfg, "en")
    assert str(path) in str(err.value) and message in str(err.value)


# ------------------------------------------------------------------------------------------- `cclm prep coco`
def karpathy(tmp_path: Path, images_: list[dict]) -> Path:
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images_, "dataset": "coco"}))
    return path


def kimage(cocoid, name, split="test", sentences=None):
    return {"filepath": "val2014", "filename": name, "cocoid": cocoid, "split": split,
            "sentences": [{"raw": "a caption"}] if sentences is None else sentences}  # fmt: skip


@pytest.mark.parametrize(
    "records, message",
    [
        ([kimage(7, "a.jpg"), kimage(7, "b.jpg")], "images[1] repeats cocoid 7"),
        (
            [kimage(7, "a.jpg", sentences=None), {**kimage(8, "b.jpg"), "sentences": None}],
            "'sentences' must be a list",
        ),
        ([kimage(7, "a.jpg", split=["test"])], "has split ['test']"),
    ],
    ids=["duplicate-cocoid", "null-sentences", "list-split"],
)
def test_coco_karpathy_json_with_bad_records_is_one_line(tmp_path, capsys, records, message):
    root = images(tmp_path / "coco" / "val2014", "a.jpg", "b.jpg").parent
    assert (
        prep("coco", "--dataset", karpathy(tmp_path, records), "--images", root, "--out", tmp_path / "o") == 2
    )
    assert message in error_line(capsys)
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_coco_official_captions_with_a_repeated_image_id_is_one_line(tmp_path, capsys):
    root = images(tmp_path / "coco" / "train2014", "a.jpg", "b.jpg").parent
    path = tmp_path / "captions_train2014.json"
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 1, "caption": "a cat"}],
    }))  # fmt: skip
    assert prep("coco", "--dataset", path, "--images", root, "--out", tmp_path / "o") == 2
    assert "images[1] repeats image id 1" in error_line(capsys)


def test_xm3600_prep_refuses_what_the_evaluation_refuses(tmp_path, capsys):
    records = [{"image/key": "a", "en": {"caption": ["x"]}}, {"image/key": "b", "en": "y"}]
    (tmp_path / "xm").mkdir()
    (tmp_path / "xm" / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    root = images(tmp_path / "img", "a.jpg", "b.jpg")
    assert prep("xm3600", "--dataset", tmp_path / "xm", "--images", root, "--out", tmp_path / "o") == 2
    assert "captions.jsonl: record 2: 'en' must be an object with a 'caption' list" in error_line(capsys)


# ------------------------------------------------------------------------------------------------ regions
def coco_instances(path: Path, image_records: list[dict], annotations: list[dict], categories=None) -> Path:
    categories = categories or [{"id": 1, "name": "dog"}]
    path.write_text(
        json.dumps({"images": image_records, "annotations": annotations, "categories": categories})
    )
    return path


def im(image_id, name, width=100, height=80):
    return {"id": image_id, "file_name": name, "width": width, "height": height}


def ann(image_id, category=1):
    return {"image_id": image_id, "category_id": category, "bbox": [1, 1, 10, 10], "iscrowd": 0}


@pytest.mark.parametrize(
    "records, annotations, message",
    [
        ([im([1], "a.jpg")], [ann(1)], "image id [1] is not an id"),
        ([im(1, "a.jpg"), im(1, "b.jpg")], [ann(1)], "image id 1 appears twice"),
        ([im(1, "a.jpg", width=float("inf"))], [ann(1)], "images need id, file_name, width, height"),
    ],
    ids=["list-id", "repeated-id", "infinite-width"],
)
def test_coco_regions_with_a_bad_image_record_is_one_line(tmp_path, capsys, records, annotations, message):
    root = images(tmp_path / "img", "a.jpg", "b.jpg")
    instances = coco_instances(tmp_path / "instances.json", records, annotations)
    args = ("--instances", instances, "--image-root", root, "--out", tmp_path / "o", "--no-progress")
    assert prep("coco-regions", *args) == 2
    assert message in error_line(capsys)


def test_coco_regions_counts_annotations_whose_ids_are_no_ids(tmp_path):
    root = images(tmp_path / "img", "a.jpg", "b.jpg")
    instances = coco_instances(
        tmp_path / "instances.json",
        [im("x.1", "a.jpg"), im("x_1", "b.jpg")],  # both made safe as coco_x_1: kept apart
        [ann("x.1"), ann("x_1"), ann(["x.1"]), ann("x.1", category=[1])],
        [{"id": 1, "name": "dog"}, {"id": [2], "name": "cat"}],
    )
    out = tmp_path / "o"
    assert (
        prep("coco-regions", "--instances", instances, "--image-root", root, "--out", out, "--no-progress")
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"] == 2
    assert manifest["skipped"] == {"region_unknown_image": 1, "region_unknown_category": 1}


def test_vg_regions_with_a_repeated_image_id_is_one_line(tmp_path, capsys):
    root = images(tmp_path / "img" / "VG_100K", "1.jpg")
    image_data = tmp_path / "image_data.json"
    image_data.write_text(json.dumps([{"image_id": 1, "width": 100, "height": 80}] * 2))
    objects = tmp_path / "objects.json"
    objects.write_text(
        json.dumps([{"image_id": 1, "objects": [{"x": 1, "y": 1, "w": 5, "h": 5, "names": ["dog"]}]}])
    )
    args = (
        "--image-data",
        image_data,
        "--objects",
        objects,
        "--image-root",
        tmp_path / "img",
        "--out",
        tmp_path / "o",
    )
    assert prep("vg-regions", *args) == 2
    assert "image_id 1 appears twice" in error_line(capsys) and root.is_dir()


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_text_that_is_not_utf8_names_the_file_and_line(tmp_path, capsys):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("hello world\n" * 5)
    bad.write_bytes("fine\nun caf\xe9\n".encode("latin-1"))
    assert prep("tokenizer", "--text", good, "--text", bad, "--out", tmp_path / "tok") == 2
    assert f"{bad}:2: not UTF-8 (byte 0xe9)" in error_line(capsys)


@pytest.mark.parametrize(
    "member, message",
    [
        (b'{"captions": {"en": ["unterminated', "its json does not read"),
        (b"[1, 2]", "its json is not an object"),
        (b'{"captions": "a string"}', "'captions' must be {language: captions}"),
    ],  # fmt: skip
    ids=["truncated-json", "json-list", "captions-string"],
)
def test_tokenizer_shard_with_a_bad_sample_names_the_shard_and_sample(tmp_path, capsys, member, message):
    with ShardSink(tmp_path / "s", VIEW_IMAGE_CAPTION) as sink:
        sink.write("k0", {"json": b'{"captions": {"en": ["fine"]}}'})
        sink.write("k1", {"json": member})
        sink.close()
    assert prep("tokenizer", "--shards", tmp_path / "s", "--out", tmp_path / "tok") == 2
    line = error_line(capsys)
    assert "shard-000000.tar: sample k1: " + message in line
    assert [s["__key__"] for u in expand_shards(str(tmp_path / "s")) for s in iter_tar_samples(u)] == [
        "k0",
        "k1",
    ]
