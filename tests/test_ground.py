"""Grounding (cclm.inference.ground, `cclm ground`).

Specification: the box is the box head's prediction over the whole image, mapped to the image's own pixels (each
axis by its own size); IoU is torchvision's; accuracy counts IoU >= 0.5 per language; the command prints the box,
draws it as a PNG of the image's size and evaluates a grounding file; a model without a box head and a bad
grounding line are clear errors; the synthetic world's grounding files read."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from cclm.cli import main as cclm_main
from cclm.data.images import load_image
from cclm.inference.ground import (
    NoBoxHeadError,
    ground,
    ground_boxes,
    grounding_accuracy,
    paired_iou,
    read_grounding,
    read_grounding_sets,
)
from cclm.jsonl import JsonFileError
from cclm.model import CrossViewModel
from cclm.model.boxes import box_cxcywh_to_xyxy

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def box_model_dir(tmp_path, tiny_model_cfg, tiny_tokenizer):
    tiny_model_cfg.objectives.bbox = True
    out = tmp_path / "box_model"
    CrossViewModel(tiny_model_cfg, load_pretrained=False).save_pretrained(out)
    tiny_tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "pic.png"
    image = Image.new("RGB", (48, 40), (30, 30, 30))
    image.paste((220, 40, 40), (5, 6, 25, 30))
    image.save(path)
    return path


def random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    corner = torch.rand(n, 2, generator=generator) * 50
    return torch.cat([corner, corner + 1 + torch.rand(n, 2, generator=generator) * 50], dim=1)


def test_paired_iou_is_torchvisions_diagonal():
    g = torch.Generator().manual_seed(0)
    a, b = random_boxes(200, g), random_boxes(200, g)
    b[:50] = a[:50]  # identical pairs: IoU 1
    torch.testing.assert_close(paired_iou(a, b), box_iou(a, b).diagonal())


def test_the_box_is_the_heads_prediction_in_the_images_pixels(box_model_dir, picture, tiny_tokenizer):
    model = CrossViewModel.from_pretrained(box_model_dir).eval()
    text = "a red square on the left"
    box = ground(model, tiny_tokenizer, picture, text)
    ids = tiny_tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        query, _ = model.encode_text(ids["input_ids"], ids["attention_mask"])
        tokens, _ = model.encode_image(load_image(picture, model.cfg.vision.image_size)[None])
        predicted = model.predict_boxes(query, ids["attention_mask"], tokens)
        expected = box_cxcywh_to_xyxy(predicted).clamp(0, 1)[0]
    assert box == pytest.approx((expected * torch.tensor([48, 40, 48, 40])).tolist(), abs=1e-4)
    assert 0 <= box[0] < box[2] <= 48 and 0 <= box[1] < box[3] <= 40
    # batched, padded texts give each text its own box
    texts = [text, "ein roter Kreis", "a"]
    many = ground_boxes(model, tiny_tokenizer, [picture] * 3, texts, batch_size=2)
    for i, one in enumerate(texts):
        assert many[i].tolist() == pytest.approx(list(ground(model, tiny_tokenizer, picture, one)), abs=1e-4)


def test_a_missing_image_leaves_a_training_model_in_training_mode(
    box_model_dir, picture, tiny_tokenizer, tmp_path
):
    model = CrossViewModel.from_pretrained(box_model_dir).train()
    with pytest.raises(FileNotFoundError):
        ground_boxes(model, tiny_tokenizer, [picture, tmp_path / "gone.png"], ["a", "b"], batch_size=1)
    assert model.training and all(m.training for m in model.modules())


def test_accuracy_counts_iou_of_at_least_a_half_per_language(
    box_model_dir, picture, tiny_tokenizer, tmp_path
):
    model = CrossViewModel.from_pretrained(box_model_dir).eval()
    texts = ["a red square", "ein rotes Quadrat", "un carré rouge", "a circle"]
    predicted = ground_boxes(model, tiny_tokenizer, [picture] * 4, texts)

    def shifted(i: int, fraction: float) -> list[float]:
        """Prediction i moved right by ``fraction`` of its width: IoU (1 - f) / (1 + f)."""
        x0, y0, x1, y1 = predicted[i].tolist()
        return [x0 + fraction * (x1 - x0), y0, x1 + fraction * (x1 - x0), y1]

    annotated = [shifted(0, 0.0), shifted(1, 0.1), shifted(2, 0.7), shifted(3, 0.4)]  # IoU 1, .82, .18, .43
    langs = ["en", "de", "fr", "en"]
    path = tmp_path / "grounding.jsonl"
    path.write_text(
        "".join(
            json.dumps({"image": picture.name, "box": box, "text": text, "lang": lang}) + "\n"
            for box, text, lang in zip(annotated, texts, langs)
        )
    )
    records = read_grounding(path)
    assert records[0]["image"] == picture
    assert grounding_accuracy(model, tiny_tokenizer, records) == {"de": 100.0, "en": 50.0, "fr": 0.0}


def test_the_command_prints_draws_and_evaluates(box_model_dir, picture, tmp_path, capsys):
    out = tmp_path / "drawn" / "box.png"
    assert cclm_main(["ground", str(box_model_dir), str(picture), "a red square", "--out", str(out)]) == 0
    box = json.loads(capsys.readouterr().out)["box"]
    assert len(box) == 4 and box[0] < box[2]
    with Image.open(out) as drawn:
        assert drawn.format == "PNG" and drawn.size == (48, 40)
        original = Image.open(picture).convert("RGB")
        assert not np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(original))  # the box is drawn
    path = tmp_path / "grounding.jsonl"
    path.write_text(
        json.dumps({"image": picture.name, "box": box, "text": "a red square", "lang": "en"}) + "\n"
    )
    assert cclm_main(["ground", str(box_model_dir), "--eval", str(path)]) == 0
    assert json.loads(capsys.readouterr().out) == {"grounding_accuracy": {"en": 100.0}}


def test_a_model_without_a_box_head_or_a_bad_line_is_a_clear_error(
    tiny_model_dir, box_model_dir, picture, tmp_path, capsys
):
    model = CrossViewModel.from_pretrained(tiny_model_dir)
    with pytest.raises(NoBoxHeadError, match="objectives.bbox"):
        ground(model, None, picture, "anything")
    assert cclm_main(["ground", str(tiny_model_dir), str(picture), "a square"]) == 2
    assert "no box head" in capsys.readouterr().err
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"image": "pic.png", "box": [1, 2, 3, 4], "text": "ok"})
        + "\n"
        + json.dumps({"image": "pic.png", "box": [5, 2, 3, 4], "text": "backwards"})
        + "\n"
    )
    with pytest.raises(JsonFileError, match="bad.jsonl:2: 'box'"):
        read_grounding(path)
    assert cclm_main(["ground", str(box_model_dir), "--eval", str(path)]) == 2


def test_the_worlds_grounding_files_read_and_evaluate_per_language(tmp_path, box_model_dir, capsys):
    from data_prep.world.build import build_world

    world = build_world(tmp_path / "w", num_images=4, num_parallel=0, heldout_images=3, xvnli_images=2,
                        image_size=32, regions=True)  # fmt: skip
    records = read_grounding(tmp_path / "w" / "heldout" / "de" / "grounding.jsonl")
    assert records and all(r["image"].exists() and r["lang"] == "de" for r in records)
    assert all(0 <= r["box"][0] < r["box"][2] <= 32 and 0 <= r["box"][1] < r["box"][3] <= 32 for r in records)
    everything = read_grounding_sets(tmp_path / "w" / "heldout")
    assert {r["lang"] for r in everything} == set(world["paths"]["grounding"])
    assert len(everything) == len(records) * len(world["paths"]["grounding"])
    assert cclm_main(["ground", str(box_model_dir), "--eval", str(tmp_path / "w" / "heldout")]) == 0
    accuracy = json.loads(capsys.readouterr().out)["grounding_accuracy"]
    assert set(accuracy) == set(world["paths"]["grounding"]) and all(0 <= a <= 100 for a in accuracy.values())


def test_the_inference_api_grounds_as_the_module_does(box_model_dir, picture):
    import cclm

    model = cclm.load(str(box_model_dir))
    boxes = model.ground([picture, Image.open(picture)], ["a red square", "un carré rouge"])
    expected = ground_boxes(
        model.model, model.tokenizer, [picture, picture], ["a red square", "un carré rouge"]
    )
    torch.testing.assert_close(boxes, expected)
    assert boxes.shape == (2, 4) and (boxes[:, 2:] >= boxes[:, :2]).all()
    with pytest.raises(TypeError, match="list of strings"):
        model.ground([picture], "a red square")
