"""Converter faults a reviewer reproduced: long image names (a shard member name holds 100 characters), the lang
column of headerless tables, short rows of header tables, null captions in the tokenizer's shards, and
``wikimatrix --max-pairs l1-l2=0``."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from pathlib import Path

import pytest

from cclm.cli import main as cclm_main
from cclm.data.shards import VIEW_IMAGE_CAPTION, ShardSink, expand_shards, iter_tar_samples

from .test_image_caption_input import jpeg, manifest, prep, samples, table_run

LONG = "a" * 100  # two names sharing these 100 characters once lost one of them to the key's cut


def write_input_shard(
    path: Path, members: dict[str, dict[str, bytes]], tar_format=tarfile.DEFAULT_FORMAT
) -> None:
    """An img2dataset-style input shard: ``{key: {ext: bytes}}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tar_format) as tar:
        for key, files in members.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def member_names(out: Path) -> list[str]:
    names = []
    for url in expand_shards(str(out)):
        with tarfile.open(url) as tar:
            names += tar.getnames()
    return names


def captions(out: Path) -> list[dict]:
    return sorted((v["captions"] for v in samples(out).values()), key=json.dumps)


def assert_member_names_fit(out: Path) -> None:
    names = member_names(out)
    assert names and max(map(len, names)) <= 100, names


# ----------------------------------------------------------------------------------------- long image names
def test_image_caption_keeps_images_with_long_names_apart(tmp_path):
    names = [f"{LONG}_one.jpg", f"{LONG}_two.jpg", "b" * 104 + ".jpg", "short.jpg"]
    text = "".join(f"{n}\tcaption of {n[-12:]}\n" for n in names)
    rc, out = table_run(tmp_path, "t.tsv", text, {n: jpeg() for n in names})
    assert rc == 0
    assert captions(out) == sorted(({"en": [f"caption of {n[-12:]}"]} for n in names), key=json.dumps)
    assert "short" in samples(out)  # a short name keeps its readable key
    assert_member_names_fit(out)


def test_cclm_jsonl_keeps_records_with_long_image_ids_apart(tmp_path):
    image = base64.b64encode(jpeg()).decode()
    ids = [f"{LONG}_one", f"{LONG}_two", "c" * 200]
    dump = tmp_path / "dump.jsonl"
    dump.write_text(
        "".join(json.dumps({"binary": image, "caption": i[-8:], "image_id": i}) + "\n" for i in ids)
    )
    out = tmp_path / "out"
    assert prep("cclm-jsonl", "--input", dump, "--out", out) == 0
    assert captions(out) == sorted(({"en": [i[-8:]]} for i in ids), key=json.dumps)
    assert_member_names_fit(out)


def test_rekey_wds_keeps_samples_with_long_keys_apart(tmp_path):
    members = {key: {"jpg": jpeg(), "txt": key[-3:].encode()} for key in (f"{LONG}_one", f"{LONG}_two")}
    write_input_shard(tmp_path / "in" / "shard-000000.tar", members, tarfile.GNU_FORMAT)  # GNU: long names
    out = tmp_path / "out"
    assert prep("rekey-wds", "--shards", tmp_path / "in", "--out", out) == 0
    assert captions(out) == [{"en": ["one"]}, {"en": ["two"]}]
    assert_member_names_fit(out)


# ------------------------------------------------------------------------------------------------ tables
def test_each_row_of_a_headerless_table_has_its_own_language(tmp_path):
    text = "a.jpg\tA dog on grass\nb.jpg\tEin Hund im Gras\tde\nc.jpg\tUn chien\tfr\nd.jpg\tA cat\n"
    rc, out = table_run(tmp_path, "t.tsv", text, {n: jpeg() for n in ("a.jpg", "b.jpg", "c.jpg", "d.jpg")})
    assert rc == 0
    assert {k: v["captions"] for k, v in samples(out).items()} == {
        "a": {"en": ["A dog on grass"]},
        "b": {"de": ["Ein Hund im Gras"]},
        "c": {"fr": ["Un chien"]},
        "d": {"en": ["A cat"]},
    }


@pytest.mark.parametrize("fmt, sep", [("tsv", "\t"), ("csv", ",")])
def test_a_short_row_of_a_header_table_is_a_counted_skip_naming_its_line(tmp_path, caplog, fmt, sep):
    text = f"caption{sep}image\nA dog{sep}a.jpg\nno image column here\nA cat{sep}b.jpg\n"
    rc, out = table_run(tmp_path, f"t.{fmt}", text, {"a.jpg": jpeg(), "b.jpg": jpeg()})
    assert rc == 0
    assert {k: v["captions"] for k, v in samples(out).items()} == {
        "a": {"en": ["A dog"]},
        "b": {"en": ["A cat"]},
    }
    assert manifest(out)["skipped"] == {"missing_image": 1}
    assert any(f"t.{fmt}:3: a row without an image name" in r.message for r in caplog.records)


