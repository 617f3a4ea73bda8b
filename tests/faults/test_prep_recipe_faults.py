"""Faults a tester injected into data preparation and the cViL-VQA object tags, each a clear error (one line,
naming the file; no traceback) or the right result:

- a prep worker killed (SIGKILL, as the out-of-memory killer does) stops the conversion naming the signal, instead
  of waiting for the dead worker forever, and publishes nothing; ``ordered_map`` keeps its order and reads a
  stream lazily;
- a second conversion into a folder that holds one already, with another ``--prefix``, is refused (it would
  replace the first one's ``manifest.json`` and ``sizes.json``);
- an ``object_tags`` lexicon or tags file of the wrong shape, or not UTF-8, is refused when the recipe loads it,
  before the teacher trains, naming the file (and the line);
- ``cclm prep opus`` refuses a corpus found twice (two versions of it) instead of reading the last one alone;
- ``cclm prep tokenizer`` refuses an ``--out`` that holds a tokenizer, unless ``--overwrite``.

The worker tests run in a process of their own with a timeout, so that a conversion that hangs fails the test
instead of hanging it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from cclm.cli import main as cclm_main
from cclm.data.shards import VIEW_PARALLEL, ShardSink
from cclm.recipes.object_tags import AnnotationTags, TagError, TagTranslator, build_image_tags

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 120  # seconds for a subprocess that would hang on the faults above


def prep(*args) -> int:
    return cclm_main(["prep", *map(str, args), "--no-progress"])


def run_python(code: str, cwd: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """``code`` in a new python process (and process group: a hung pool's workers are killed with it)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"hung for {timeout} s (killed): {out[-2000:]}\n{err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def error_lines(err: str) -> list[str]:
    """stderr without warnings and progress bars: the error lines a user reads."""
    return [
        line for line in err.splitlines() if line.strip() and "Warning" not in line and "warn" not in line
    ]


# ------------------------------------------------------------------------------------------ a killed worker
def test_a_killed_prep_worker_stops_the_conversion_naming_the_signal_and_publishes_nothing(tmp_path):
    """`cclm prep coco-regions --num-workers 2` with a worker killed as the OOM killer does (SIGKILL while it
    encodes an image): one line naming the death and its signal, status 2, and an empty output folder."""
    result = run_python(
        f"""
        import os, signal, sys
        from pathlib import Path
        from tests.test_region_converters import coco_files
        import data_prep.regions.common as common
        from cclm.cli import main

        tmp = Path({str(tmp_path)!r})
        instances, _, root = coco_files(tmp)
        parent, real = os.getpid(), common.encode_image

        def dying(data, *args, **kwargs):
            if os.getpid() != parent:  # in a worker
                os.kill(os.getpid(), signal.SIGKILL)
            return real(data, *args, **kwargs)

        common.encode_image = dying
        rc = main(["prep", "coco-regions", "--instances", str(instances), "--image-root", str(root),
                   "--out", str(tmp / "out"), "--num-workers", "2", "--no-progress"])
        print("rc", rc, sorted(p.name for p in (tmp / "out").rglob("*")))
        """,
        cwd=REPO,
    )
    assert result.stdout.splitlines()[-1] == "rc 2 []", result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result.stderr)
    assert line.startswith("cclm prep coco-regions: a worker process died in coco-regions (pid ")
    assert "killed by SIGKILL" in line and "fewer --num-workers" in line


