"""Every converter: input -> shards -> pipeline gives back the same texts, languages and pixels (within JPEG
re-encode tolerance), counts equal sizes.json; options (split, dedup, filter, shard size); clear errors."""

from __future__ import annotations

import base64
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from cclm.cli import main as cclm_main
from cclm.config import DataConfig, from_dict
from cclm.data.pipeline import PretrainData
from cclm.data.shards import expand_shards, iter_tar_samples


def picture(i: int, size=(60, 44)) -> Image.Image:
    x = np.linspace(0, 1, size[0])[None, :, None]
    y = np.linspace(0, 1, size[1])[:, None, None]
    base = np.array([(41 * i) % 200, (67 * i) % 200, (29 * i + 50) % 200], dtype=float)[None, None, :]
    return Image.fromarray(np.clip(base + 50 * x + 40 * y, 0, 255).astype(np.uint8))


def reference_pixels(img: Image.Image, size: int = 24) -> np.ndarray:
    """What the evaluation transform (PretrainData(train=False)) makes of it: the whole image, resized."""
    return np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))


def prep(*args) -> int:
    return cclm_main(["prep", *map(str, args), "--no-progress"])


def read_back(shards, tokenizer, view="image") -> dict[str, dict]:
    key = "image_caption" if view == "image" else "parallel_text"
    cfg = from_dict(
        DataConfig,
        {
            key: {"shards": str(shards), "batch_size": 4},
            "num_workers": 0,
            "sample_shuffle_buffer": 0,
            "shard_shuffle": False,
        },
    )
    data = PretrainData(cfg, tokenizer, 32, image_size=24, train=False, epochs=1)
    out = {}
    while True:
        try:
            batch = data.next_batch(view)
        except StopIteration:
            break
        for i, k in enumerate(batch["keys"]):
            out[k] = {"text": batch["texts"][i], "lang": batch["langs"][i]}
            if view == "image":
                out[k]["pixels"] = batch["images"][i].permute(1, 2, 0).numpy()
            else:
                out[k]["other"], out[k]["other_lang"] = batch["other_texts"][i], batch["other_langs"][i]
    assert data.skip_counts() == {}
    return out


def raw_json(folder) -> dict[str, dict]:
    return {
        s["__key__"]: json.loads(s["json"])
        for url in expand_shards(str(folder))
        for s in iter_tar_samples(url)
    }


def sizes_total(folder) -> int:
    return sum(json.loads((folder / "sizes.json").read_text()).values())


def close(a: np.ndarray, b: np.ndarray, tol: float = 5.0) -> bool:
    return float(np.abs(a.astype(int) - b.astype(int)).mean()) < tol


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i in range(6):
        picture(i).save(root / "sub" / f"im{i}.jpg", quality=95)
    picture(6).save(root / "im6.png")
    return root


def test_image_caption_tsv_round_trip(tmp_path, image_folder, tiny_tokenizer):
    rows = [f"sub/im{i}.jpg\tcaption {i} in English\ten" for i in range(6)]
    rows += ["sub/im0.jpg\tBildunterschrift null\tde", "im6\t画像の説明\tja", "missing.jpg\tlost\ten"]
    (tmp_path / "c.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert (
        prep(
            "image-caption",
            "--input",
            tmp_path / "c.tsv",
            "--image-root",
            image_folder,
            "--out",
            out,
            "--shard-samples",
            3,
            "--num-workers",
            2,
        )
        == 0
    )
    assert sizes_total(out) == 7 and len(list(out.glob("*.tar"))) == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == {"missing_image": 1} and manifest["languages"] == {
        "de": 1,
        "en": 6,
        "ja": 1,
    }
    meta = raw_json(out)
    assert meta["sub_im0"]["captions"] == {"en": ["caption 0 in English"], "de": ["Bildunterschrift null"]}
    assert meta["im6"]["captions"] == {"ja": ["画像の説明"]}
    back = read_back(out, tiny_tokenizer)
    assert len(back) == 7
    for i in range(6):
        sample = back[f"sub_im{i}"]
        assert (sample["lang"], sample["text"]) in {
            (lang, t) for lang, ts in meta[f"sub_im{i}"]["captions"].items() for t in ts
        }
        assert close(sample["pixels"], reference_pixels(picture(i)))
    assert close(back["im6"]["pixels"], reference_pixels(picture(6)))  # PNG re-encoded to JPEG


