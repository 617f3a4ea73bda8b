"""Benchmark loaders: each format read from small files laid out as the real data sets are."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from cclm.config import RetrievalRunConfig, load_config
from cclm.data.images import load_image
from cclm.errors import DataError
from cclm.evaluation.datasets import (
    RetrievalDataConfig,
    RetrievalSet,
    available_languages,
    load_heldout_sets,
    load_retrieval_set,
)
from cclm.evaluation.results import write_results
from cclm.runtime.env import DistEnv
from cclm.tasks import iglue_retrieval
from cclm.tasks.iglue_retrieval import to_retrieval_set
from cclm.tasks.protocols import TaskSuite

REPO = Path(__file__).resolve().parent.parent


def data_cfg(**kwargs) -> RetrievalDataConfig:
    return load_config(RetrievalDataConfig, None, [f"{k}={json.dumps(v)}" for k, v in kwargs.items()])


def write_image(path: Path, colour=(200, 30, 30), size=(40, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.mark.parametrize("config", sorted((REPO / "configs" / "eval").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_eval_config_is_valid(config):
    cfg = load_config(RetrievalRunConfig, config, ["checkpoint=model_dir"])
    assert cfg.data.format and cfg.data.root and cfg.eval.k_test > 0


def test_lines_format_multi30k_layout(tmp_path):
    (tmp_path / "image_splits").mkdir()
    (tmp_path / "image_splits" / "test_2016_flickr.txt").write_text(
        "1000092795.jpg\n10002456.jpg\n1000268201.jpg\n"
    )
    for n in range(1, 6):
        (tmp_path / f"test_2016.{n}.en").write_text(f"caption {n} of a\ncaption {n} of b\ncaption {n} of c\n")
    (tmp_path / "test_2016_flickr.fr").write_text("une photo a\nune photo b\nune photo c\n")
    cfg = data_cfg(
        format="lines",
        root=str(tmp_path),
        image_root="/images",
        images_file="image_splits/test_2016_flickr.txt",
        captions={"en": [f"test_2016.{n}.en" for n in range(1, 6)], "fr": ["test_2016_flickr.fr"]},
    )
    en = load_retrieval_set(cfg, "en", "multi30k")
    assert len(en.images) == 3 and len(en.texts) == 15
    assert en.images[1] == Path("/images/10002456.jpg") and en.image_ids[1] == "10002456.jpg"
    assert [en.texts[t] for t in en.img2txt[2]] == [f"caption {n} of c" for n in range(1, 6)]
    assert all(en.txt2img[t] == i for i, ts in enumerate(en.img2txt) for t in ts)
    fr = load_retrieval_set(cfg, "fr", "multi30k")
    assert fr.texts == ["une photo a", "une photo b", "une photo c"] and fr.img2txt == [[0], [1], [2]]
    assert available_languages(cfg) == ["en", "fr"]
    with pytest.raises(DataError, match="unknown language 'cs' for this data set; it has en, fr"):
        load_retrieval_set(cfg, "cs")
    (tmp_path / "test_2016_flickr.fr").write_text("une photo a\nune photo b\n")
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        load_retrieval_set(cfg, "fr")


def test_json_format_merges_duplicate_images_and_keeps_coco_ids_as_strings(tmp_path):
    items = [
        {
            "image": "val2014/COCO_val2014_000000000042.jpg",
            "caption": ["a dog", "a brown dog"],
            "image_id": 42,
        },
        {"image": "val2014/COCO_val2014_000000000042.jpg", "caption": "a dog on grass", "image_id": 42},
        {"image": "val2014/COCO_val2014_000000000073.jpg", "caption": ["一台のバイク"], "image_id": 73},
    ]
    (tmp_path / "coco_test_ja.json").write_text(json.dumps(items, ensure_ascii=False))
    cfg = data_cfg(format="json", root=str(tmp_path), captions={"ja": ["coco_test_ja.json"]})
    rset = load_retrieval_set(cfg, "ja")
    assert rset.image_ids == ["42", "73"]
    assert rset.img2txt == [[0, 1, 2], [3]] and rset.texts[3] == "一台のバイク"
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "x.jpg"}]))
    with pytest.raises(ValueError, match="entry 0 lacks"):
        load_retrieval_set(data_cfg(format="json", root=str(tmp_path), captions={"ja": ["bad.json"]}), "ja")


def test_id_tsv_format_coco_cn(tmp_path):
    (tmp_path / "captions.txt").write_text(
        "COCO_val2014_000000000001#0\t一只猫\nCOCO_train2014_000000000002#0\t一条狗\n"
        "COCO_train2014_000000000002#1\t草地上的狗\nCOCO_val2014_000000000003#0\t不在测试集\n"
    )
    (tmp_path / "coco-cn_test.txt").write_text("COCO_val2014_000000000001\nCOCO_train2014_000000000002\n")
    cfg = data_cfg(
        format="id_tsv",
        root=str(tmp_path),
        image_root="/coco",
        captions={"zh": ["captions.txt"]},
        split_file="coco-cn_test.txt",
        image_template="{coco_split}/{id}.jpg",
    )
    rset = load_retrieval_set(cfg, "zh")
    assert rset.images == [
        Path("/coco/val2014/COCO_val2014_000000000001.jpg"),
        Path("/coco/train2014/COCO_train2014_000000000002.jpg"),
    ]
    assert rset.img2txt == [[0], [1, 2]] and rset.texts == ["一只猫", "一条狗", "草地上的狗"]


def test_xm3600_format(tmp_path):
    records = [  # as released: image/key and image/locale beside the languages
        {
            "image/key": "00a1",
            "image/locale": "sw",
            "en": {"caption": ["a bus", "a red bus"]},
            "sw": {"caption": ["basi"]},
        },
        {
            "image/key": "00b2",
            "image/locale": "en",
            "en": {"caption": ["a tree"]},
            "sw": {"caption": ["mti"]},
        },
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    cfg = data_cfg(format="xm3600", root=str(tmp_path))
    assert available_languages(cfg) == ["en", "sw"]
    rset = load_retrieval_set(cfg, "en")
    assert rset.images[0] == tmp_path / "images" / "00a1.jpg" and rset.img2txt == [[0, 1], [2]]
    with pytest.raises(DataError, match=r"unknown language 'xx' for XM3600 \(.* has en, sw\)"):
        load_retrieval_set(cfg, "xx")


def write_heldout(folder: Path, lang: str, captions: dict[str, list[str]]) -> None:
    folder.mkdir(parents=True)
    with open(folder / "retrieval.jsonl", "w", encoding="utf-8") as f:
        for i, (image_id, caps) in enumerate(captions.items()):
            write_image(folder / "images" / f"{image_id}.jpg", colour=(40 * i, 100, 100))
            f.write(
                json.dumps(
                    {"image": f"images/{image_id}.jpg", "image_id": image_id, "captions": {lang: caps}}
                )
            )
            f.write("\n")


def test_demo_world_heldout_folders(tmp_path):
    write_heldout(tmp_path / "heldout" / "en", "en", {"h1": ["a red circle"], "h2": ["a blue square"]})
    write_heldout(
        tmp_path / "heldout" / "de", "de", {"h1": ["ein roter Kreis"], "h2": ["ein blaues Quadrat"]}
    )
    sets = load_heldout_sets({"world": str(tmp_path / "heldout")})
    assert [s.lang for s in sets["world"]] == ["de", "en"]
    de = sets["world"][0]
    assert de.texts == ["ein roter Kreis", "ein blaues Quadrat"]
    assert de.images[1] == tmp_path / "heldout" / "de" / "images" / "h2.jpg" and de.images[1].exists()
    only_en = load_retrieval_set(data_cfg(format="demo_world", root=str(tmp_path / "heldout" / "en")), "en")
    assert only_en.image_ids == ["h1", "h2"]
    with pytest.raises(DataError, match=r"unknown language 'fr' for .*heldout \(it has de, en\)"):
        load_retrieval_set(data_cfg(format="demo_world", root=str(tmp_path / "heldout")), "fr")
    with pytest.raises(FileNotFoundError, match="no retrieval.jsonl"):
        load_heldout_sets({"missing": str(tmp_path)})


def test_xflickrco_and_wit_through_the_iglue_readers(iglue_dir):
    cfg = data_cfg(
        format="python",
        loader="cclm.tasks.iglue_retrieval:load_xflickrco",
        root=str(iglue_dir / "xFlickrCO" / "annotations"),
        captions={"de": ["de/test.jsonl"]},
        options={"image_roots": {"flickr30k": "/f", "coco": "/c"}},
    )
    rset = load_retrieval_set(cfg, "de")
    # Independent count: distinct img_path and every sentence, blank ones too (one of de's is ""): IGLUE scores
    # every line of its files.
    captions: dict[str, list[str]] = {}
    for line in (iglue_dir / "xFlickrCO" / "annotations" / "de" / "test.jsonl").read_text().splitlines():
        record = json.loads(line)
        captions.setdefault(record["img_path"], []).extend(record["sentences"])
    usable = captions
    assert "" in rset.texts and (len(rset.images), len(rset.texts)) == (2000, 2000)
    assert len(rset.images) == len(usable) and len(rset.texts) == sum(len(c) for c in usable.values())
    assert sum(str(p).startswith("/c/COCO_") for p in rset.images) == sum(
        p.startswith("COCO_") for p in usable
    )
    assert sum(str(p).startswith("/f/") for p in rset.images) == sum(
        not p.startswith("COCO_") for p in usable
    )
    assert len(set(rset.image_ids)) == len(rset.images)
    wit = data_cfg(
        format="python",
        loader="cclm.tasks.iglue_retrieval:load_wit",
        root=str(iglue_dir / "wit" / "annotations"),
        captions={"ja": ["test_ja.jsonl"]},
        options={"image_roots": {"wit": "/w"}},
    )
    wit_set = load_retrieval_set(wit, "ja")
    # IGLUE keys WIT's images on wit_ix: lines showing the same picture are one image with several captions
    assert len(wit_set.texts) == 1000 and len(wit_set.images) == 842


def test_evaluate_retrieval_and_fine_tuning_read_every_iglue_retrieval_test_file_alike(iglue_dir):
    """``cclm evaluate retrieval`` (configs/eval/{xflickrco,wit}.yaml) and the fine-tuning tasks' scoring give
    one test file the same images and captions, blank captions included (xFlickr&CO de, WIT el and id)."""
    roots = {"wit": "/w", "flickr30k": "/f", "coco": "/c"}
    files = [
        ("xflickrco", path, path.parent.name)
        for path in sorted(iglue_dir.glob("xFlickrCO/annotations/*/test.jsonl"))
    ]
    files += [
        ("wit", path, path.stem.split("_")[1])
        for path in sorted(iglue_dir.glob("wit/annotations/test_*.jsonl"))
    ]
    assert len(files) >= 19, files
    loaders = {"xflickrco": iglue_retrieval.load_xflickrco, "wit": iglue_retrieval.load_wit}
    for task, path, lang in files:
        cfg = SimpleNamespace(image_roots=roots, max_examples=0, duplicate_images="iglue")
        suite = TaskSuite(task, cfg, env=DistEnv(0, 1, 0, torch.device("cpu")))
        scored = to_retrieval_set(suite.read(str(path)), roots)
        options = {"image_roots": roots, "duplicate_images": "iglue"}
        evaluated = loaders[task](
            SimpleNamespace(root=str(path.parent), captions={lang: [path.name]}, options=options), lang
        )
        where = f"{task} {path.name} ({lang})"
        assert [str(p) for p in evaluated.images] == [str(p) for p in scored.images], where
        assert evaluated.texts == scored.texts and evaluated.txt2img == scored.txt2img, where


def test_load_image_and_bad_images(tmp_path):
    image = load_image(write_image(tmp_path / "a.png", size=(50, 20)), 16)
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
    assert image[0].float().mean() == pytest.approx(200, abs=2) and image[1].float().mean() == pytest.approx(
        30, abs=2
    )
    # The whole image is resized (no crop): the blue right quarter of a wide photo is still there.
    wide = Image.new("RGB", (800, 200), (200, 30, 30))
    wide.paste((20, 20, 220), (600, 0, 800, 200))
    wide.save(tmp_path / "wide.jpg", quality=95)
    squashed = load_image(tmp_path / "wide.jpg", 16)
    assert squashed.shape == (3, 16, 16)
    assert squashed[2, :, -1].float().mean() > 180 and squashed[0, :, 0].float().mean() > 180
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot decode image .*broken.jpg"):
        load_image(tmp_path / "broken.jpg", 16)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg", 16)


def test_retrieval_set_checks_folds_and_results(tmp_path):
    entries = [(f"{i}.jpg", str(i), [f"caption {i}"] * (1 + i % 2)) for i in range(6)]
    entries.append(("6.jpg", "6", ["", "  "]))  # no usable caption: skipped with a warning
    rset = RetrievalSet.from_entries("toy", "en", entries)
    assert len(rset.images) == 6 and len(rset.texts) == 9
    folds = rset.folds(3)
    assert [f.image_ids for f in folds] == [["0", "1"], ["2", "3"], ["4", "5"]]
    assert folds[1].img2txt == [[0], [1, 2]] and folds[1].texts == ["caption 2", "caption 3", "caption 3"]
    with pytest.raises(ValueError, match="equal folds"):
        rset.folds(4)
    with pytest.raises(ValueError, match="has no caption"):
        RetrievalSet("bad", "en", ["a.jpg", "b.jpg"], ["x"], [0], [[0], []])
    with pytest.raises(ValueError, match="txt2img is not"):
        RetrievalSet("bad", "en", ["a.jpg", "b.jpg"], ["x", "y"], [0, 0], [[0], [1]])
    write_results(tmp_path / "out", "toy", {"en": {"txt_r1": 12.5, "r_mean": 40.0}})
    json_path, csv_path = tmp_path / "out" / "toy.json", tmp_path / "out" / "toy.csv"
    assert json.loads(json_path.read_text()) == {"en": {"txt_r1": 12.5, "r_mean": 40.0}}
    assert csv_path.read_text().splitlines() == ["language,txt_r1,r_mean", "en,12.50,40.00"]
    assert "| en | 12.50 | 40.00 |" in (tmp_path / "out" / "toy.md").read_text()
