"""Faults in the pretraining data path: a folder of the other view, a pair filter that keeps no pair, a stream
that can never yield (fails after one bounded pass), a max_length past the text encoder's position table, a shard
cut between one sample's members, captions a normaliser empties, shard paths with glob characters, and shards
that overlapping patterns name twice."""

from __future__ import annotations

import functools
import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

import cclm.data.stream as stream_module
from cclm.cli import main as cclm_main
from cclm.config import DataConfig, from_dict
from cclm.data.normalize import pre_caption
from cclm.data.pipeline import PretrainData
from cclm.data.shards import (
    SKIP_KEY,
    VIEW_IMAGE_CAPTION,
    VIEW_PARALLEL,
    ShardSink,
    expand_shards,
    iter_tar_samples,
)
from cclm.errors import DataError
from cclm.train.run_length import image_caption_size

from .test_config_errors import SHARDS, assert_one_line_error, pretrain_config


def jpeg(i: int = 0) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (24, 20), ((40 * i) % 256, 90, 160)).save(out, format="JPEG")
    return out.getvalue()


def write_pairs(folder: Path, shards: int, per_shard: int = 1) -> Path:
    with ShardSink(folder, VIEW_PARALLEL, max_samples=per_shard) as sink:
        for i in range(shards * per_shard):
            pair = {"src": f"a red circle {i}", "tgt": "ein roter Kreis", "src_lang": "en", "tgt_lang": "de"}
            sink.write(f"p{i:04d}", {"json": json.dumps(pair).encode()}, ["en", "de"])
        sink.close()
    return folder


def write_images(folder: Path, captions: list[dict], per_shard: int = 10) -> Path:
    with ShardSink(folder, VIEW_IMAGE_CAPTION, max_samples=per_shard) as sink:
        for i, caps in enumerate(captions):
            sink.write(
                f"i{i:04d}", {"jpg": jpeg(i), "json": json.dumps({"captions": caps}).encode()}, list(caps)
            )
        sink.close()
    return folder


def data_cfg(image=None, text=None, **options) -> DataConfig:
    cfg = {"num_workers": 0, "sample_shuffle_buffer": 1, **options}
    if image is not None:
        cfg["image_caption"] = {"shards": str(image), "batch_size": 1}
    if text is not None:
        cfg["parallel_text"] = {"shards": str(text), "batch_size": 1}
    return from_dict(DataConfig, cfg)


def one_epoch(data: PretrainData, view: str) -> list[str]:
    keys = []
    with pytest.raises(StopIteration):
        while True:
            keys += data.next_batch(view)["keys"]
    return keys


# ---------------------------------------------------------------------------------- 1: refused at start, bounded
def test_a_folder_of_the_other_view_is_refused_at_start_naming_it(tmp_path, tiny_tokenizer):
    """Swapped stream folders: before, every sample was skipped (missing_caption) and the error came only once a
    reader had been dealt every shard in some epoch, blaming the samples."""
    pairs = write_pairs(tmp_path / "pt", shards=2)
    images = write_images(tmp_path / "ic", [{"en": "a red circle"}] * 2)
    with pytest.raises(DataError) as err:
        PretrainData(data_cfg(image=pairs), tiny_tokenizer, 16, image_size=16)
    assert str(err.value) == (
        f"data.image_caption.shards: {pairs} holds parallel_text shards (its manifest.json says "
        "view=parallel_text); give it as data.parallel_text.shards"
    )
    with pytest.raises(DataError, match=f"data.parallel_text.shards: {images} holds image_caption shards"):
        PretrainData(data_cfg(text=images), tiny_tokenizer, 16, image_size=16)


def test_a_pair_filter_that_keeps_no_pair_is_refused_at_start(tmp_path, tiny_tokenizer):
    """``[de]`` for "the German pairs" of an en-de corpus keeps none: both languages of a pair must be listed."""
    folder = write_pairs(tmp_path / "pt", shards=2)
    cfg = data_cfg(text=folder)
    cfg.parallel_text.languages = ["de"]
    with pytest.raises(DataError) as err:
        PretrainData(cfg, tiny_tokenizer, 16)
    message = str(err.value)
    assert message.startswith(
        "data.parallel_text.languages: no language pair of the shards has both sides in [de]"
    )
    assert "lists en-de" in message and "both its languages are listed" in message
    cfg.parallel_text.languages = ["de", "EN"]
    assert len(one_epoch(PretrainData(cfg, tiny_tokenizer, 16, epochs=1), "text")) == 2


