"""Metrics equal a direct computation on fixed predictions: accuracy, retrieval recall through the project's
retrieval metrics (several captions per image; Flickr string ids next to COCO integer ids keyed on img_path)
and the non-English average."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from cclm.evaluation.retrieval import itm_metrics
from cclm.tasks import get_task
from cclm.tasks.iglue_retrieval import to_retrieval_set
from cclm.tasks.metrics import accuracy, average_non_english
from cclm.tasks.results import write_task_results


def test_accuracy_is_percent_correct():
    predictions, labels = [2, 0, 1, 1, 2, 0, 0], [2, 1, 1, 0, 2, 0, 2]
    assert accuracy(predictions, labels) == pytest.approx(100 * 4 / 7)
    with pytest.raises(ValueError):
        accuracy([1, 2], [1])


def brute_force_recall(
    i2t: torch.Tensor, t2i: torch.Tensor, text_image: list[int], k: int
) -> tuple[float, float]:
    """Direct definition: TR -- an image is found when any of its captions is among its top k texts;
    IR -- a caption is found when its image is among its top k images."""
    tr_hits = 0
    for image in range(i2t.shape[0]):
        top = sorted(range(i2t.shape[1]), key=lambda j: -float(i2t[image, j]))[:k]
        tr_hits += any(text_image[j] == image for j in top)
    ir_hits = 0
    for text in range(t2i.shape[0]):
        top = sorted(range(t2i.shape[1]), key=lambda i: -float(t2i[text, i]))[:k]
        ir_hits += text_image[text] in top
    return 100 * tr_hits / i2t.shape[0], 100 * ir_hits / t2i.shape[0]


def write_jsonl(path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_xflickrco_set_keys_images_on_img_path_and_recall_matches_direct_computation(tmp_path):
    # A Flickr image whose string id equals a COCO integer id; lines of one image pool their captions.
    lines = [
        {"sentences": ["a dog"], "id": "453297", "img_path": "453297.jpg"},
        {"sentences": ["a cat", "a kitten"], "id": 453297, "img_path": "COCO_val2014_000000453297.jpg"},
        {"sentences": ["a brown dog", "two dogs", "a puppy"], "id": "453297", "img_path": "453297.jpg"},
        {"sentences": ["a red bus"], "id": 12, "img_path": "COCO_val2014_000000000012.jpg"},
        {"sentences": ["a tram", "a street"], "id": "12", "img_path": "12.jpg"},
    ]
    write_jsonl(tmp_path / "de" / "test.jsonl", lines)
    data = get_task("xflickrco").read(tmp_path / "de" / "test.jsonl")
    assert [(ref.root, ref.path) for ref in data.images] == [
        ("flickr30k", "453297.jpg"),
        ("coco", "COCO_val2014_000000453297.jpg"),
        ("coco", "COCO_val2014_000000000012.jpg"),
        ("flickr30k", "12.jpg"),
    ]
    assert data.image_ids == ["453297", 453297, 12, "12"]
    assert data.text_image == [0, 1, 1, 0, 0, 0, 2, 3, 3]
    roots = {"flickr30k": "/data/flickr30k", "coco": "/data/coco/val2014"}
    rset = to_retrieval_set(data, roots)
    assert rset.images[1] == Path("/data/coco/val2014/COCO_val2014_000000453297.jpg")
    assert rset.img2txt == [[0, 3, 4, 5], [1, 2], [6], [7, 8]]

    generator = torch.Generator().manual_seed(3)
    i2t, t2i = torch.randn(4, 9, generator=generator), torch.randn(9, 4, generator=generator)
    metrics = itm_metrics(i2t, t2i, rset.txt2img, rset.img2txt)
    for k in (1, 5):
        tr, ir = brute_force_recall(i2t, t2i, data.text_image, k)
        assert metrics[f"txt_r{k}"] == pytest.approx(tr)  # TR: image -> text
        assert metrics[f"img_r{k}"] == pytest.approx(ir)  # IR: text -> image
    perfect = torch.tensor([[float(data.text_image[j] == i) for j in range(9)] for i in range(4)])
    assert itm_metrics(perfect, perfect.t(), rset.txt2img, rset.img2txt)["img_r1"] == 100.0
    swapped = perfect.flip(0)
    assert itm_metrics(swapped, swapped.t(), rset.txt2img, rset.img2txt)["txt_r1"] == 0.0


def test_wit_gives_each_line_its_own_image_entry(iglue_dir):
    path = iglue_dir / "wit/annotations/test_ar.jsonl"
    data = get_task("wit").read(path)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rset = to_retrieval_set(data, {"wit": "/data/wit"})
    assert len(rset.images) == len(records) == len(rset.texts) == 890
    assert rset.img2txt == [[i] for i in range(890)]
    assert len({r["image_url"] for r in records}) < 890  # the same picture on several pages stays separate


def test_average_excludes_english_and_results_files(tmp_path):
    rows = [
        {"language": "en", "accuracy": 90.0, "examples": 10},
        {"language": "ar", "accuracy": 40.0, "examples": 10},
        {"language": "es", "accuracy": 60.0, "examples": 10},
    ]
    assert average_non_english(rows, ["accuracy"]) == {"accuracy": 50.0}
    assert average_non_english(rows[:1], ["accuracy"]) is None
    write_task_results(tmp_path, "xvnli", "zero_shot", rows, ["accuracy"], ["examples"])
    folder = tmp_path / "results" / "xvnli"
    table = json.loads((folder / "zero_shot.json").read_text())
    assert table["average_non_english"] == {"accuracy": 50.0}
    with (folder / "zero_shot.csv").open() as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [r["language"] for r in csv_rows] == ["en", "ar", "es", "avg"]
    assert csv_rows[-1]["accuracy"] == "50.00"
    markdown = (folder / "zero_shot.md").read_text()
    assert "| en | ar | es | avg |" in markdown and "| 90.00 | 40.00 | 60.00 | 50.00 |" in markdown
