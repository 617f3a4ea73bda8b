"""``cclm prep multi30k|coco|xtd10|xm3600`` on downloads written in each publisher's exact layout: the configs they
write load as :class:`RetrievalRunConfig` and the evaluation's own readers find exactly the images and captions
the test wrote; every missing image is listed at once and nothing is published; wrong layouts are refused."""

from __future__ import annotations

import gzip
import json

import pytest

from cclm.cli import main as cclm_main
from cclm.config import FinetuneConfig, RetrievalRunConfig, load_config
from cclm.evaluation.datasets import available_languages, load_retrieval_set
from cclm.tasks import get_task
from tests.conftest import REPO
from tests.test_prep_converters import picture


def prep(*args) -> int:
    return cclm_main(["prep", *map(str, args)])


def save_images(folder, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        picture(i, size=(8, 6)).save(folder / name, format="JPEG")


def loaded(config_path) -> dict[str, tuple[int, int]]:
    """language -> (images, captions) as `cclm evaluate retrieval` reads the config."""
    cfg = load_config(RetrievalRunConfig, config_path, ["checkpoint=unused"])
    out = {}
    for lang in available_languages(cfg.data):
        rset = load_retrieval_set(cfg.data, lang)
        assert all(path.is_file() for path in rset.images)
        out[lang] = (len(rset.images), len(rset.texts))
    return out


# ---------------------------------------------------------------------------------------------------- Multi30K
MULTI30K_SPLITS = {
    "train": ("train", "train", 3),
    "val": ("val", "val", 2),
    "test": ("test_2016_flickr", "test_2016", 2),
}


def multi30k_clone(root):
    """github.com/multi30k/dataset as cloned: data/task1/image_splits/*.txt, gzipped raw caption files."""
    data = root / "data"
    (data / "task1" / "image_splits").mkdir(parents=True)
    (data / "task1" / "raw").mkdir()
    (data / "task2" / "raw").mkdir(parents=True)
    names = {}
    for split, (task1, task2, n) in MULTI30K_SPLITS.items():
        names[split] = [f"{split}{i}00.jpg" for i in range(n)]
        (data / "task1" / "image_splits" / f"{task1}.txt").write_text("\n".join(names[split]) + "\n")
        for lang in ("en", "de", "fr", "cs"):
            lines = "".join(f"{lang} {split} caption {i}\n" for i in range(n))
            with gzip.open(data / "task1" / "raw" / f"{task1}.{lang}.gz", "wt", encoding="utf-8") as handle:
                handle.write(lines)
        for k in range(1, 6):
            for lang in ("en", "de"):
                lines = [f"{lang} {split} caption {i} version {k}" for i in range(n)]
                if split == "val" and k == 5 and lang == "de":
                    lines[0] = ""  # an empty caption line: the image keeps its other four
                with gzip.open(
                    data / "task2" / "raw" / f"{task2}.{k}.{lang}.gz", "wt", encoding="utf-8"
                ) as handle:
                    handle.write("\n".join(lines) + "\n")
    return names


def test_multi30k_configs_per_split(tmp_path, capsys):
    names = multi30k_clone(tmp_path / "multi30k-dataset")
    save_images(tmp_path / "flickr30k-images", [n for split in names.values() for n in split])
    out = tmp_path / "configs"
    assert (
        prep(
            "multi30k",
            "--dataset",
            tmp_path / "multi30k-dataset",
            "--images",
            tmp_path / "flickr30k-images",
            "--out",
            out,
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "train: 3 images; captioned images/captions: cs 3/3, de 3/15, en 3/15, fr 3/3" in printed
    assert "val: 2 images; captioned images/captions: cs 2/2, de 2/9, en 2/10, fr 2/2" in printed
    assert loaded(out / "multi30k_train.yaml") == {"en": (3, 15), "de": (3, 15), "fr": (3, 3), "cs": (3, 3)}
    assert loaded(out / "multi30k_val.yaml") == {"en": (2, 10), "de": (2, 9), "fr": (2, 2), "cs": (2, 2)}
    assert loaded(out / "multi30k_test.yaml") == {"en": (2, 10), "de": (2, 10), "fr": (2, 2), "cs": (2, 2)}
    cfg = load_config(RetrievalRunConfig, out / "multi30k_test.yaml", ["checkpoint=unused"])
    rset = load_retrieval_set(cfg.data, "de")
    assert rset.texts[:2] == ["de test caption 0 version 1", "de test caption 0 version 2"]
    assert cfg.name == "multi30k_test" and cfg.data.image_root == str(
        (tmp_path / "flickr30k-images").resolve()
    )
    # the fine-tuning files, in the reference's JSON layout, hold the same images and captions
    finetune = load_config(
        FinetuneConfig,
        REPO / "configs" / "finetune" / "multi30k_cclm.yaml",
        [f"data.root={out / 'finetune'}"],
    )
    reader = get_task("multi30k")
    test_de = reader.read(finetune.data.test["de"])
    assert (test_de.texts, test_de.text_image) == (rset.texts, rset.txt2img)
    assert [ref.path for ref in test_de.images] == names["test"] and test_de.languages == {"de"}
    train_en = reader.read(finetune.data.train[0])
    assert len(train_en.texts) == 15 and train_en.text_image == [i for i in range(3) for _ in range(5)]
    val_de = reader.read(out / "finetune" / "val.de.json")
    assert len(val_de.texts) == 9  # the empty caption line is not a caption


def test_multi30k_lists_every_missing_image_and_publishes_nothing(tmp_path, capsys):
    names = multi30k_clone(tmp_path / "clone")
    save_images(tmp_path / "images", [n for split in names.values() for n in split])
    (tmp_path / "images" / "train100.jpg").unlink()
    (tmp_path / "images" / "test000.jpg").unlink()
    out = tmp_path / "configs"
    assert (
        prep("multi30k", "--dataset", tmp_path / "clone", "--images", tmp_path / "images", "--out", out) == 2
    )
    err = capsys.readouterr().err
    assert "2 of 7 image files are missing" in err
    assert (
        str(tmp_path / "images" / "train100.jpg") in err and str(tmp_path / "images" / "test000.jpg") in err
    )
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


def test_multi30k_refuses_wrong_layouts(tmp_path, capsys):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "train.en").write_text("a\n")
    (tmp_path / "images").mkdir()
    assert (
        prep(
            "multi30k",
            "--dataset",
            tmp_path / "flat",
            "--images",
            tmp_path / "images",
            "--out",
            tmp_path / "o",
        )
        == 2
    )
    assert "expected multi30k/dataset's data/ folder" in capsys.readouterr().err
    names = multi30k_clone(tmp_path / "clone")
    (tmp_path / "clone" / "data" / "task1" / "raw" / "val.cs.gz").unlink()
    (tmp_path / "clone" / "data" / "task2" / "raw" / "train.3.de.gz").unlink()
    save_images(tmp_path / "images", [n for split in names.values() for n in split])
    assert (
        prep(
            "multi30k",
            "--dataset",
            tmp_path / "clone",
            "--images",
            tmp_path / "images",
            "--out",
            tmp_path / "o",
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "2 Multi30K caption files missing" in err and "val.cs" in err and "train.3.de" in err


# -------------------------------------------------------------------------------------------------------- COCO
def karpathy_file(path) -> None:
    images = []
    for i, split in enumerate(["train", "restval", "val", "test", "test"]):
        folder = "train2014" if split == "train" else "val2014"
        images.append(
            {
                "filepath": folder,
                "filename": f"COCO_{folder}_{i:012d}.jpg",
                "imgid": i,
                "cocoid": 1000 + i,
                "split": split,
                "sentids": [5 * i + k for k in range(5)],
                "sentences": [
                    {
                        "tokens": ["a", "cat"],
                        "raw": f"A cat number {i}, take {k}.",
                        "imgid": i,
                        "sentid": 5 * i + k,
                    }
                    for k in range(5)
                ],
            }
        )
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))


def official_file(path) -> None:
    images = [
        {"id": 7, "file_name": "000000000007.jpg", "height": 6, "width": 8},
        {"id": 9, "file_name": "000000000009.jpg"},
    ]
    annotations = [
        {"image_id": 7, "id": 1, "caption": "A dog."},
        {"image_id": 7, "id": 2, "caption": "A brown dog."},
    ]
    annotations.append({"image_id": 9, "id": 3, "caption": "A bus."})
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations}))


