"""Damaged downloads and malformed lines in the corpus converters: a gzip file or an OPUS zip whose body is damaged
or truncated stops ``cclm prep`` with one line naming the file (and member) and the last line read, publishing
nothing, where it used to escape as a bare ``zlib.error`` / ``BadZipFile`` traceback; and ``parallel-tsv`` counts
a line with more than two columns as ``bad_columns`` instead of writing its first two as a (wrong) pair."""

from __future__ import annotations

import gzip
import io
import json
import re
import zipfile
import zlib
from pathlib import Path

import pytest

from cclm.cli import main as cclm_main
from cclm.data.shards import expand_shards, iter_tar_samples
from tests.test_retrieval_recipes import multi30k_clone, save_images

LINES = 300


def prep(*args) -> int:
    return cclm_main(["prep", *map(str, args)])


def one_line_error(capsys, *names: str) -> str:
    """The command's error: one line, no traceback, naming every one of ``names``."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("cclm prep ")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert all(name in lines[0] for name in names), lines[0]
    return lines[0]


def assert_nothing_published(out: Path) -> None:
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()], list(out.rglob("*"))


def overwritten(data: bytes, start: int, end: int, read) -> bytes:
    """``data`` with 16 bytes inverted at the first offset from the middle of ``data[start:end]`` where ``read``
    of it raises ``zlib.error``: damage that breaks the deflate stream itself, not only its checksum."""
    for at in range((start + end) // 2, end - 16):
        broken = data[:at] + bytes(b ^ 0xFF for b in data[at : at + 16]) + data[at + 16 :]
        try:
            read(broken)
        except zlib.error:
            return broken
        except Exception:  # a checksum error, or none: try the next offset
            continue
    raise AssertionError("no offset breaks the deflate stream")


def damaged_gzip(text: str, damage: str) -> bytes:
    """A gzip of ``text`` with its deflate body overwritten mid-way, its CRC wrong, or cut in half; checked to
    fail as the damage it injects does."""
    data = gzip.compress(text.encode(), mtime=0)
    if damage == "body":
        expected, broken = zlib.error, overwritten(data, 10, len(data) - 8, gzip.decompress)
    elif damage == "crc":
        expected, broken = gzip.BadGzipFile, data[:-8] + bytes([data[-8] ^ 0x01]) + data[-7:]
    else:
        expected, broken = EOFError, data[: len(data) // 2]
    with pytest.raises(expected):
        gzip.decompress(broken)
    return broken


def sentences(prefix: str) -> str:
    return "".join(f"{prefix} {i} of the corpus, {i * 7919 % 1009} words long\n" for i in range(LINES))


# -------------------------------------------------------------------------------------------- gzip files
@pytest.mark.parametrize("damage", ["body", "crc", "truncated"])
def test_damaged_wikimatrix_gzip_is_one_line_error(tmp_path, capsys, damage):
    text = "".join(
        f"{2 - i / 1000:.3f}\tSatz {i} auf Deutsch\tsentence {i} in English\n" for i in range(LINES)
    )
    path = tmp_path / "WikiMatrix.de-en.tsv.gz"
    path.write_bytes(damaged_gzip(text, damage))
    out = tmp_path / "out"
    assert prep("wikimatrix", "--input", path, "--out", out, "--shard-samples", 50, "--no-progress") == 2
    line = one_line_error(capsys, str(path), "not a readable gzip file, damaged or truncated")
    if damage == "crc":  # found at the end, with shards written already: discarded
        assert re.search(r"\(CRC check failed 0x\w+ != 0x\w+; read up to line \d+\)$", line), line
    assert_nothing_published(out)


@pytest.mark.parametrize("gzipped", [False, True])
def test_a_utf16_corpus_file_is_one_line_error(tmp_path, capsys, gzipped):
    text = "".join(f"1.{i:03d}\tSatz {i}\tsentence {i}\n" for i in range(5)).encode("utf-16")
    path = tmp_path / ("WikiMatrix.de-en.tsv" + (".gz" if gzipped else ""))
    path.write_bytes(gzip.compress(text) if gzipped else text)
    out = tmp_path / "out"
    assert prep("wikimatrix", "--input", path, "--out", out, "--no-progress") == 2
    one_line_error(capsys, str(path), "the file is UTF-16 or UTF-32, not UTF-8")
    assert_nothing_published(out)


@pytest.mark.parametrize("damage", ["body", "crc", "truncated"])
def test_damaged_multi30k_caption_gzip_is_one_line_error(tmp_path, capsys, damage):
    names = multi30k_clone(tmp_path / "clone")
    save_images(tmp_path / "images", [n for split in names.values() for n in split])
    path = tmp_path / "clone" / "data" / "task2" / "raw" / "val.3.de.gz"
    path.write_bytes(damaged_gzip(sentences("de val caption"), damage))
    out = tmp_path / "configs"
    assert (
        prep("multi30k", "--dataset", tmp_path / "clone", "--images", tmp_path / "images", "--out", out) == 2
    )
    line = one_line_error(capsys, str(path), "not a readable gzip file, damaged or truncated")
    if damage == "crc":
        assert re.search(r"\(CRC check failed 0x\w+ != 0x\w+; read up to line \d+\)$", line), line
    assert_nothing_published(out)


# ---------------------------------------------------------------------------------------------- OPUS zips
def opus_zip(path: Path, damage: str) -> None:
    """OPUS's ``en-fr.txt.zip`` with its French member damaged: deflate data overwritten mid-way, one stored byte
    changed (a CRC mismatch), its local header overwritten, or the archive cut in half; checked to fail as the
    damage it injects does."""
    stored = damage == "crc"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("Europarl.en-fr.en", sentences("English sentence"))
        archive.writestr("Europarl.en-fr.fr", sentences("phrase française"))
        info = archive.getinfo("Europarl.en-fr.fr")
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    if damage == "deflate":

        def read(raw: bytes) -> bytes:
            with zipfile.ZipFile(io.BytesIO(raw)) as archive:
                return archive.read(info.filename)

        data = bytearray(overwritten(bytes(data), start, start + info.compress_size, read))
        expected = zlib.error
    elif damage == "crc":
        at = data.index("phrase française 150".encode(), start)
        data[at] = ord("P")
        expected = zipfile.BadZipFile
    elif damage == "header":
        data[info.header_offset : info.header_offset + 4] = b"XXXX"
        expected = zipfile.BadZipFile
    else:
        data = data[: len(data) // 2]
        expected = zipfile.BadZipFile
    path.write_bytes(bytes(data))
    with pytest.raises(expected), zipfile.ZipFile(path) as archive:
        archive.read("Europarl.en-fr.fr")


@pytest.mark.parametrize("damage", ["deflate", "crc", "header"])
def test_damaged_opus_zip_member_is_one_line_error(tmp_path, capsys, damage):
    path = tmp_path / "en-fr.txt.zip"
    opus_zip(path, damage)
    out = tmp_path / "out"
    assert prep("opus", "--input", path, "--out", out, "--shard-samples", 50, "--no-progress") == 2
    line = one_line_error(
        capsys, f"{path}:Europarl.en-fr.fr", "not a readable zip member, damaged or truncated"
    )
    if damage == "crc":  # found once the member is read to its end, with a read-ahead
        assert re.search(r"\(Bad CRC-32 for file 'Europarl.en-fr.fr'; read up to line \d+\)$", line), line
    assert_nothing_published(out)


def test_truncated_opus_zip_is_one_line_error(tmp_path, capsys):
    path = tmp_path / "en-fr.txt.zip"
    opus_zip(path, "truncated")
    out = tmp_path / "out"
    assert prep("opus", "--input", path, "--out", out, "--no-progress") == 2
    one_line_error(capsys, str(path), "not a readable zip file, damaged or truncated")
    assert_nothing_published(out)


# ------------------------------------------------------------------------------------------- parallel-tsv
def test_parallel_tsv_counts_extra_columns_as_bad_columns(tmp_path, caplog):
    path = tmp_path / "pairs.tsv"
    path.write_text(
        "hello\thallo\n"
        "a source\twith a tab\tits target\n"  # line 2: three columns, no way to tell which is the pair
        "only a source\n"  # line 3: one column, an empty target as before
        "\n"
        "world\tWelt\t\n"  # a trailing tab adds no column
        "end\tEnde\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    args = ["--input", path, "--src-lang", "en", "--tgt-lang", "de", "--out", out, "--no-progress"]
    assert prep("parallel-tsv", *args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == {"bad_columns": 1, "empty_text": 1}
    samples = [json.loads(s["json"]) for url in expand_shards(str(out)) for s in iter_tar_samples(url)]
    assert sorted((s["src"], s["tgt"], s["src_lang"], s["tgt_lang"]) for s in samples) == [
        ("end", "Ende", "en", "de"),
        ("hello", "hallo", "en", "de"),
        ("world", "Welt", "en", "de"),
    ]
    warnings = [r.getMessage() for r in caplog.records if "bad_columns" in r.getMessage()]
    assert len(warnings) == 1 and f"{path}:2: 3 columns" in warnings[0]
