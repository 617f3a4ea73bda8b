"""``cclm prep translate`` faults: a rerun into the same ``--out`` whose input lost shards (fewer ``--shards``, a
shorter ``--text`` corpus, another ``--prefix``) is refused naming the earlier run's shards, before the model
loads, instead of leaving them for readers to read; a blank target caption is no caption; a list of source
captions keeps its translations index by index; a target in the source language is refused; the skip warnings'
rate limit holds across shards."""

from __future__ import annotations

import json
import logging

import pytest

from cclm.cli import main as cclm_main
from cclm.data.shards import VIEW_IMAGE_CAPTION, ShardSink, iter_tar_samples
from data_prep.translation import translator as translator_module
from data_prep.translation.translator import Translations, Translator
from tests.faults.test_config_errors import assert_one_line_error
from tests.translation_models import build_marian

pytestmark = pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")


@pytest.fixture(scope="module")
def marian(tmp_path_factory):
    return str(build_marian(tmp_path_factory.mktemp("models") / "opus-mt-en-de"))


def write_shards(folder, metas: list[dict | None]) -> None:
    """One sample per shard; None: a sample without .json."""
    with ShardSink(folder, VIEW_IMAGE_CAPTION, max_samples=1, command="test") as sink:
        for i, meta in enumerate(metas):
            members = {"jpg": b"not decoded here"}
            if meta is not None:
                members["json"] = json.dumps(meta).encode()
            sink.write(f"s{i:03d}", members, ["en"])
        sink.close()


def translate(capsys, *args: str) -> tuple[int, str]:
    code = cclm_main(["prep", "translate", "--no-progress", "--threads", "1", *map(str, args)])
    return code, capsys.readouterr().err


def refuse_to_load(*args, **kwargs):
    raise AssertionError("the model was loaded")


@pytest.fixture
def upper_case(monkeypatch):
    """A translation that shows which source it came from; "skip me" comes out empty."""

    def translate(self, sentences, target):
        texts = ["" if s == "skip me" else s.upper() for s in sentences]
        return Translations(texts, [False] * len(sentences))

    monkeypatch.setattr(Translator, "translate", translate)


def samples(folder) -> dict[str, dict]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return {
        s["__key__"]: json.loads(s["json"])
        for name in manifest["files"]
        for s in iter_tar_samples(str(folder / name))
        if "json" in s
    }


# ------------------------------------------------------------------------------------------------- reruns
def test_a_rerun_with_fewer_input_shards_is_refused_naming_the_stale_one(
    marian, tmp_path, capsys, monkeypatch
):
    write_shards(tmp_path / "in", [{"captions": {"en": f"a red circle {i}"}} for i in range(3)])
    out = tmp_path / "out"
    common = ["--model", marian, "--targets", "de", "--out", out]
    subset = tmp_path / "in" / "shard-{000000..000001}.tar"
    assert translate(capsys, "--shards", subset, *common)[0] == 0
    assert translate(capsys, "--shards", tmp_path / "in", *common)[0] == 0  # more input: fine, resumes
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    monkeypatch.setattr(translator_module, "Translator", refuse_to_load)
    code, err = translate(capsys, "--shards", subset, *common)
    assert_one_line_error(code, err, "prep translate", str(out), "shard-000002.tar", "earlier run")
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing removed or written


def test_a_shorter_corpus_or_another_prefix_is_refused(marian, tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"a red circle {i}\n" for i in range(5)))
    out = tmp_path / "out"
    common = ["--model", marian, "--out", out, "--targets", "de", "--shard-samples", "2"]
    assert translate(capsys, "--text", corpus, *common)[0] == 0
    assert sorted(p.name for p in out.glob("*.tar")) == [f"shard-00000{i}.tar" for i in range(3)]
    monkeypatch.setattr(translator_module, "Translator", refuse_to_load)
    corpus.write_text("".join(f"a red circle {i}\n" for i in range(3)))
    code, err = translate(capsys, "--text", corpus, *common)
    assert_one_line_error(code, err, "prep translate", "shard-000002.tar", "shorter --text")
    corpus.write_text("".join(f"a red circle {i}\n" for i in range(5)))
    code, err = translate(capsys, "--text", corpus, *common, "--prefix", "part")
    assert_one_line_error(code, err, "prep translate", "3 shard(s)", "shard-000000.tar", "--prefix")