def test_a_stream_that_can_never_yield_fails_after_one_bounded_pass(tmp_path, tiny_tokenizer, monkeypatch):
    """No start check can tell (the manifest does not count pairs): rank 0 of 8 reads its 5 shards of 40, finds
    nothing usable, and then one pass over the other shards decides. Before, it failed only once it had been dealt every
    shard in some empty epoch: a coupon-collector wait of about 8 x ln(40) epochs (here 170 shard reads)."""
    folder = write_pairs(tmp_path / "pt", shards=40)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("language_pairs", None)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    reads = Counter()
    real = stream_module.iter_tar_samples

    def counted(url, expected=None):
        reads[url] += 1
        yield from real(url, expected)

    monkeypatch.setattr(stream_module, "iter_tar_samples", counted)
    cfg = data_cfg(text=folder)
    cfg.parallel_text.languages = ["de"]
    data = PretrainData(cfg, tiny_tokenizer, 16, rank=0, world_size=8)
    with pytest.raises(DataError) as err:
        data.next_batch("text")
    assert "no usable sample in all 40 shard(s) (up to epoch 0; skipped: {'filtered_language': 5}" in str(
        err.value
    )
    assert "a pair is read only when both its languages are listed" in str(err.value)
    assert len(reads) == 40 and set(reads.values()) == {1}  # each shard read once


# ----------------------------------------------------------------------------- 2: max_length vs the position table
@pytest.mark.parametrize(
    "override, key",
    [
        ("data.parallel_text.max_length=80", "data.parallel_text.max_length=80"),
        ("data.image_caption.max_length=65", "data.image_caption.max_length=65"),
        ("model.text.max_length=65", "model.text.max_length=65"),
        ("data.regions.max_length=100", "data.regions.max_length=100"),
    ],
)
def test_a_max_length_past_the_position_table_fails_at_start_naming_the_key(
    tmp_path, capsys, tiny_tokenizer, override, key
):
    """The tiny encoder has 66 positions, numbered from pad_token_id + 1 = 2: 64 tokens fit. Before, the first
    forward (the FLOPs count) indexed past the table with a raw IndexError traceback."""
    tokenizer = tmp_path / "tokenizer"
    tiny_tokenizer.save_pretrained(str(tokenizer))
    regions = ["data.regions.shards=/nowhere/rg.tar"] if key.startswith("data.regions") else []
    argv = [
        "pretrain",
        pretrain_config(tmp_path, "tiny"),
        *SHARDS,
        *regions,
        f"model.text.tokenizer={tokenizer}",
    ]
    code = cclm_main([str(a) for a in [*argv, override]])
    line = assert_one_line_error(code, capsys.readouterr().err, "pretrain", key)
    assert line.endswith("the text encoder has 66 positions (at most 64 tokens)")
    assert not (tmp_path / "out").exists()
    code = cclm_main([str(a) for a in [*argv, override.split("=")[0] + "=64"]])
    assert (
        "positions" not in capsys.readouterr().err
    )  # 64 passes this check (and stops at the missing shards)