def test_image_caption_csv_with_header_and_jsonl_resize(tmp_path, image_folder, tiny_tokenizer):
    (tmp_path / "c.csv").write_text('caption,image\n"a, quoted caption",sub/im1.jpg\n', encoding="utf-8")
    assert (
        prep(
            "image-caption",
            "--input",
            tmp_path / "c.csv",
            "--image-root",
            image_folder,
            "--out",
            tmp_path / "o1",
            "--lang",
            "fr",
        )
        == 0
    )
    assert raw_json(tmp_path / "o1") == {"sub_im1": {"captions": {"fr": ["a, quoted caption"]}}}
    lines = [
        {"image": "sub/im2.jpg", "caption": "zwei", "lang": "de"},
        {"image": "sub/im3.jpg", "caption": ""},
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    assert (
        prep(
            "image-caption",
            "--input",
            tmp_path / "c.jsonl",
            "--image-root",
            image_folder,
            "--out",
            tmp_path / "o2",
            "--max-side",
            30,
        )
        == 0
    )
    url = expand_shards(str(tmp_path / "o2"))[0]
    (sample,) = list(iter_tar_samples(url))
    assert max(Image.open(io.BytesIO(sample["jpg"])).size) == 30
    back = read_back(tmp_path / "o2", tiny_tokenizer)
    assert len(back) == sizes_total(tmp_path / "o2") == 1
    assert back["sub_im2"]["text"] == "zwei" and back["sub_im2"]["lang"] == "de"
    assert close(back["sub_im2"]["pixels"], reference_pixels(picture(2)), tol=8)
    assert json.loads((tmp_path / "o2" / "manifest.json").read_text())["skipped"] == {
        "caption_empty": 1,
        "no_caption": 1,
    }


def test_cclm_jsonl_base64_and_paths(tmp_path, image_folder, tiny_tokenizer):
    buffer = io.BytesIO()
    picture(4).save(buffer, format="JPEG", quality=95)
    lines = [
        {
            "binary": base64.b64encode(buffer.getvalue()).decode(),
            "caption": {"en": "four", "zh": "四"},
            "image_id": "b4",
        },
        {"image": "sub/im5.jpg", "caption": ["five", "5"], "lang": "es"},
        {"binary": "@@not base64@@", "caption": "x"},
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines))
    out = tmp_path / "out"
    assert (
        prep("cclm-jsonl", "--input", tmp_path / "c.jsonl", "--image-root", image_folder, "--out", out) == 0
    )
    meta = raw_json(out)
    assert sorted((c["captions"] for c in meta.values()), key=str) == sorted(
        [{"en": ["four"], "zh": ["四"]}, {"es": ["five", "5"]}], key=str
    )
    back = read_back(out, tiny_tokenizer)
    assert len(back) == sizes_total(out) == 2
    b4 = next(v for k, v in back.items() if k.endswith("b4"))
    assert close(b4["pixels"], reference_pixels(picture(4)))
    assert json.loads((out / "manifest.json").read_text())["skipped"] == {"bad_image": 1}


def test_rekey_img2dataset_webdataset(tmp_path, tiny_tokenizer):
    src = tmp_path / "wds"
    src.mkdir()
    with tarfile.open(src / "00000.tar", "w") as tar:
        for i in range(3):
            buffer = io.BytesIO()
            picture(i).save(buffer, format="JPEG", quality=95)
            members = {
                "jpg": buffer.getvalue(),
                "txt": f"Bild {i}".encode(),
                "json": json.dumps({"url": f"http://x/{i}", "caption": f"Bild {i}"}).encode(),
            }
            for ext, data in members.items():
                info = tarfile.TarInfo(f"0000{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    assert prep("rekey-wds", "--shards", src / "00000.tar", "--lang", "de", "--out", out) == 0
    back = read_back(out, tiny_tokenizer)
    assert len(back) == sizes_total(out) == 3
    assert sorted((v["text"], v["lang"]) for v in back.values()) == [(f"Bild {i}", "de") for i in range(3)]
    assert close(back["00000_00001"]["pixels"], reference_pixels(picture(1)))


def test_parallel_converters_round_trip(tmp_path, tiny_tokenizer):
    (tmp_path / "p.tsv").write_text("hello\thallo\n\nworld\tWelt\nonly source\n", encoding="utf-8")
    assert (
        prep(
            "parallel-tsv",
            "--input",
            tmp_path / "p.tsv",
            "--src-lang",
            "en",
            "--tgt-lang",
            "de",
            "--out",
            tmp_path / "t",
        )
        == 0
    )
    back = read_back(tmp_path / "t", tiny_tokenizer, "text")
    assert len(back) == sizes_total(tmp_path / "t") == 2
    assert sorted((v["text"], v["lang"], v["other"], v["other_lang"]) for v in back.values()) == [
        ("hello", "en", "hallo", "de"),
        ("world", "en", "Welt", "de"),
    ]
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["skipped"] == {"empty_text": 1}

    (tmp_path / "corpus.en").write_text("a cat\na dog\n", encoding="utf-8")
    (tmp_path / "corpus.fr").write_text("un chat\nun chien\n", encoding="utf-8")
    assert (
        prep(
            "parallel-moses",
            "--src",
            tmp_path / "corpus.en",
            "--tgt",
            tmp_path / "corpus.fr",
            "--out",
            tmp_path / "m",
        )
        == 0
    )
    assert sorted(
        (v["text"], v["other"], v["other_lang"])
        for v in read_back(tmp_path / "m", tiny_tokenizer, "text").values()
    ) == [("a cat", "un chat", "fr"), ("a dog", "un chien", "fr")]

    lines = [
        {"source_text": "one", "target_text": "一", "source_lang": "en", "target_lang": "ja"},
        {"source_text": "two", "target_text": "二"},
        {"source_text": "x", "target_text": "y", "target_lang": "zz"},
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines))
    assert (
        prep(
            "parallel-jsonl",
            "--input",
            tmp_path / "p.jsonl",
            "--src-lang",
            "en",
            "--tgt-lang",
            "zh",
            "--out",
            tmp_path / "j",
        )
        == 0
    )
    back = read_back(tmp_path / "j", tiny_tokenizer, "text")
    assert sorted((v["other"], v["other_lang"]) for v in back.values()) == [("一", "ja"), ("二", "zh")]
    assert sizes_total(tmp_path / "j") == 2