# ----------------------------------------------------------------------------------------------- captions
def test_a_blank_target_caption_is_translated(marian, tmp_path, capsys, upper_case):
    write_shards(
        tmp_path / "in",
        [
            {"captions": {"en": "a dog runs", "de": ""}},
            {"captions": {"en": "a cat", "de": ["  ", None]}},
            {"captions": {"en": "a bird", "de": "ein Vogel"}},
        ],
    )
    assert translate(capsys, "--shards", tmp_path / "in", "--out", tmp_path / "out", "--model", marian,
                     "--targets", "de")[0] == 0  # fmt: skip
    got = samples(tmp_path / "out")
    assert got["s000"]["captions"]["de"] == "A DOG RUNS" and got["s001"]["captions"]["de"] == "A CAT"
    assert got["s002"]["captions"]["de"] == "ein Vogel" and "machine_translated" not in got["s002"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["translation"]["per_language"]["de"]["has_target"] == 1


def test_a_caption_list_keeps_its_translations_index_by_index(marian, tmp_path, capsys, upper_case):
    write_shards(tmp_path / "in", [{"captions": {"en": ["a dog", "", "a red circle", 7, "skip me"]}}])
    assert translate(capsys, "--shards", tmp_path / "in", "--out", tmp_path / "out", "--model", marian,
                     "--targets", "de")[0] == 0  # fmt: skip
    assert samples(tmp_path / "out")["s000"]["captions"]["de"] == ["A DOG", "", "A RED CIRCLE", "", ""]
    counts = json.loads((tmp_path / "out" / "manifest.json").read_text())["translation"]["per_language"]["de"]
    assert (counts["sentences"], counts["translated"], counts["empty_output"]) == (3, 2, 1)


@pytest.mark.parametrize("source,targets,named", [("en", "de,en-US", "en-US"), ("en-GB", "en", "en")])
def test_a_target_in_the_source_language_is_refused(tmp_path, capsys, monkeypatch, source, targets, named):
    monkeypatch.setattr(translator_module, "Translator", refuse_to_load)
    write_shards(tmp_path / "in", [{"captions": {"en": "a dog"}}])
    code, err = translate(capsys, "--shards", tmp_path / "in", "--out", tmp_path / "out", "--model", "m",
                          "--source-lang", source, "--targets", targets)  # fmt: skip
    assert_one_line_error(code, err, "prep translate", f"--targets: {named} ", f"--source-lang {source}")


def test_a_target_in_another_script_of_the_source_language_is_kept():
    """Simplified -> Traditional Chinese is a translation; a region subtag (en -> en-US) is not."""
    from data_prep.translate import _targets

    assert _targets("zh-Hant,de", "zh") == ["zh-Hant", "de"]


def test_the_skip_warning_rate_limit_holds_across_shards(marian, tmp_path, capsys, caplog):
    write_shards(tmp_path / "in", [None] * 12)  # 12 shards, each one sample without .json
    with caplog.at_level(logging.WARNING, logger="cclm.data"):
        code, _ = translate(capsys, "--shards", tmp_path / "in", "--out", tmp_path / "out", "--model", marian,
                            "--targets", "de")  # fmt: skip
    assert code == 0
    warned = [r.getMessage() for r in caplog.records if "missing_caption" in r.getMessage()]
    assert [w.rsplit("(", 1)[1] for w in warned] == [f"{n} so far)" for n in range(1, 11)]  # then the 100th
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped"] == {"missing_caption": 12}