def test_a_pretrained_encoders_position_table_is_checked_before_the_output_folder(
    tmp_path, capsys, tiny_tokenizer
):
    """A pretrained encoder (a local folder, as xlm-roberta-large: positions numbered from pad_token_id + 1) whose
    table only the loaded model knows: checked once it is loaded, before the run writes anything."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from cclm.config import ModelConfig, load_config

    tiny = load_config(ModelConfig, Path(__file__).resolve().parents[2] / "configs" / "model" / "tiny.yaml")
    encoder = tmp_path / "encoder"
    XLMRobertaModel(XLMRobertaConfig(**tiny.text.encoder), add_pooling_layer=False).save_pretrained(encoder)
    tokenizer = tmp_path / "tokenizer"
    tiny_tokenizer.save_pretrained(str(tokenizer))
    images = write_images(tmp_path / "ic", [{"en": "a red circle"}] * 2)
    pairs = write_pairs(tmp_path / "pt", shards=1, per_shard=2)
    argv = [
        "pretrain",
        pretrain_config(tmp_path, "tiny"),
        f"data.image_caption.shards={images}",
        f"data.parallel_text.shards={pairs}",
        f"model.text.name_or_path={encoder}",
        f"model.text.tokenizer={tokenizer}",
        "data.num_workers=0",
        "data.parallel_text.max_length=65",
    ]
    code = cclm_main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert_one_line_error(
        code,
        err,
        "pretrain",
        "data.parallel_text.max_length=65: the text encoder has 66 positions (at most 64",
    )
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- 3: a shard cut between members
def cut_shard(tmp_path: Path, cut_at) -> Path:
    """A 3-sample image shard cut where ``cut_at(members)`` says ([(name, end offset)]), in a folder whose sizes.json
    and manifest still promise 3 samples."""
    folder = write_images(tmp_path / "ic", [{"en": f"a red circle {i}"} for i in range(3)])
    shard = folder / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        ends = [(m.name, m.offset_data + -(-m.size // 512) * 512) for m in tar.getmembers()]
    shard.write_bytes(shard.read_bytes()[: cut_at(ends)])
    return shard


def test_a_shard_cut_between_one_samples_members_counts_truncated_shard(tmp_path, tiny_tokenizer):
    """The cut falls after i0002.jpg, before i0002.json, on a block boundary: tarfile ends cleanly. Before, the
    half sample went on and was skipped as missing_caption; the damaged shard went unnoticed."""
    shard = cut_shard(tmp_path, lambda ends: ends[-2][1])
    samples = list(iter_tar_samples(str(shard), 3))
    assert [s.get(SKIP_KEY) for s in samples] == [None, None, "truncated_shard"]
    assert "i0002" in samples[-1]["detail"]
    data = PretrainData(data_cfg(image=shard.parent), tiny_tokenizer, 16, image_size=16, epochs=1)
    assert len(one_epoch(data, "image")) == 2
    assert data.skip_counts() == {"truncated_shard": 1}


def test_a_shard_cut_after_a_whole_sample_keeps_it(tmp_path):
    shard = cut_shard(tmp_path, lambda ends: ends[-1][1])  # every member there, no end-of-archive blocks
    assert [s.get(SKIP_KEY) for s in iter_tar_samples(str(shard), 3)] == [None, None, None]


def member_offsets(shard: Path) -> dict[str, int]:
    with tarfile.open(shard) as tar:
        return {m.name: m.offset for m in tar.getmembers()}


def damage_header(shard: Path, member: str) -> None:
    """One byte of ``member``'s header changed: its checksum no longer matches."""
    data = bytearray(shard.read_bytes())
    data[member_offsets(shard)[member] + 3] ^= 0x20
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("size_known", [True, False])
def test_a_damaged_member_header_loses_no_sample_uncounted(tmp_path, tiny_tokenizer, size_known):
    """tarfile ends its iteration at a header that does not read as if the archive ended there; without the
    shard's size (pipe:, http, img2dataset folders) the samples behind it went missing uncounted."""
    folder = write_images(tmp_path / "ic", [{"en": f"a red circle {i}"} for i in range(10)])
    shard = folder / "shard-000000.tar"
    damage_header(shard, "i0006.jpg")
    samples = list(iter_tar_samples(str(shard), 10 if size_known else None))
    assert [s["__key__"] for s in samples if SKIP_KEY not in s] == [f"i{i:04d}" for i in range(6)]
    tombstones = [s for s in samples if SKIP_KEY in s]
    assert {s[SKIP_KEY] for s in tombstones} == {"corrupt_shard"}
    assert len(tombstones) == (4 if size_known else 1)
    assert (
        "a member header does not read" in tombstones[0]["detail"]
        and "after sample i0005" in tombstones[0]["detail"]
    )
    if not size_known:  # the same shard read through a pipe, as training reads remote shards
        data = PretrainData(data_cfg(image=f"pipe:cat {shard}"), tiny_tokenizer, 16, image_size=16, epochs=1)
        assert len(one_epoch(data, "image")) == 6
        assert data.skip_counts() == {"corrupt_shard": 1}