def test_coco_karpathy_and_official_files(tmp_path, capsys):
    karpathy_file(tmp_path / "dataset_coco.json")
    (tmp_path / "annotations").mkdir()
    official_file(tmp_path / "annotations" / "captions_val2017.json")
    coco = tmp_path / "coco"
    save_images(coco / "train2014", ["COCO_train2014_000000000000.jpg"])
    save_images(coco / "val2014", [f"COCO_val2014_{i:012d}.jpg" for i in range(1, 5)])
    save_images(coco / "val2017", ["000000000007.jpg", "000000000009.jpg"])
    out = tmp_path / "configs"
    files = [tmp_path / "dataset_coco.json", tmp_path / "annotations" / "captions_val2017.json"]
    assert prep("coco", "--dataset", *files, "--images", coco, "--out", out) == 0
    assert loaded(out / "coco_train.yaml") == {"en": (2, 10)}  # train + restval
    assert loaded(out / "coco_val.yaml") == {"en": (1, 5)}
    assert loaded(out / "coco_test.yaml") == {"en": (2, 10)}
    assert loaded(out / "coco_val2017.yaml") == {"en": (2, 3)}
    test = load_config(RetrievalRunConfig, out / "coco_test.yaml", ["checkpoint=unused"])
    assert test.eval.k_test == 256
    assert load_retrieval_set(test.data, "en").image_ids == ["1003", "1004"]
    # the Karpathy splits in the reference's fine-tuning layout, as mscoco_cclm.yaml reads them
    finetune = load_config(
        FinetuneConfig,
        REPO / "configs" / "finetune" / "mscoco_cclm.yaml",
        [f"data.root={out / 'finetune'}", f"data.test={{en: {out / 'finetune' / 'en.test.json'}}}"],
    )
    reader = get_task("mscoco")
    train = reader.read(finetune.data.train[0])
    assert len(train.texts) == 10 and train.text_image == [i for i in range(2) for _ in range(5)]
    assert [ref.path for ref in train.images] == [
        "train2014/COCO_train2014_000000000000.jpg",
        "val2014/COCO_val2014_000000000001.jpg",
    ]
    rset = load_retrieval_set(test.data, "en")
    test_en = reader.read(finetune.data.test["en"])
    assert (test_en.texts, test_en.text_image) == (rset.texts, rset.txt2img)
    assert len(reader.read(finetune.data.dev[0]).texts) == 5
    assert "fine-tune with: cclm finetune configs/finetune/mscoco_cclm.yaml" in capsys.readouterr().out


