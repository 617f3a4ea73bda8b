"""Converters (issue 15, items 5 and 6): a conversion that fails part-way publishes nothing the training reader
would take for a healthy shard, the reader warns about (or refuses) shards no manifest lists, and input that is
not UTF-8 is a counted skip named ``file:line`` (or ``shard:member``) in every converter."""

from __future__ import annotations

import errno
import io
import json
import logging
import re
import tarfile
from pathlib import Path

import pytest
from PIL import Image

import data_prep.parallel_text
from cclm.cli import main as cclm_main
from cclm.config import DataConfig, from_dict
from cclm.data.pipeline import PretrainData
from cclm.data.shards import VIEW_PARALLEL, ShardSink, expand_shards, iter_tar_samples
from cclm.errors import DataError

BAD_LINE = 5000  # far past the first read buffer (8 KiB) of a text file


def prep(*args) -> int:
    return cclm_main(["prep", *map(str, args), "--no-progress"])


def text_data(shards, tokenizer, **options) -> PretrainData:
    cfg = {"parallel_text": {"shards": str(shards), "batch_size": 4}, "num_workers": 0, **options}
    return PretrainData(from_dict(DataConfig, cfg), tokenizer, 32, train=False, epochs=1)


def keys_read(data: PretrainData) -> list[str]:
    keys = []
    while True:
        try:
            keys += data.next_batch("text")["keys"]
        except StopIteration:
            return sorted(keys)


def raw_json(folder: Path) -> list[dict]:
    return [json.loads(s["json"]) for url in expand_shards(str(folder)) for s in iter_tar_samples(url)]


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def assert_nothing_published(out: Path, tokenizer) -> None:
    """No shard, index file or temporary is left, and the reader finds nothing however it is pointed there."""
    assert [p.name for p in out.rglob("*")] == []
    for spec, error in (
        (out, "contains no .tar files"),
        (out / "shard-{000000..000003}.tar", "does not exist"),
        (out / "*.tar", "matches no file"),
    ):
        with pytest.raises(FileNotFoundError, match=re.escape(error)):
            text_data(spec, tokenizer)


def write_pairs_tar(path: Path, keys: list[str]) -> None:
    """A shard written without cclm's converters (no sizes.json, no manifest.json)."""
    with tarfile.open(path, "w") as tar:
        for key in keys:
            data = json.dumps({"src": key, "tgt": key, "src_lang": "en", "tgt_lang": "de"}).encode()
            info = tarfile.TarInfo(f"{key}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# ----------------------------------------------------------------------------------------- atomic publishing
# The probe (a non-UTF-8 line after 2,000 good pairs) is a counted skip now, so the failures part-way
# are injected: the disk filling up, and Ctrl-C.
def convert_3000_pairs(tmp_path: Path) -> int:
    """``prep parallel-tsv`` of 3,000 pairs into ``tmp_path/out``, 500 per shard."""
    src = tmp_path / "p.tsv"
    src.write_text("".join(f"sentence {i}\tSatz {i}\n" for i in range(3000)), encoding="utf-8")
    return prep("parallel-tsv", "--input", src, "--src-lang", "en", "--tgt-lang", "de", "--out", tmp_path / "out",
                "--shard-samples", 500)  # fmt: skip


def test_parallel_tsv_failing_on_a_full_disk_after_2000_pairs_publishes_nothing(
    tmp_path, monkeypatch, capsys, tiny_tokenizer
):
    real_write = ShardSink.write

    def write_until_full(self, key, members, languages=()):
        if self.count == 2000:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, key, members, languages)

    monkeypatch.setattr(ShardSink, "write", write_until_full)
    assert convert_3000_pairs(tmp_path) == 2
    assert "cclm prep parallel-tsv: [Errno 28] No space left on device" in capsys.readouterr().err
    assert_nothing_published(tmp_path / "out", tiny_tokenizer)