def test_a_whole_tar_whose_record_padding_is_not_zero_reads_cleanly(tmp_path):
    """Only the two end-of-archive blocks must be zero; the rest of the last record may hold anything (POSIX),
    and GNU tar reads such a file cleanly."""
    shard = (
        write_images(tmp_path / "ic", [{"en": f"a red circle {i}"} for i in range(3)]) / "shard-000000.tar"
    )
    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // 512) * 512 + 2 * 512
    data = shard.read_bytes()
    assert len(data) > end and not data[end - 1024 :].strip(b"\0")
    shard.write_bytes(data[:end] + b"\x01" * (len(data) - end))
    for expected in (3, None):
        assert [s.get(SKIP_KEY) for s in iter_tar_samples(str(shard), expected)] == [None, None, None]
    assert [s.get(SKIP_KEY) for s in iter_tar_samples(f"pipe:cat {shard}")] == [None, None, None]


def test_a_damaged_header_inside_a_sample_drops_that_sample_as_truncated(tmp_path):
    shard = (
        write_images(tmp_path / "ic", [{"en": f"a red circle {i}"} for i in range(4)]) / "shard-000000.tar"
    )
    damage_header(shard, "i0002.json")  # i0002.jpg read, its caption not
    samples = list(iter_tar_samples(str(shard)))
    assert [s.get(SKIP_KEY) for s in samples] == [None, None, "truncated_shard", "corrupt_shard"]
    assert "i0002" in samples[2]["detail"]


def test_a_shard_of_unknown_size_cut_on_a_sample_boundary_counts_what_the_cut_may_have_taken(tmp_path):
    shard = cut_shard(tmp_path, lambda ends: ends[3][1])  # after i0001.json: i0002 gone, nothing says so
    samples = list(iter_tar_samples(str(shard)))
    assert [s.get(SKIP_KEY) for s in samples] == [None, None, "truncated_shard"]
    assert "after sample i0001" in samples[-1]["detail"]
    whole = cut_shard(tmp_path / "whole", lambda ends: 1 << 30)  # not cut: no tombstone
    assert [s.get(SKIP_KEY) for s in iter_tar_samples(str(whole))] == [None, None, None]


# ------------------------------------------------------------------------ a lone surrogate in a sample's JSON
HALF_EMOJI = '"a dog \\ud83d"'  # JSON text escaping half of a surrogate pair, as scrapers cut emoji


def test_a_caption_or_pair_holding_half_a_character_is_a_counted_skip_not_a_crash(tmp_path, tiny_tokenizer):
    """json.loads accepts a lone surrogate escape; the str it makes crashed the tokenizer in the collate step,
    outside the skip handling, at the same stream position again after every resume."""
    folder = tmp_path / "ic"
    with ShardSink(folder, VIEW_IMAGE_CAPTION, max_samples=10) as sink:
        for i in range(4):
            caption = HALF_EMOJI if i == 1 else f'"a red circle {i}"'
            meta = f'{{"captions": {{"en": [{caption}]}}}}'.encode()
            sink.write(f"i{i:04d}", {"jpg": jpeg(i), "json": meta}, ["en"])
        sink.close()
    pairs = tmp_path / "pt"
    with ShardSink(pairs, VIEW_PARALLEL, max_samples=10) as sink:
        for i in range(3):
            src = HALF_EMOJI if i == 2 else f'"a red circle {i}"'
            pair = f'{{"src": {src}, "tgt": "ein roter Kreis", "src_lang": "en", "tgt_lang": "de"}}'
            sink.write(f"p{i:04d}", {"json": pair.encode()}, ["en", "de"])
        sink.close()
    data = PretrainData(data_cfg(image=folder, text=pairs), tiny_tokenizer, 16, image_size=16, epochs=1)
    assert sorted(one_epoch(data, "image")) == ["i0000", "i0002", "i0003"]
    assert sorted(one_epoch(data, "text")) == ["p0000", "p0001"]
    assert data.skip_counts() == {"bad_json": 2}