def test_split_dedup_and_language_filter(tmp_path):
    rows = [f"sentence {i % 150}\tSatz {i % 150}" for i in range(200)]  # 50 exact duplicates
    (tmp_path / "p.tsv").write_text("\n".join(rows) + "\n")
    args = [
        "parallel-tsv",
        "--input",
        tmp_path / "p.tsv",
        "--src-lang",
        "en",
        "--tgt-lang",
        "de",
        "--dedup",
        "--val-fraction",
        "0.2",
        "--shard-samples",
        40,
    ]
    assert prep(*args, "--out", tmp_path / "a") == 0 and prep(*args, "--out", tmp_path / "b") == 0
    train, val = raw_json(tmp_path / "a" / "train"), raw_json(tmp_path / "a" / "val")
    assert len(train) + len(val) == 150 and 10 < len(val) < 55
    assert not {v["src"] for v in train.values()} & {v["src"] for v in val.values()}
    assert raw_json(tmp_path / "b" / "val") == val  # deterministic
    assert json.loads((tmp_path / "a" / "train" / "manifest.json").read_text())["skipped"] == {
        "duplicate": 50
    }
    assert (
        prep(
            "parallel-tsv",
            "--input",
            tmp_path / "p.tsv",
            "--src-lang",
            "en",
            "--tgt-lang",
            "de",
            "--languages",
            "en,fr",
            "--out",
            tmp_path / "c",
        )
        == 0
    )
    assert sizes_total(tmp_path / "c") == 0


def test_bad_inputs_fail_clearly(tmp_path, capsys):
    assert (
        prep(
            "parallel-tsv",
            "--input",
            tmp_path / "nope.tsv",
            "--src-lang",
            "en",
            "--tgt-lang",
            "de",
            "--out",
            tmp_path / "o",
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty.tsv").write_text("")
    assert (
        prep(
            "parallel-tsv",
            "--input",
            tmp_path / "empty.tsv",
            "--src-lang",
            "en",
            "--tgt-lang",
            "de",
            "--out",
            tmp_path / "o",
        )
        == 2
    )
    assert "is empty" in capsys.readouterr().err
    (tmp_path / "a.en").write_text("1\n2\n")
    (tmp_path / "a.de").write_text("1\n")
    assert (
        prep(
            "parallel-moses", "--src", tmp_path / "a.en", "--tgt", tmp_path / "a.de", "--out", tmp_path / "m"
        )
        == 2
    )
    assert "not aligned" in capsys.readouterr().err
    assert prep("rekey-wds", "--shards", tmp_path / "none-{0..3}.tar", "--out", tmp_path / "r") == 2
    assert "does not exist" in capsys.readouterr().err
    assert (
        prep(
            "parallel-tsv",
            "--input",
            tmp_path / "a.en",
            "--src-lang",
            "english",
            "--tgt-lang",
            "de",
            "--out",
            tmp_path / "x",
        )
        == 2
    )
    assert "unknown or missing language" in capsys.readouterr().err


def test_a_malformed_jsonl_line_stops_a_table_but_is_a_counted_skip_in_a_cclm_dump(
    tmp_path, image_folder, capsys
):
    # Tables and parallel jsonl: the project-wide reader's policy, an error naming file:line.
    (tmp_path / "p.jsonl").write_text('{"source_text": "one", "target_text": "eins"}\n{"source_text": \n')
    assert prep("parallel-jsonl", "--input", tmp_path / "p.jsonl", "--out", tmp_path / "p") == 2
    assert f"{tmp_path / 'p.jsonl'}:2: malformed JSON" in capsys.readouterr().err
    (tmp_path / "t.jsonl").write_text('{"image": "sub/im1.jpg", "caption": "one"}\n["not", "an", "object"]\n')
    assert (
        prep(
            "image-caption",
            "--input",
            tmp_path / "t.jsonl",
            "--image-root",
            image_folder,
            "--out",
            tmp_path / "t",
        )
        == 2
    )
    assert f"{tmp_path / 't.jsonl'}:2: expected a JSON object" in capsys.readouterr().err
    # A CCLM-style dump (often scraped, with base64 images): one broken record is skipped and counted.
    lines = ['{"image": "sub/im1.jpg", "caption": "one"}', '{"image": "sub/im2.jp', "[1, 2]", ""]
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    out = tmp_path / "c"
    assert (
        prep("cclm-jsonl", "--input", tmp_path / "c.jsonl", "--image-root", image_folder, "--out", out) == 0
    )
    assert sizes_total(out) == 1
    assert json.loads((out / "manifest.json").read_text())["skipped"] == {"bad_json": 2}