def test_parallel_tsv_interrupted_after_2000_pairs_publishes_nothing(tmp_path, monkeypatch, tiny_tokenizer):
    real_lines = data_prep.parallel_text.text_lines

    def lines_until_ctrl_c(path, writer):
        for number, line in real_lines(path, writer):
            if number == 2001:
                raise KeyboardInterrupt
            yield number, line

    monkeypatch.setattr(data_prep.parallel_text, "text_lines", lines_until_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        convert_3000_pairs(tmp_path)
    assert_nothing_published(tmp_path / "out", tiny_tokenizer)


def test_parallel_moses_with_misaligned_files_publishes_nothing(tmp_path, capsys, tiny_tokenizer):
    (tmp_path / "c.en").write_text("".join(f"sentence {i}\n" for i in range(2001)), encoding="utf-8")
    (tmp_path / "c.de").write_text("".join(f"Satz {i}\n" for i in range(2000)), encoding="utf-8")
    out = tmp_path / "out"
    rc = prep("parallel-moses", "--src", tmp_path / "c.en", "--tgt", tmp_path / "c.de", "--out", out,
              "--shard-samples", 500)  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "c.en and" in err and "c.de are not aligned" in err and "at line 2001" in err
    assert_nothing_published(out, tiny_tokenizer)


def test_a_killed_conversion_leaves_only_temporaries_that_the_next_one_removes(tmp_path, tiny_tokenizer):
    out = tmp_path / "out"
    sink = ShardSink(out, VIEW_PARALLEL, max_samples=2)
    for i in range(5):
        sink.write(f"p{i}", {"json": b"{}"})  # then the process dies: no close(), no abort()
    assert sorted(p.name for p in out.iterdir()) == [f"shard-00000{i}.tar.partial" for i in range(3)]
    with pytest.raises(FileNotFoundError, match="contains no .tar files"):
        text_data(out, tiny_tokenizer)
    with ShardSink(out, VIEW_PARALLEL) as again:
        again.write("q0", {"json": b"{}"})
        again.close()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-000000.tar", "sizes.json"]


# ------------------------------------------------------------------------------------------ unlisted shards
@pytest.fixture
def folder_with_unlisted_shard(tmp_path) -> tuple[Path, Path]:
    """Two shards a converter published, and one it did not (a conversion interrupted before atomic writes)."""
    folder = tmp_path / "pt"
    with ShardSink(folder, VIEW_PARALLEL, max_samples=4) as sink:
        for i in range(8):
            pair = {"src": f"s{i}", "tgt": f"t{i}", "src_lang": "en", "tgt_lang": "de"}
            sink.write(f"listed{i}", {"json": json.dumps(pair).encode()}, ["en", "de"])
        sink.close()
    extra = folder / "shard-000002.tar"
    write_pairs_tar(extra, ["extra0", "extra1", "extra2"])
    return folder, extra


def test_an_unlisted_shard_is_read_with_a_warning_naming_it(
    folder_with_unlisted_shard, tiny_tokenizer, caplog
):
    folder, extra = folder_with_unlisted_shard
    data = text_data(folder, tiny_tokenizer, unlisted_shards="warn")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "data.parallel_text.shards: 1 shard(s) that no manifest.json" in warnings[0]
    assert str(extra) in warnings[0] and "shard-000000.tar" not in warnings[0]
    assert keys_read(data) == sorted([f"listed{i}" for i in range(8)] + ["extra0", "extra1", "extra2"])


def test_an_unlisted_shard_is_refused_naming_it(folder_with_unlisted_shard, tmp_path, tiny_tokenizer):
    folder, extra = folder_with_unlisted_shard
    with pytest.raises(DataError, match=re.escape("1 shard(s) that no manifest.json")) as caught:
        text_data(folder, tiny_tokenizer, unlisted_shards="refuse")
    assert str(extra) in str(caught.value) and "shard-000001.tar" not in str(caught.value)
    # What an interrupted conversion left before converters published atomically: a shard and nothing else.
    leftover = tmp_path / "leftover"
    leftover.mkdir()
    write_pairs_tar(leftover / "shard-000000.tar", ["a", "b"])
    with pytest.raises(DataError, match=re.escape(str(leftover / "shard-000000.tar"))):
        text_data(leftover, tiny_tokenizer, unlisted_shards="refuse")


def test_remote_shards_are_read_unchecked_with_one_info_line(
    folder_with_unlisted_shard, tiny_tokenizer, caplog
):
    caplog.set_level(logging.INFO, logger="cclm.data")
    _, extra = folder_with_unlisted_shard
    data = text_data(f"pipe:cat {extra}", tiny_tokenizer, unlisted_shards="refuse")
    assert keys_read(data) == ["extra0", "extra1", "extra2"]
    assert "1 remote shard(s) (pipe: or URL) are read without a manifest check" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -------------------------------------------------------------------------------------- undecodable input
def numbered_lines(count: int, good, bad: bytes) -> bytes:
    """``count`` lines, line ``n`` being ``good(n)``, except line BAD_LINE: ``bad`` (not UTF-8)."""
    return b"".join(bad if n == BAD_LINE else good(n).encode() for n in range(1, count + 1))


def assert_one_bad_utf8_warning(caplog, where: str) -> None:
    warnings = [r.getMessage() for r in caplog.records if "bad_utf8" in r.getMessage()]
    assert len(warnings) == 1 and f"{where}: not UTF-8 (byte 0xe9 at byte " in warnings[0]


@pytest.fixture
def image_root(tmp_path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    for i in range(10):
        Image.new("RGB", (12, 12), (20 * i, 100, 200 - 10 * i)).save(root / f"im{i}.jpg")
    return root


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_a_non_utf8_line_in_an_image_caption_table_is_a_counted_skip(fmt, tmp_path, image_root, caplog):
    if fmt == "tsv":
        good = lambda n: f"im{n % 10}.jpg\tcaption {n}\ten\n"  # noqa: E731
        bad = b"im3.jpg\tcaf\xe9 au lait\ten\n"
    else:
        good = lambda n: json.dumps({"image": f"im{n % 10}.jpg", "caption": f"caption {n}"}) + "\n"  # noqa: E731
        bad = b'{"image": "im3.jpg", "caption": "caf\xe9 au lait"}\n'
    table = tmp_path / f"captions.{fmt}"
    table.write_bytes(numbered_lines(5200, good, bad))
    out = tmp_path / "out"
    assert prep("image-caption", "--input", table, "--image-root", image_root, "--out", out) == 0
    assert manifest(out)["skipped"] == {"bad_utf8": 1} and manifest(out)["samples"] == 10
    captions = [c for meta in raw_json(out) for c in meta["captions"]["en"]]
    assert sorted(captions) == sorted(f"caption {n}" for n in range(1, 5201) if n != BAD_LINE)
    assert_one_bad_utf8_warning(caplog, f"{table}:{BAD_LINE}")


def test_a_non_utf8_line_in_a_cclm_jsonl_dump_is_a_counted_skip(tmp_path, image_root, caplog, capsys):
    dump = tmp_path / "dump.jsonl"
    good = lambda n: json.dumps({"image": f"im{n % 10}.jpg", "caption": f"caption {n}"}) + "\n"  # noqa: E731
    dump.write_bytes(numbered_lines(5100, good, b'{"image": "im3.jpg", "caption": "caf\xe9"}\n'))
    out = tmp_path / "out"
    assert prep("cclm-jsonl", "--input", dump, "--image-root", image_root, "--out", out) == 0
    assert manifest(out)["skipped"] == {"bad_utf8": 1} and manifest(out)["samples"] == 5099
    captions = [c for meta in raw_json(out) for c in meta["captions"]["en"]]
    assert sorted(captions) == sorted(f"caption {n}" for n in range(1, 5101) if n != BAD_LINE)
    assert_one_bad_utf8_warning(caplog, f"{dump}:{BAD_LINE}")
    assert "skipped: bad_utf8=1" in capsys.readouterr().out  # the closing summary


@pytest.mark.parametrize("converter", ["parallel-tsv", "parallel-moses", "parallel-jsonl"])
def test_a_non_utf8_line_in_parallel_text_is_a_counted_skip(converter, tmp_path, caplog):
    count, out = 5100, tmp_path / "out"
    if converter == "parallel-tsv":
        path = tmp_path / "p.tsv"
        path.write_bytes(numbered_lines(count, lambda n: f"sentence {n}\tSatz {n}\n", b"caf\xe9\tKaffee\n"))
        args = ["--input", path, "--src-lang", "en", "--tgt-lang", "de"]
    elif converter == "parallel-moses":
        (tmp_path / "c.en").write_text("".join(f"sentence {n}\n" for n in range(1, count + 1)))
        path = tmp_path / "c.de"  # the bad line is on the target side
        path.write_bytes(numbered_lines(count, lambda n: f"Satz {n}\n", b"Kaf\xe9\n"))
        args = ["--src", tmp_path / "c.en", "--tgt", path]
    else:
        path = tmp_path / "p.jsonl"
        good = lambda n: json.dumps({"source_text": f"sentence {n}", "target_text": f"Satz {n}"}) + "\n"  # noqa: E731
        path.write_bytes(numbered_lines(count, good, b'{"source_text": "caf\xe9", "target_text": "x"}\n'))
        args = ["--input", path, "--src-lang", "en", "--tgt-lang", "de"]
    assert prep(converter, *args, "--out", out) == 0
    assert manifest(out)["skipped"] == {"bad_utf8": 1} and manifest(out)["samples"] == count - 1
    pairs = sorted((p["src"], p["tgt"]) for p in raw_json(out))
    assert pairs == sorted((f"sentence {n}", f"Satz {n}") for n in range(1, count + 1) if n != BAD_LINE)
    assert_one_bad_utf8_warning(caplog, f"{path}:{BAD_LINE}")


def test_rekey_wds_counts_an_undecodable_caption(tmp_path, caplog):
    shard = tmp_path / "wds" / "00000.tar"
    shard.parent.mkdir()
    captions = [b"Bild 0", b"Caf\xe9 1", b"Bild 2"]
    with tarfile.open(shard, "w") as tar:
        for i, text in enumerate(captions):
            picture = io.BytesIO()
            Image.new("RGB", (12, 12), (30 * i, 80, 90)).save(picture, format="JPEG")
            for ext, data in (("jpg", picture.getvalue()), ("txt", text)):
                info = tarfile.TarInfo(f"0000{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    assert prep("rekey-wds", "--shards", shard, "--lang", "de", "--out", out) == 0
    assert manifest(out)["skipped"] == {"bad_utf8": 1}
    assert sorted(m["captions"]["de"][0] for m in raw_json(out)) == ["Bild 0", "Bild 2"]
    assert_one_bad_utf8_warning(caplog, f"{shard}:00001.txt")