def test_a_surrogate_pair_and_an_escaped_backslash_are_text():
    from cclm.jsonl import lone_surrogate

    assert lone_surrogate('{"a": "\\ud83d\\ude00"}', {"a": "\U0001f600"}) is None  # a whole pair is fine
    assert (
        lone_surrogate('{"a": "\\\\ud83d"}', {"a": "\\ud83d"}) is None
    )  # an escaped backslash, not a surrogate


def test_read_jsonl_refuses_a_line_with_half_a_character(tmp_path):
    from cclm.jsonl import JsonFileError, read_jsonl

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"src": "fine"}\n{"src": ' + HALF_EMOJI + "}\n", encoding="utf-8")
    with pytest.raises(JsonFileError, match=r"pairs\.jsonl:2: a lone UTF-16 surrogate \(\\ud83d"):
        list(read_jsonl(path))


# --------------------------------------------------------------------------- 4: captions a normaliser empties
def test_a_caption_the_normaliser_empties_is_not_drawn(tmp_path, tiny_tokenizer):
    """Each sample has an English caption of only punctuation and a good German one. Before, the draw picked the
    English one about half the time and the whole sample was skipped as empty_after_normalize."""
    captions = [{"en": "...", "de": "ein roter Kreis"}] * 12 + [{"en": "!!", "de": "?"}]
    folder = write_images(tmp_path / "ic", captions)
    normalizer = functools.partial(pre_caption, max_words=0)
    data = PretrainData(
        data_cfg(image=folder), tiny_tokenizer, 16, image_size=16, epochs=1, normalizer=normalizer
    )
    keys = []
    with pytest.raises(StopIteration):
        while True:
            batch = data.next_batch("image")
            keys += batch["keys"]
            assert batch["langs"] == ["de"]
    assert len(keys) == 12 and "i0012" not in keys
    assert data.skip_counts() == {"empty_after_normalize": 1}


# ------------------------------------------------------------------------------------- 5, 6: shard specifications
def test_an_existing_shard_path_with_glob_characters_is_read_as_given(tmp_path):
    folder = write_pairs(tmp_path / "run[1]", shards=2)
    shard = folder / "shard-000000.tar"
    assert expand_shards(str(shard)) == [str(shard)]
    assert len(expand_shards(str(tmp_path / "*" / "shard-*.tar"))) == 2


def test_shards_that_overlapping_patterns_name_twice_are_read_once_with_a_warning(
    tmp_path, tiny_tokenizer, caplog
):
    folder = write_pairs(tmp_path / "pt", shards=4)
    spec = f"{folder}::{folder}/shard-00000{{0..1}}.tar::{folder}/../pt/shard-000003.tar"
    assert expand_shards(spec) == [str(folder / f"shard-00000{i}.tar") for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="cclm.data"):
        data = PretrainData(data_cfg(text=spec), tiny_tokenizer, 16, epochs=1)
    warned = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("data.parallel_text.shards")
    ]
    assert len(warned) == 1 and "3 shard(s) listed more than once" in warned[0]
    assert f"{folder}/shard-000001.tar" in warned[0] and f"{folder}/../pt/shard-000003.tar" in warned[0]
    assert sorted(one_epoch(data, "text")) == [f"p{i:04d}" for i in range(4)]


def test_epochs_count_an_overlapping_shard_once_and_leave_the_warning_to_the_stream(tmp_path, caplog):
    folder = write_images(tmp_path / "ic", [{"en": f"a red circle {i}"} for i in range(6)], per_shard=2)
    spec = f"{folder}::{folder}/shard-000000.tar"
    with caplog.at_level(logging.WARNING, logger="cclm.data"):
        assert image_caption_size(data_cfg(image=spec)) == 6
    assert not [r for r in caplog.records if "listed more than once" in r.getMessage()]
