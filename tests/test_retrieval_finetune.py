"""Multi30K and MSCOCO retrieval fine-tuning (the CCLM reference's JSON layout): the reader, the configs, and a
tiny random model that learns to retrieve coloured images from captions in two languages through the zero-shot
protocol, scored by ``r_mean`` as the paper reports these tasks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cclm.config import ConfigError, FinetuneConfig, load_config
from cclm.tasks import get_task, protocols, retrieval_json
from cclm.tasks.annotations import AnnotationError, read_array_items
from cclm.tasks.images import ImageRef

from .conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {
    "red": ((220, 30, 30), "rot"),
    "green": ((30, 200, 40), "grün"),
    "blue": ((30, 40, 220), "blau"),
    "yellow": ((230, 220, 30), "gelb"),
    "black": ((10, 10, 10), "schwarz"),
    "white": ((245, 245, 245), "weiß"),
}


def write_json(path, items) -> str:
    path.write_text(json.dumps(items, indent=1, ensure_ascii=False), encoding="utf-8")
    return str(path)


def test_array_items_come_with_the_line_they_start_on(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"a": 1},\n\n  {"b": [1,\n 2]}, 3\n]\n')
    assert list(read_array_items(path)) == [(2, {"a": 1}), (4, {"b": [1, 2]}), (5, 3)]
    path.write_text('[\n {"a": 1}\n {"b": 2}\n]')
    with pytest.raises(AnnotationError, match=r"a.json:3: malformed JSON \(Expecting ',' delimiter"):
        list(read_array_items(path))
    path.write_text('{"a": 1}')
    with pytest.raises(AnnotationError, match="a.json:1: expected a JSON array, got an object"):
        list(read_array_items(path))
    with pytest.raises(AnnotationError, match="missing.json"):
        list(read_array_items(tmp_path / "missing.json"))


@pytest.mark.parametrize(
    ("name", "language"),
    [
        ("train.de.json", "de"),
        ("en.train.json", "en"),
        ("test_2016_flickr.cs.json", "cs"),
        ("ja.1k_test.json", "ja"),
        ("zh.val.json", "zh"),
        ("val.fr.json", "fr"),
    ],
)
def test_the_language_is_read_from_the_reference_file_names(name, language):
    assert retrieval_json.language_of(name) == language


def test_training_captions_of_one_image_are_one_entry_and_evaluation_lists_are_read(tmp_path):
    train = write_json(
        tmp_path / "train.de.json",
        [
            {"caption": "ein Hund", "image": "flickr30k-images/1.jpg", "image_id": 1},
            {"caption": "eine Katze", "image": "flickr30k-images/2.jpg", "image_id": 2},
            {"caption": "ein brauner Hund", "image": "flickr30k-images/1.jpg", "image_id": 1},
        ],
    )
    data = get_task("multi30k").read(train)
    assert data.images == [
        ImageRef("images", "flickr30k-images/1.jpg"),
        ImageRef("images", "flickr30k-images/2.jpg"),
    ]
    assert data.texts == ["ein Hund", "eine Katze", "ein brauner Hund"]
    assert data.text_image == [0, 1, 0]  # both dog captions are positives of image 1 in ITC
    assert data.languages == {"de"}
    test = write_json(
        tmp_path / "ja.1k_test.json",
        [
            {"image": "coco/val2014/a.jpg", "caption": ["犬", "茶色の犬"]},
            {"image": "coco/val2014/b.jpg", "caption": ["猫"]},
        ],
    )
    data = get_task("mscoco").read(test)
    assert (data.texts, data.text_image, data.languages) == (["犬", "茶色の犬", "猫"], [0, 0, 1], {"ja"})
    bad = write_json(tmp_path / "bad.en.json", [{"image": "x.jpg"}])
    with pytest.raises(AnnotationError, match=r"bad.en.json:2: missing field 'caption'"):
        get_task("mscoco").read(bad)


# batch_size_train: Retrieval_multi30k_en_ft.yaml 10, Retrieval_coco_en_ft.yaml 20 (the English runs these cite)
@pytest.mark.parametrize(
    ("name", "k_test", "batch"), [("multi30k_cclm.yaml", 128, 10), ("mscoco_cclm.yaml", 256, 20)]
)
def test_the_reference_configs_load_with_its_settings(name, k_test, batch):
    cfg = load_config(FinetuneConfig, REPO / "configs" / "finetune" / name)
    assert (cfg.image_size, cfg.window_size, cfg.data.max_length) == (384, 12, 40)
    assert (cfg.train.lr, cfg.train.head_lr_mult, cfg.train.betas, cfg.train.batch_size) == (
        3e-5,
        2.0,
        [0.9, 0.98],
        batch,
    )
    assert cfg.train.grad_clip == 0  # the reference's fine-tuning does not clip
    assert cfg.eval.k_test == k_test
    assert all(path.startswith(cfg.data.root) for path in [*cfg.data.train, *cfg.data.test.values()])


def test_the_old_iglue_dir_key_names_its_new_name():
    with pytest.raises(ConfigError, match=r"unknown config key 'data.iglue_dir' \(renamed to 'data.root'\)"):
        load_config(FinetuneConfig, REPO / "configs" / "finetune" / "xvnli.yaml", ["data.iglue_dir=x"])


def colour_image(path, rgb, seed: int) -> str:
    noise = np.random.default_rng(seed).integers(-25, 26, size=(32, 32, 3))
    pixels = np.clip(np.array(rgb)[None, None, :] + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path.name


def colour_world(tmp_path) -> dict[str, str]:
    """Reference-layout files: training images with two captions each (English, German), and English and German
    test files on other images of the same colours."""
    images = tmp_path / "images" / "flickr30k-images"
    train, tests = [], {"en": [], "de": []}
    for c, (name, (rgb, german)) in enumerate(COLOURS.items()):
        for copy in range(4):
            image = (
                f"flickr30k-images/{colour_image(images / f'train_{name}_{copy}.png', rgb, 10 * c + copy)}"
            )
            image_id = f"{name}{copy}"
            train.append({"caption": f"a {name} picture", "image": image, "image_id": image_id})
            train.append({"caption": f"ein {german}es Bild", "image": image, "image_id": image_id})
        image = f"flickr30k-images/{colour_image(images / f'test_{name}.png', rgb, 1000 + c)}"
        tests["en"].append({"image": image, "caption": [f"a {name} picture"]})
        tests["de"].append({"image": image, "caption": [f"ein {german}es Bild"]})
    root = tmp_path / "multi30k"
    root.mkdir()
    files = {"train": write_json(root / "train.all.json", train)}
    for lang, items in tests.items():
        files[lang] = write_json(root / f"test_2016_flickr.{lang}.json", items)
    return files


def test_a_random_model_learns_multilingual_retrieval_through_the_protocol(tmp_path):
    files = colour_world(tmp_path)
    cfg = load_config(
        FinetuneConfig,
        REPO / "configs" / "finetune" / "multi30k_cclm.yaml",
        [
            f"data.root={tmp_path / 'multi30k'}",
            f"data.train=[{files['train']}]",
            f"data.dev=[{files['en']}]",
            f"data.image_roots.images={tmp_path / 'images'}",
            f"output_dir={tmp_path / 'run'}",
            "model=tiny",
            "model_overrides=[vision.image_size=32,vision.tower.image_size=32]",
            "image_size=0",
            "window_size=0",
            "data.augment=false",
            "train.device=cpu",
            "train.epochs=30",
            "train.batch_size=12",
            "train.lr=5e-4",
            "train.grad_clip=1.0",  # this tiny model's high lr (the reference's config does not clip)
            "train.warmup_ratio=0.05",
            "eval.k_test=4",
        ],
    )
    cfg.data.test = {"en": files["en"], "de": files["de"]}
    table = protocols.run_zero_shot(cfg)["zero_shot"]
    rows = {row["language"]: row for row in table["rows"]}
    assert set(rows) == {"en", "de"}
    assert table["metrics"][:1] == ["r_mean"]
    for lang, row in rows.items():
        assert row["images"] == row["captions"] == len(COLOURS)
        # chance r_mean on 6 images is (1 + 5 + 6) / 3 / 6 * 100 = 67 for R@1/5/10; R@1 chance is 17
        assert row["img_r1"] >= 50 and row["txt_r1"] >= 50, (lang, row)
