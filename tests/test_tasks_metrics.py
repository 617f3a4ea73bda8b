"""Metrics equal a direct computation on fixed predictions: accuracy, retrieval recall (several captions per
image; Flickr string ids next to COCO integer ids keyed on img_path) and the non-English average."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from cclm.tasks import get_task
from cclm.tasks.metrics import accuracy, average_non_english
from cclm.tasks.results import write_results
from cclm.tasks.retrieval import recall_at_k


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


def test_recall_with_several_captions_per_image_matches_direct_computation():
    generator = torch.Generator().manual_seed(3)
    text_image = [0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 5]  # 6 images, 1 to 4 captions each
    i2t = torch.randn(6, len(text_image), generator=generator)
    t2i = torch.randn(len(text_image), 6, generator=generator)
    metrics = recall_at_k(i2t, t2i, text_image, ks=(1, 2, 5))
    for k in (1, 2, 5):
        tr, ir = brute_force_recall(i2t, t2i, text_image, k)
        assert metrics[f"tr_r{k}"] == pytest.approx(tr)
        assert metrics[f"ir_r{k}"] == pytest.approx(ir)
    assert metrics["r_mean"] == pytest.approx((metrics["tr_r_mean"] + metrics["ir_r_mean"]) / 2)


def test_recall_on_hand_made_scores():
    # image 0 has captions 0,1; image 1 has caption 2. Image 0's best text is caption 1 (its own): TR hit.
    # Image 1's best text is caption 0 (wrong). Captions 0 and 2 rank their image first, caption 1 does not.
    i2t = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3]])
    t2i = torch.tensor([[0.9, 0.1], [0.2, 0.7], [0.4, 0.6]])
    metrics = recall_at_k(i2t, t2i, [0, 0, 1], ks=(1,))
    assert metrics["tr_r1"] == pytest.approx(50.0)
    assert metrics["ir_r1"] == pytest.approx(200 / 3)


def test_xflickrco_keys_images_on_img_path_not_id(tmp_path):
    # A Flickr image whose string id equals a COCO integer id, and a second line for the same Flickr image.
    lines = [
        {"sentences": ["a dog"], "id": "453297", "img_path": "453297.jpg"},
        {"sentences": ["a cat", "a kitten"], "id": 453297, "img_path": "COCO_val2014_000000453297.jpg"},
        {"sentences": ["a brown dog"], "id": "453297", "img_path": "453297.jpg"},
    ]
    path = tmp_path / "de" / "test.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    data = get_task("xflickrco").read(path)
    assert [ref.path for ref in data.images] == ["453297.jpg", "COCO_val2014_000000453297.jpg"]
    assert [ref.root for ref in data.images] == ["flickr30k", "coco"]
    assert data.image_ids == ["453297", 453297]
    assert data.texts == ["a dog", "a cat", "a kitten", "a brown dog"]
    assert data.text_image == [0, 1, 1, 0]
    # perfect scores give 100 everywhere; swapping the two images gives 0
    perfect = torch.tensor([[1.0 if data.text_image[j] == i else 0.0 for j in range(4)] for i in range(2)])
    assert recall_at_k(perfect, perfect.t(), data.text_image, ks=(1,))["ir_r1"] == 100.0
    swapped = perfect.flip(0)
    metrics = recall_at_k(swapped, swapped.t(), data.text_image, ks=(1,))
    assert metrics["ir_r1"] == 0.0 and metrics["tr_r1"] == 0.0


def test_wit_gives_each_line_its_own_image_entry(iglue_dir):
    path = iglue_dir / "wit/annotations/test_ar.jsonl"
    data = get_task("wit").read(path)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(data.images) == len(records) == len(data.texts)
    assert data.text_image == list(range(len(records)))
    assert len(data.image_refs) < len(records)  # some pictures appear on several pages


def test_average_excludes_english_and_results_files(tmp_path):
    rows = [
        {"language": "en", "accuracy": 90.0, "examples": 10},
        {"language": "ar", "accuracy": 40.0, "examples": 10},
        {"language": "es", "accuracy": 60.0, "examples": 10},
    ]
    assert average_non_english(rows, ["accuracy"]) == {"accuracy": 50.0}
    assert average_non_english(rows[:1], ["accuracy"]) is None
    write_results(tmp_path, "xvnli", "zero_shot", rows, ["accuracy"], ["examples"])
    folder = tmp_path / "results" / "xvnli"
    table = json.loads((folder / "zero_shot.json").read_text())
    assert table["average_non_english"] == {"accuracy": 50.0}
    with (folder / "zero_shot.csv").open() as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [r["language"] for r in csv_rows] == ["en", "ar", "es", "avg"]
    assert csv_rows[-1]["accuracy"] == "50.00"
    markdown = (folder / "zero_shot.md").read_text()
    assert "| en | ar | es | avg |" in markdown and "| 90.00 | 40.00 | 60.00 | 50.00 |" in markdown