def test_a_short_row_without_its_caption_is_an_empty_caption(tmp_path):
    rc, out = table_run(
        tmp_path, "t.tsv", "image\tcaption\na.jpg\tA dog\nb.jpg\n", {"a.jpg": jpeg(), "b.jpg": jpeg()}
    )
    assert rc == 0 and list(samples(out)) == ["a"]
    assert manifest(out)["skipped"] == {"caption_empty": 1, "no_caption": 1}


# --------------------------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("value, shown", [(None, "null"), (3, "3"), ({"a": "b"}, '{"a": "b"}')])
def test_tokenizer_refuses_a_caption_that_is_not_text_naming_shard_and_sample(tmp_path, capsys, value, shown):
    with ShardSink(tmp_path / "s", VIEW_IMAGE_CAPTION) as sink:
        sink.write("k0", {"json": b'{"captions": {"en": ["fine"]}}'})
        sink.write("k1", {"json": json.dumps({"captions": {"en": value}}).encode()})
        sink.close()
    assert (
        cclm_main(["prep", "tokenizer", "--shards", str(tmp_path / "s"), "--out", str(tmp_path / "tok")]) == 2
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"shard-000000.tar: sample k1: its caption 'en' is {shown}, not a text or a list of texts" in err
    assert not (tmp_path / "tok").exists()


# -------------------------------------------------------------------------------------------- wikimatrix
@pytest.mark.parametrize("cap", ["0", "de-en=0"])
def test_wikimatrix_max_pairs_0_keeps_no_pair(tmp_path, cap):
    (tmp_path / "WikiMatrix.de-en.tsv").write_text("1.2\tHallo Welt\tHello world\n1.1\tGuten Tag\tGood day\n")
    (tmp_path / "WikiMatrix.en-fr.tsv").write_text("1.9\tcat\tchat\n")
    out = tmp_path / "out"
    inputs = [tmp_path / "WikiMatrix.de-en.tsv", tmp_path / "WikiMatrix.en-fr.tsv"]
    assert (
        prep("wikimatrix", "--input", *inputs, "--max-pairs", cap, "--max-pairs", "en-fr=5", "--out", out)
        == 0
    )
    written = [json.loads(s["json"]) for url in expand_shards(str(out)) for s in iter_tar_samples(url)]
    assert [(p["src"], p["tgt"]) for p in written] == [("cat", "chat")]
    assert manifest(out)["skipped"] == {"over_pair_cap": 2}


# ------------------------------------------------------------------------------------ half of a character
HALF_EMOJI = "a dog \\ud83d"  # as the JSON text escapes it: a lone surrogate, half of an emoji a scraper cut


def test_a_cclm_dump_line_with_half_a_character_is_a_counted_bad_json(tmp_path, caplog):
    image = base64.b64encode(jpeg()).decode()
    good = json.dumps({"binary": image, "caption": "a dog", "image_id": "one"})
    bad = good.replace('"a dog"', f'"{HALF_EMOJI}"').replace('"one"', '"two"')
    dump = tmp_path / "dump.jsonl"
    dump.write_text(f"{good}\n{bad}\n", encoding="utf-8")
    out = tmp_path / "out"
    assert prep("cclm-jsonl", "--input", dump, "--out", out) == 0  # before: a UnicodeEncodeError, exit 2
    assert captions(out) == [{"en": ["a dog"]}]
    assert manifest(out)["skipped"] == {"bad_json": 1}
    assert f"{dump}:2: a lone UTF-16 surrogate" in caplog.text


def test_a_parallel_jsonl_line_with_half_a_character_stops_naming_the_line(tmp_path, capsys):
    table = tmp_path / "p.jsonl"
    table.write_text(
        '{"source_text": "one", "target_text": "eins"}\n'
        f'{{"source_text": "{HALF_EMOJI}", "target_text": "ein Hund"}}\n',
        encoding="utf-8",
    )
    assert prep("parallel-jsonl", "--input", table, "--out", tmp_path / "p") == 2
    assert f"{table}:2: a lone UTF-16 surrogate (\\ud83d" in capsys.readouterr().err
    assert not list((tmp_path / "p").glob("**/*.tar")) and not list((tmp_path / "p").glob("**/manifest.json"))


def test_rekey_wds_counts_an_img2dataset_json_with_half_a_character_as_bad_json(tmp_path, caplog):
    """img2dataset writes ASCII JSON, where half an emoji is a "\\ud83d" escape: the conversion stopped with an
    encoding error naming no file; a txt caption beside such a json still serves."""
    members = {
        "000": {"jpg": jpeg(), "json": b'{"caption": "a dog"}'},
        "001": {"jpg": jpeg(), "json": b'{"caption": "a dog \\ud83d"}'},
        "002": {"jpg": jpeg(), "json": b'{"caption": "a cat \\ud83d"}', "txt": b"a cat"},
    }
    write_input_shard(tmp_path / "in" / "shard-000000.tar", members)
    out = tmp_path / "out"
    assert prep("rekey-wds", "--shards", tmp_path / "in", "--out", out) == 0
    assert captions(out) == [{"en": ["a cat"]}, {"en": ["a dog"]}]
    assert manifest(out)["skipped"] == {"bad_json": 1}
    assert "shard-000000.tar:001.json: a lone UTF-16 surrogate" in caplog.text