def test_ordered_map_names_a_dead_worker_keeps_order_and_reads_a_stream_lazily(tmp_path):
    """ordered_map itself: results in input order; a stream is read at most a few chunks per worker ahead of the
    consumer (not to its end); an error of ``fn`` comes at its chunk's place, one of the input after what was read before it; a worker that dies raises
    WorkerDiedError naming its exit, with no hang."""
    result = run_python(
        """
        import itertools, os, signal
        from data_prep.workers import WorkerDiedError, ordered_map

        def square(x):
            return x * x

        def die_at_50(x):
            if x == 50:
                os.kill(os.getpid(), signal.SIGKILL)
            return x

        def exit_at_50(x):
            if x == 50:
                os._exit(3)
            return x

        assert list(ordered_map(square, range(1000), 2, 1000, False, "t", chunksize=7)) == [
            x * x for x in range(1000)]
        read = []
        def stream():
            for x in itertools.count():
                read.append(x)
                yield x
        results = ordered_map(square, stream(), 2, None, False, "t", chunksize=4)
        assert list(itertools.islice(results, 10)) == [x * x for x in range(10)]
        results.close()
        print("read", len(read))
        def fail_at_7(x):
            if x == 7:
                raise ValueError("bad item 7")
            return x

        def failing_stream():
            yield from range(5)
            raise OSError("input gone")

        got = []
        try:
            for x in ordered_map(fail_at_7, range(100), 2, 100, False, "t", chunksize=3):
                got.append(x)
        except ValueError as err:
            assert got == list(range(6)) and str(err) == "bad item 7", (got, err)  # chunk [6, 7, 8] failed
        got = []
        try:
            for x in ordered_map(square, failing_stream(), 2, None, False, "t", chunksize=2):
                got.append(x)
        except OSError as err:
            assert got == [0, 1, 4, 9, 16] and str(err) == "input gone", (got, err)
        for fn in (die_at_50, exit_at_50):
            try:
                list(ordered_map(fn, range(200), 2, 200, False, "the test map", chunksize=4))
            except WorkerDiedError as err:
                print("died", err)
        """,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    read = int(lines[0].split()[1])
    assert read <= 10 + 4 * (2 * 2 + 2), lines[0]  # what was taken, plus the chunks in flight
    assert lines[1].startswith("died a worker process died in the test map (pid ")
    assert "killed by SIGKILL" in lines[1]
    assert "exited with status 3" in lines[2]


# ------------------------------------------------------------------------- a second conversion, other prefix
def test_a_second_conversion_into_a_shard_folder_with_another_prefix_is_refused(tmp_path, capsys):
    a, b, out = tmp_path / "a.tsv", tmp_path / "b.tsv", tmp_path / "out"
    a.write_text("hello\thallo\ngood morning\tguten Morgen\n", encoding="utf-8")
    b.write_text("cat\tKatze\n", encoding="utf-8")
    assert prep("parallel-tsv", "--input", a, "--src-lang", "en", "--tgt-lang", "de", "--out", out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    rc = prep(
        "parallel-tsv",
        "--input",
        b,
        "--src-lang",
        "en",
        "--tgt-lang",
        "de",
        "--out",
        out,
        "--prefix",
        "part2",
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert err == (
        f"cclm prep parallel-tsv: {out} already holds another conversion's output (shard-000000.tar, "
        "manifest.json, sizes.json); write into a new folder\n"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the first conversion is intact


@pytest.mark.parametrize("held", ["other-000000.tar", "manifest.json", "sizes.json"])
def test_a_shard_sink_refuses_a_folder_with_any_shards_or_index(tmp_path, held):
    (tmp_path / held).write_text("{}")
    with pytest.raises(
        FileExistsError, match=rf"{tmp_path} already holds another conversion's output \({held}\)"
    ):
        ShardSink(tmp_path, VIEW_PARALLEL, prefix="part2")


def test_a_shard_sink_still_takes_a_folder_with_only_a_killed_conversions_temporaries(tmp_path):
    (tmp_path / "part2-000000.tar.partial").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("mine")
    with ShardSink(tmp_path, VIEW_PARALLEL, prefix="part2") as sink:
        sink.write("k0", {"json": b"{}"})
        sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json",
        "notes.txt",
        "part2-000000.tar",
        "sizes.json",
    ]


# ------------------------------------------------------------------------------------ object tags files
EXPECTED = '{"<lang>": {"<English tag>": "<word>"}}'
WORDS = [
    "black",
    "gray",
    "red",
    "green",
    "blue",
    "yellow",
    "teal",
    "brown",
    "rectangle",
    "circle",
    "triangle",
]
BAD_LEXICONS = {
    "list": (b'["red", "circle"]', f": expected {EXPECTED}, got a JSON list"),
    "lang_list": (b'{"ja": ["red", "circle"]}', f": language 'ja' maps to a JSON list; expected {EXPECTED}"),
    "numbers": (
        json.dumps({"ja": {w: i for i, w in enumerate(WORDS)}}).encode(),
        ": 'ja': 'black' maps to 0; expected a word",
    ),
    "latin1": (b'{"ja": {"red": "\xe8\xb5"}}', ":1: not UTF-8 (byte 0xe8)"),
    "latin1_line3": (b'{\n "ja": {\n  "red": "r\xf6t"}}', ":3: not UTF-8 (byte 0xf6)"),
}


@pytest.mark.parametrize("name", sorted(BAD_LEXICONS))
def test_a_bad_lexicon_is_refused_when_loaded_naming_the_file(tmp_path, name):
    content, message = BAD_LEXICONS[name]
    file = tmp_path / f"lexicon_{name}.json"
    file.write_bytes(content)
    with pytest.raises(TagError) as caught:
        TagTranslator.from_file(file)
    assert str(caught.value).startswith(f"object_tags.lexicon: {file}{message}"), caught.value


def test_a_lexicon_given_as_a_mapping_is_checked_too():
    with pytest.raises(TagError, match="'de': 'dog' maps to None"):
        TagTranslator({"de": {"dog": None}})
    assert TagTranslator({"de": {"dog": "Hund"}})(["dog"], "de") == ["Hund"]


def test_a_tags_file_that_is_not_utf8_names_its_line(tmp_path):
    file = tmp_path / "tags.jsonl"
    file.write_bytes(b'{"image": "a.png", "tags": ["red"]}\n{"image": "b\xe9.png", "tags": ["blue"]}\n')
    with pytest.raises(TagError) as caught:
        AnnotationTags(file)
    assert str(caught.value) == f"object_tags.file: {file}:2: not UTF-8 (byte 0xe9)"
    file.write_bytes(b'\xef\xbb\xbf{"image": "a.png", "tags": ["red"]}\n')  # a byte-order mark is no error
    assert AnnotationTags(file).tags == {"a.png": ["red"]}


BAD_RECIPE_FILES = {
    "lexicon_list": ("lexicon", *BAD_LEXICONS["list"]),
    "lexicon_lang_list": ("lexicon", *BAD_LEXICONS["lang_list"]),
    "lexicon_numbers": ("lexicon", *BAD_LEXICONS["numbers"]),
    "lexicon_latin1": ("lexicon", *BAD_LEXICONS["latin1"]),
    "tags_latin1": (
        "file",
        b'{"image": "a.png", "tags": ["red"]}\n{"image": "b\xe9.png", "tags": []}\n',
        ":2: not",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_RECIPE_FILES))
def test_cvil_vqa_refuses_a_bad_tags_file_before_the_teacher_trains(tmp_path, capsys, monkeypatch, name):
    """`cclm recipe cvil_vqa ... object_tags.lexicon=BAD` (or object_tags.file=BAD): one line naming the file,
    status 2, and the teacher never starts fine-tuning."""
    pytest.importorskip("easy_vqa")
    import cclm.recipes.cvil_vqa as recipe

    def no_training(*args, **kwargs):
        raise AssertionError("the teacher started fine-tuning before the tags files were checked")

    monkeypatch.setattr(recipe, "finetune_teacher", no_training)
    key, content, message = BAD_RECIPE_FILES[name]
    file = tmp_path / f"{name}.json{'l' * (key == 'file')}"
    file.write_bytes(content)
    settings = [f"object_tags.{key}={file}"]
    if key == "file":
        settings.append("object_tags.source=annotations")
    argv = [
        "recipe",
        "cvil_vqa",
        str(REPO / "configs/recipes/cvil_easy_vqa.yaml"),
        f"output_dir={tmp_path / 'out'}",
    ]
    argv += ["teacher_finetune.steps=1", "distill.steps=1", "data.train_examples=16", "data.test_examples=16"]
    assert cclm_main([*argv, *settings]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = error_lines(err)
    assert line.startswith(f"cclm recipe: object_tags.{key}: {file}{message}"), line


def test_build_image_tags_checks_the_lexicon_when_the_recipe_builds_it(tmp_path):
    from cclm.config import ObjectTagsConfig

    lexicon = tmp_path / "lexicon.json"
    lexicon.write_bytes(BAD_LEXICONS["numbers"][0])
    with pytest.raises(TagError, match=r"lexicon.json: 'ja': 'black' maps to 0"):
        build_image_tags(ObjectTagsConfig(enabled=True, lexicon=str(lexicon)), {})


# -------------------------------------------------------------------------------------- opus, a corpus twice
def moses(folder: Path, pairs: list[tuple[str, str]], corpus: str = "Europarl") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{corpus}.de-en.en").write_text("".join(f"{en}\n" for en, _ in pairs), encoding="utf-8")
    (folder / f"{corpus}.de-en.de").write_text("".join(f"{de}\n" for _, de in pairs), encoding="utf-8")


def test_opus_refuses_a_corpus_found_in_two_inputs_naming_both(tmp_path, capsys):
    v7, v8, out = tmp_path / "v7", tmp_path / "v8", tmp_path / "out"
    moses(v7, [("hello", "hallo"), ("thank you", "danke")])
    moses(v8, [("good night", "gute Nacht")])
    assert prep("opus", "--input", v7, v8, "--out", out) == 2
    err = capsys.readouterr().err
    assert err == (
        f"cclm prep opus: {v7 / 'Europarl.de-en.de'} and {v8 / 'Europarl.de-en.de'} are both "
        "Europarl.de-en.de: give each corpus once\n"
    )
    assert not out.exists() or not any(out.iterdir())
    # a folder and OPUS's zip of the same corpus
    with zipfile.ZipFile(tmp_path / "de-en.txt.zip", "w") as archive:
        archive.write(v7 / "Europarl.de-en.en", "Europarl.de-en.en")
        archive.write(v7 / "Europarl.de-en.de", "Europarl.de-en.de")
    assert prep("opus", "--input", tmp_path / "de-en.txt.zip", v7, "--out", out) == 2
    assert (
        f"{tmp_path / 'de-en.txt.zip'}:Europarl.de-en.de and {v7 / 'Europarl.de-en.de'}"
        in capsys.readouterr().err
    )
    assert prep("opus", "--input", v7, f"{v7}/", "--out", out) == 2
    assert f"--input {v7} is given twice" in capsys.readouterr().err
    # other corpora and versions of other names are still read together
    moses(tmp_path / "v9", [("yes", "ja")], corpus="europarl-v9")
    assert prep("opus", "--input", v7, tmp_path / "v9", "--out", out) == 0
    assert json.loads((out / "manifest.json").read_text())["samples"] == 3


# ---------------------------------------------------------------------------------------- tokenizer rerun
def test_prep_tokenizer_refuses_a_folder_that_holds_a_tokenizer_unless_overwrite(tmp_path, capsys):
    from cclm.data.tokenize import load_tokenizer

    first, second, bad = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "bad.txt"
    first.write_text("".join(f"a red circle number {i} on the left\n" for i in range(100)), encoding="utf-8")
    second.write_text("".join(f"zwei gelbe Dreiecke oben rechts {i}\n" for i in range(100)), encoding="utf-8")
    bad.write_bytes(b"good line\nbad \xff line\n")
    tok = tmp_path / "tok"
    args = ["--out", tok, "--vocab-size", 100]
    assert cclm_main(["prep", "tokenizer", "--text", str(first), *map(str, args)]) == 0
    original = (tok / "tokenizer.json").read_bytes()
    capsys.readouterr()

    assert cclm_main(["prep", "tokenizer", "--text", str(second), *map(str, args)]) == 2
    assert capsys.readouterr().err == (
        f"cclm prep tokenizer: --out {tok} already holds a tokenizer (tokenizer.json, "
        "tokenizer_config.json): give a new folder, or --overwrite to replace it\n"
    )
    assert (tok / "tokenizer.json").read_bytes() == original

    # --overwrite with a bad line in the input: the old tokenizer is left as it was, nothing else is left behind
    assert (
        cclm_main(
            ["prep", "tokenizer", "--text", str(second), "--text", str(bad), *map(str, args), "--overwrite"]
        )
        == 2
    )
    assert "bad.txt:2: not UTF-8" in capsys.readouterr().err
    assert (tok / "tokenizer.json").read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "bad.txt", "tok"]

    assert cclm_main(["prep", "tokenizer", "--text", str(second), *map(str, args), "--overwrite"]) == 0
    assert (tok / "tokenizer.json").read_bytes() != original
    assert "Dreiecke" in load_tokenizer(str(tok)).decode(
        load_tokenizer(str(tok))("zwei gelbe Dreiecke")["input_ids"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "bad.txt", "tok"]
