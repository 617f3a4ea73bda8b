"""``cclm prep cc3m|sbu|uc2|wikimatrix|opus`` on small files written in each publisher's exact layout: what comes
out (texts, languages, sides), what is skipped and why (counted exactly), and wrong layouts refused."""

from __future__ import annotations

import csv
import gzip
import io
import json
import tarfile
import zipfile

import pytest

from tests.test_prep_converters import picture, prep, raw_json, read_back


def jpeg(i: int) -> bytes:
    buffer = io.BytesIO()
    picture(i).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def img2dataset_folder(folder, samples: list[dict], failed: int = 0):
    """What ``img2dataset --output_format webdataset`` leaves: 00000.tar ({key}.jpg/.txt/.json, json with
    indent=4), 00000.parquet and 00000_stats.json. ``samples``: {"url", "caption", "image": bytes}."""
    folder.mkdir(parents=True)
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i, sample in enumerate(samples):
            key = f"{i:09d}"
            meta = {"url": sample["url"], "caption": sample["caption"], "key": key, "status": "success"}
            meta.update({"error_message": None, "width": 60, "height": 44})
            for ext, data in (
                ("jpg", sample["image"]),
                ("txt", sample["caption"].encode()),
                ("json", json.dumps(meta, indent=4).encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (folder / "00000.parquet").write_bytes(b"PAR1 not read")
    stats = {"count": len(samples) + failed, "successes": len(samples), "failed_to_download": failed}
    stats.update({"failed_to_resize": 0, "duration": 1.0, "status_dict": {"success": len(samples)}})
    (folder / "00000_stats.json").write_text(json.dumps(stats, indent=4))
    return folder


def manifest(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())


# ------------------------------------------------------------------------------------------------ CC3M / SBU
@pytest.mark.parametrize("corpus", ["cc3m", "sbu"])
def test_web_corpus_from_img2dataset(tmp_path, capsys, corpus):
    captions = ["actor attends the premiere of the film .", "a dog on the beach", "a red bus"]
    samples = [{"url": f"http://x/{i}.jpg", "caption": c, "image": jpeg(i)} for i, c in enumerate(captions)]
    samples[2]["image"] = b"not a jpeg"
    src = img2dataset_folder(tmp_path / "dl", samples, failed=2)
    out = tmp_path / "shards"
    assert prep(corpus, "--img2dataset", src, "--out", out) == 0
    printed = capsys.readouterr().out
    assert "img2dataset: 3 of 5 urls downloaded (2 failed to download, 0 to resize)" in printed
    assert "skipped: bad_image=1" in printed
    back = raw_json(out)
    assert back == {
        "00000_000000000": {"captions": {"en": [captions[0]]}},
        "00000_000000001": {"captions": {"en": [captions[1]]}},
    }
    assert manifest(out)["skipped"] == {"bad_image": 1} and manifest(out)["languages"] == {"en": 2}
    pooled = tmp_path / "pooled"  # worker processes read the shards lazily and give the same shards
    assert prep(corpus, "--img2dataset", src, "--out", pooled, "--num-workers", "2") == 0
    assert raw_json(pooled) == back and manifest(pooled)["skipped"] == {"bad_image": 1}


def test_web_corpus_refuses_other_img2dataset_formats(tmp_path, capsys):
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "00000.parquet").write_bytes(b"PAR1")
    assert prep("cc3m", "--img2dataset", tmp_path / "dl", "--out", tmp_path / "o") == 2
    assert "--output_format webdataset" in capsys.readouterr().err
    assert prep("sbu", "--img2dataset", tmp_path / "none", "--out", tmp_path / "o") == 2
    assert "is not a folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------- UC2
def uc2_translations(folder) -> None:
    """UC2's files as its utils/ms_internal_mt.py writes them: csv.writer(delimiter="\\t") rows of
    image_id, url, caption, status -- one file per split and language, beside the English source file."""
    folder.mkdir()
    rows = {
        "train_imageId2Ann.tsv": [["0", "http://x/0.jpg", "a dog", "success"]],  # English: the shard has it
        "train_imageId2Ann_de.tsv": [
            ["0", "http://x/0.jpg", "ein Hund", "success"],
            ["1", "http://x/1.jpg", "", "fail"],  # failed translation
            ["2", "http://x/2.jpg", 'ein "Zitat"\tmit Tab', "success"],  # quoted by csv.writer
            ["9", "http://x/9.jpg", "nie heruntergeladen", "success"],  # an image img2dataset could not get
            ["bad row"],
        ],
        "train_imageId2Ann_zh.tsv": [
            ["0", "http://x/0.jpg", "一只狗", "success"],
            ["2", "http://x/2.jpg", "引\n用", "success"],  # a line break, quoted by csv.writer
        ],
        "val_imageId2Ann_de.tsv": [["0", "http://x/0.jpg", "anderer Split", "success"]],
    }
    for name, table in rows.items():
        with open(folder / name, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle, delimiter="\t").writerows(table)


def test_uc2_joins_translations_by_url(tmp_path, capsys, tiny_tokenizer):
    captions = ["a dog", "a cat", "a quote"]
    samples = [{"url": f"http://x/{i}.jpg", "caption": c, "image": jpeg(i)} for i, c in enumerate(captions)]
    src = img2dataset_folder(tmp_path / "dl", samples)
    uc2_translations(tmp_path / "uc2")
    out = tmp_path / "shards"
    assert prep("uc2", "--img2dataset", src, "--translations", tmp_path / "uc2", "--out", out) == 0
    assert "uc2 translations loaded: {'de': 3, 'zh': 2}" in capsys.readouterr().out
    assert raw_json(out) == {
        "00000_000000000": {"captions": {"en": ["a dog"], "de": ["ein Hund"], "zh": ["一只狗"]}},
        "00000_000000001": {"captions": {"en": ["a cat"]}},
        "00000_000000002": {
            "captions": {"en": ["a quote"], "de": ['ein "Zitat"\tmit Tab'], "zh": ["引\n用"]}
        },
    }
    assert manifest(out)["skipped"] == {"translation_failed": 1, "translation_bad_row": 1}
    assert manifest(out)["languages"] == {"en": 3, "de": 2, "zh": 2}
    pooled = tmp_path / "pooled"  # the join runs in the pool's reading thread: same shards
    args = ["--img2dataset", src, "--translations", tmp_path / "uc2", "--out", pooled, "--num-workers", "2"]
    assert prep("uc2", *args) == 0
    assert raw_json(pooled) == raw_json(out) and manifest(pooled)["skipped"] == manifest(out)["skipped"]
    back = read_back(out, tiny_tokenizer)  # the training pipeline streams the joined samples
    assert len(back) == 3 and {v["lang"] for v in back.values()} <= {"en", "de", "zh"}

    dropped = tmp_path / "dropped"
    assert (
        prep(
            "uc2",
            "--img2dataset",
            src,
            "--translations",
            tmp_path / "uc2",
            "--out",
            dropped,
            "--drop-untranslated",
        )
        == 0
    )
    assert sorted(raw_json(dropped)) == ["00000_000000000", "00000_000000002"]
    assert manifest(dropped)["skipped"]["no_translation"] == 1

    german = tmp_path / "german"
    assert (
        prep(
            "uc2",
            "--img2dataset",
            src,
            "--translations",
            tmp_path / "uc2",
            "--out",
            german,
            "--languages",
            "de",
        )
        == 0
    )
    assert {k: v["captions"] for k, v in raw_json(german).items()} == {
        "00000_000000000": {"de": ["ein Hund"]},
        "00000_000000002": {"de": ['ein "Zitat"\tmit Tab']},
    }
    assert manifest(german)["skipped"] == {
        "filtered_language": 1,
        "translation_failed": 1,
        "translation_bad_row": 1,
    }


def test_uc2_refuses_wrong_layouts(tmp_path, capsys):
    src = img2dataset_folder(tmp_path / "dl", [{"url": "http://x/0.jpg", "caption": "a", "image": jpeg(0)}])
    (tmp_path / "uc2").mkdir()
    (tmp_path / "uc2" / "captions_de.txt").write_text("ein Hund\n")
    assert prep("uc2", "--img2dataset", src, "--translations", tmp_path / "uc2", "--out", tmp_path / "o") == 2
    assert "{split}_imageId2Ann_{lang}.tsv" in capsys.readouterr().err
    plain = tmp_path / "plain"  # rekey-style shards without img2dataset's json: nothing to join on
    plain.mkdir()
    with tarfile.open(plain / "00000.tar", "w") as tar:
        for ext, data in (("jpg", jpeg(0)), ("txt", b"a dog")):
            info = tarfile.TarInfo(f"000000000.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert (
        prep("uc2", "--img2dataset", plain, "--translations", tmp_path / "uc2", "--out", tmp_path / "o") == 2
    )
    assert "url" in capsys.readouterr().err
    assert not list((tmp_path / "o").glob("*.tar"))


# ------------------------------------------------------------------------------------------------ WikiMatrix
def write_gz(path, text: bytes) -> None:
    with gzip.open(path, "wb") as handle:
        handle.write(text)


def test_wikimatrix_threshold_caps_and_skips(tmp_path, capsys):
    # as released: WikiMatrix.<l1>-<l2>.tsv.gz, l1 < l2, columns score / l1 / l2, sorted by decreasing score
    lines = [
        "1.31\tHallo Welt\tHello world",
        "1.20\tGuten Morgen\tGood morning",
        "1.10\tDanke\tThanks",
        "1.04\tJa\tYes",  # exactly the threshold: kept
        "1.0399\tNein\tNo",
        "n/a\tKaputt\tBroken",
        "1.50\tnur zwei Spalten",
        "1.08\t\tempty German side",
    ]
    raw = ("\n".join(lines) + "\n").encode() + b"1.07\tbad \xff bytes\tx\n"
    write_gz(tmp_path / "WikiMatrix.de-en.tsv.gz", raw)
    (tmp_path / "WikiMatrix.en-fr.tsv").write_text("1.9\tcat\tchat\n1.2\tdog\tchien\n1.01\tno\tnon\n")
    out = tmp_path / "wm"
    args = ["--input", tmp_path / "WikiMatrix.de-en.tsv.gz", tmp_path / "WikiMatrix.en-fr.tsv", "--out", out]
    assert prep("wikimatrix", *args) == 0
    pairs = sorted((p["src_lang"], p["tgt_lang"], p["src"], p["tgt"]) for p in raw_json(out).values())
    assert pairs == [
        ("en", "de", "Good morning", "Guten Morgen"),
        ("en", "de", "Hello world", "Hallo Welt"),
        ("en", "de", "Thanks", "Danke"),
        ("en", "de", "Yes", "Ja"),
        ("en", "fr", "cat", "chat"),
        ("en", "fr", "dog", "chien"),
    ]
    expected = {"below_min_score": 2, "bad_score": 1, "bad_columns": 1, "empty_text": 1, "bad_utf8": 1}
    assert manifest(out)["skipped"] == expected

    capped = tmp_path / "capped"  # every pair capped at 3, de-en at 2: the highest scores stay
    args = [
        "--input",
        tmp_path / "WikiMatrix.de-en.tsv.gz",
        tmp_path / "WikiMatrix.en-fr.tsv",
        "--out",
        capped,
    ]
    assert prep("wikimatrix", *args, "--max-pairs", "3", "--max-pairs", "de-en=2", "--min-score", "1.1") == 0
    pairs = sorted((p["src"], p["tgt"]) for p in raw_json(capped).values())
    assert pairs == sorted(
        [("Hello world", "Hallo Welt"), ("Good morning", "Guten Morgen"), ("cat", "chat"), ("dog", "chien")]
    )
    # de-en: 1.31, 1.20 and 1.10 reach --min-score 1.1; the cap keeps the best 2
    assert manifest(capped)["skipped"]["over_pair_cap"] == 1
    as_filed = tmp_path / "as_filed"
    assert (
        prep("wikimatrix", "--input", tmp_path / "WikiMatrix.de-en.tsv.gz", "--out", as_filed, "--pivot", "")
        == 0
    )
    assert {(p["src_lang"], p["tgt_lang"]) for p in raw_json(as_filed).values()} == {("de", "en")}


def test_wikimatrix_cap_keeps_highest_scores_of_unsorted_input(tmp_path):
    (tmp_path / "WikiMatrix.en-es.tsv").write_text("1.1\ta\tA\n1.9\tb\tB\n1.2\tc\tC\n1.9\td\tD\n")
    out = tmp_path / "o"
    assert (
        prep("wikimatrix", "--input", tmp_path / "WikiMatrix.en-es.tsv", "--max-pairs", "2", "--out", out)
        == 0
    )
    assert sorted(p["src"] for p in raw_json(out).values()) == ["b", "d"]


def test_wikimatrix_refuses_wrong_layouts(tmp_path, capsys):
    (tmp_path / "WikiMatrix.de-en.de").write_text("Hallo\nWelt\n")  # a Moses side, not the scored TSV
    assert prep("wikimatrix", "--input", tmp_path / "WikiMatrix.de-en.de", "--out", tmp_path / "o") == 2
    assert "WikiMatrix.<l1>-<l2>.tsv.gz" in capsys.readouterr().err
    (tmp_path / "WikiMatrix.de-en.tsv").write_text("Hallo\tHello\n")
    assert prep("wikimatrix", "--input", tmp_path / "WikiMatrix.de-en.tsv", "--out", tmp_path / "o") == 2
    assert "score<TAB>l1 sentence<TAB>l2 sentence" in capsys.readouterr().err
    assert not list((tmp_path / "o").glob("*.tar"))
    (tmp_path / "WikiMatrix.de-en.tsv").write_text("1.2\tHallo\tHello\n")
    write_gz(tmp_path / "WikiMatrix.de-en.tsv.gz", b"1.3\tHallo\tHello\n")
    both = [tmp_path / "WikiMatrix.de-en.tsv", tmp_path / "WikiMatrix.de-en.tsv.gz"]
    assert prep("wikimatrix", "--input", *both, "--out", tmp_path / "o") == 2
    assert "same language pair" in capsys.readouterr().err
    assert (
        prep(
            "wikimatrix",
            "--input",
            tmp_path / "WikiMatrix.de-en.tsv",
            "--max-pairs",
            "x",
            "--out",
            tmp_path / "o",
        )
        == 2
    )
    assert "--max-pairs" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ OPUS
def test_opus_folders_and_zips(tmp_path, capsys):
    europarl = tmp_path / "de-en"  # statmt.org's de-en.tgz unpacked
    europarl.mkdir()
    (europarl / "europarl-v7.de-en.de").write_text("Guten Tag\nDanke\n\n", encoding="utf-8")
    (europarl / "europarl-v7.de-en.en").write_text("Good day\nThanks\nempty German\n", encoding="utf-8")
    (europarl / "README").write_text("not a side")
    with zipfile.ZipFile(tmp_path / "en-fr.txt.zip", "w") as archive:  # OPUS's moses download, as fetched
        archive.writestr("Europarl.en-fr.en", "Yes\nNo\n")
        archive.writestr("Europarl.en-fr.fr", "Oui\nNon\n")
        archive.writestr("Europarl.en-fr.ids", "a\tb\n")
        archive.writestr("LICENSE", "cc-by")
    out = tmp_path / "opus"
    assert prep("opus", "--input", europarl, tmp_path / "en-fr.txt.zip", "--out", out) == 0
    assert "moses pairs: Europarl.en-fr, europarl-v7.de-en" in capsys.readouterr().out
    pairs = sorted((p["src_lang"], p["tgt_lang"], p["src"], p["tgt"]) for p in raw_json(out).values())
    assert pairs == [
        ("en", "de", "Good day", "Guten Tag"),
        ("en", "de", "Thanks", "Danke"),
        ("en", "fr", "No", "Non"),
        ("en", "fr", "Yes", "Oui"),
    ]
    assert manifest(out)["skipped"] == {"empty_text": 1}


def test_opus_refuses_incomplete_or_unknown_layouts(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "Europarl.de-en.de").write_text("Hallo\n")
    assert prep("opus", "--input", tmp_path / "a", "--out", tmp_path / "o") == 2
    assert "Europarl.de-en.en is missing" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "corpus.txt").write_text("Hallo\n")
    assert prep("opus", "--input", tmp_path / "b", "--out", tmp_path / "o") == 2
    assert "<corpus>.<l1>-<l2>.<l1>" in capsys.readouterr().err
    (tmp_path / "a" / "Europarl.de-en.en").write_text("Hello\nextra line\n")
    assert prep("opus", "--input", tmp_path / "a", "--out", tmp_path / "o") == 2
    assert "not aligned" in capsys.readouterr().err
    assert not list((tmp_path / "o").glob("*.tar"))