def test_coco_refuses_other_json(tmp_path, capsys):
    (tmp_path / "instances_val2017.json").write_text(json.dumps({"images": [{"id": 1}], "categories": []}))
    (tmp_path / "coco").mkdir()
    assert (
        prep(
            "coco",
            "--dataset",
            tmp_path / "instances_val2017.json",
            "--images",
            tmp_path / "coco",
            "--out",
            tmp_path / "o",
        )
        == 2
    )
    assert "expected Karpathy's dataset_coco.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ XTD10, XM3600
def test_xtd10_repository_layout(tmp_path):
    repo = tmp_path / "Cross-lingual-Test-Dataset-XTD10"
    names = [f"COCO_train2014_{i:012d}.jpg" for i in range(3)]
    (repo / "XTD10").mkdir(parents=True)
    (repo / "MIC").mkdir()
    (repo / "STAIR").mkdir()
    (repo / "XTD10" / "test_image_names.txt").write_text("\n".join(names) + "\n")
    (repo / "XTD10" / "test_1kcaptions_en.txt").write_text("a cat\na dog\na bus\n")
    # several of the published files end lines with CRLF and lack the final line break
    (repo / "XTD10" / "test_1kcaptions_es.txt").write_bytes("un gato\r\nun perro\r\nun autobús".encode())
    (repo / "MIC" / "test_1kcaptions_de.txt").write_text("eine Katze\nein Hund\nein Bus\n")
    (repo / "STAIR" / "test_1kcaptions_jp.txt").write_text("猫\n犬\nバス\n")
    save_images(tmp_path / "coco" / "train2014", names)
    out = tmp_path / "configs"
    assert prep("xtd10", "--dataset", repo, "--images", tmp_path / "coco", "--out", out) == 0
    assert loaded(out / "xtd10_test.yaml") == {lang: (3, 3) for lang in ("de", "en", "es", "ja")}
    cfg = load_config(RetrievalRunConfig, out / "xtd10_test.yaml", ["checkpoint=unused"])
    assert load_retrieval_set(cfg.data, "es").texts == ["un gato", "un perro", "un autobús"]
    (repo / "MIC" / "test_1kcaptions_fr.txt").write_text("un chat\n")
    assert prep("xtd10", "--dataset", repo, "--images", tmp_path / "coco", "--out", out) == 2


def test_xm3600_layout_and_missing_images(tmp_path, capsys):
    root = tmp_path / "xm3600"
    records = [
        {
            "image/key": "000411001ff7dd4f",
            "image/locale": "ar",
            "en": {"caption": ["a man", "a person"]},
            "de": {"caption": ["ein Mann"]},
        },
        {
            "image/key": "0005c5c6da8a0e06",
            "image/locale": "bn",
            "en": {"caption": ["a tree"]},
            "de": {"caption": []},
        },
    ]
    root.mkdir()
    (root / "captions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    save_images(root / "images", ["000411001ff7dd4f.jpg"])
    out = tmp_path / "configs"
    assert prep("xm3600", "--dataset", root, "--out", out) == 2
    err = capsys.readouterr().err
    assert "1 of 2 image files are missing" in err and "0005c5c6da8a0e06.jpg" in err
    save_images(root / "images", ["000411001ff7dd4f.jpg", "0005c5c6da8a0e06.jpg"])
    assert prep("xm3600", "--dataset", root, "--out", out) == 0
    assert loaded(out / "xm3600_test.yaml") == {"de": (1, 1), "en": (2, 3)}  # image/locale is no language
    (root / "captions.jsonl").write_text('{"key": "x", "en": ["a"]}\n')
    assert prep("xm3600", "--dataset", root, "--out", tmp_path / "o") == 2
    assert "captions.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["multi30k", "coco", "xtd10", "xm3600"])
def test_missing_dataset_folder_is_one_line_error(tmp_path, capsys, command):
    (tmp_path / "images").mkdir()
    assert (
        prep(
            command, "--dataset", tmp_path / "nope", "--images", tmp_path / "images", "--out", tmp_path / "o"
        )
        == 2
    )
    assert "nope" in capsys.readouterr().err
