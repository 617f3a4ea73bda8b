"""``cclm prep translate`` with tiny random Marian, M2M100 and NLLB models built here: every caption gets a
translation per target, everything else stays byte for byte, a killed run resumes to the same output, bad input
is counted or refused with a clear message, and language codes map per model family."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from cclm.cli import main as cclm_main
from cclm.data.examples import caption_choices
from cclm.data.shards import VIEW_IMAGE_CAPTION, ShardSink, iter_tar_samples
from data_prep.translation import codes, output
from data_prep.translation.translator import GenerationSettings, Translator
from tests.translation_models import build_m2m100, build_marian, build_nllb

# OPUS-MT's Moses punctuation normalisation is optional (sacremoses); these garbage models do not need it.
pytestmark = pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")

CAPTIONS = [  # (captions of a sample, extra members)
    ({"en": "a red circle above a blue square"}, {}),
    ({"en": ["two small green triangles on the left", "a dog runs along the beach"]}, {"txt": b"kept as is"}),
    ({"en": "a red circle above a blue square", "de": "ein roter Kreis"}, {}),  # has German already
    ({"fr": "un cercle rouge"}, {}),  # no English caption: copied unchanged
    ({"en": "people walking on a busy street in the rain"}, {}),
    ({"en-US": "a plate of food with rice"}, {}),
    ({"en": "the quick brown fox"}, {}),
]


def _jpeg(seed: int) -> bytes:
    rng = random.Random(seed)
    out = io.BytesIO()
    Image.new("RGB", (8, 8), tuple(rng.randrange(256) for _ in range(3))).save(out, format="JPEG")
    return out.getvalue()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "marian": build_marian(root / "opus-mt-en-de"),
        "marian_multi": build_marian(
            root / "opus-mt-en-ROMANCE", target=None, target_tokens=(">>fra<<", ">>spa<<")
        ),
        "m2m100": build_m2m100(root / "m2m100"),
        "nllb": build_nllb(root / "nllb"),
    }


@pytest.fixture
def shards(tmp_path):
    folder = tmp_path / "in"
    with ShardSink(folder, VIEW_IMAGE_CAPTION, max_samples=3, command="test") as sink:
        for i, (captions, extra) in enumerate(CAPTIONS):
            meta = {"captions": captions, "url": f"http://x/{i}.jpg"}
            sink.write(
                f"s{i:03d}", {"jpg": _jpeg(i), "json": json.dumps(meta).encode(), **extra}, list(captions)
            )
        sink.close()
    return folder


def translate(*args: str) -> int:
    return cclm_main(["prep", "translate", "--no-progress", "--threads", "1", "--batch-size", "3", *args])


def read(folder) -> list[dict]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return [s for name in manifest["files"] for s in iter_tar_samples(str(folder / name))]


def test_every_caption_gets_a_translation_and_the_rest_is_byte_identical(models, shards, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        translate(
            "--shards", str(shards), "--out", str(out), "--model", str(models["m2m100"]), "--targets", "de,fr"
        )
        == 0
    )
    report = capsys.readouterr().out
    before, after = read(shards), read(out)
    assert [s["__key__"] for s in after] == [s["__key__"] for s in before]
    reference = Translator(str(models["m2m100"]), "en", ["de", "fr"], "cpu", settings=GenerationSettings())
    german = set()
    for old, new in zip(before, after):
        assert [k for k in new if k != "__url__"] == [k for k in old if k != "__url__"]  # members, in order
        assert all(new[ext] == old[ext] for ext in old if ext not in ("json", "__url__"))  # image, txt
        old_meta, new_meta = json.loads(old["json"]), json.loads(new["json"])
        assert {k: new_meta["captions"][k] for k in old_meta["captions"]} == old_meta["captions"]
        assert new_meta["url"] == old_meta["url"]
        sources = [
            c
            for k, v in old_meta["captions"].items()
            if k.startswith("en")
            for c in ([v] if isinstance(v, str) else v)
        ]
        if not sources:
            assert new["json"] == old["json"]  # copied unchanged
            continue
        for lang in ("de", "fr"):
            if lang in old_meta["captions"]:
                assert lang not in new_meta.get("machine_translated", {})  # a human caption is kept
                continue
            # Batched, sorted by length and de-duplicated, yet each caption gets its own sentence's translation.
            expected = [reference.translate([s], lang).texts[0] for s in sources]
            assert new_meta["captions"][lang] == (expected[0] if len(expected) == 1 else expected)
            german.update(expected if lang == "de" else [])
            assert new_meta["machine_translated"][lang] == {"model": str(models["m2m100"]), "from": "en"}
        # The training pipeline reads the new captions.
        assert {"de", "fr"} <= {lang for lang, _ in caption_choices(new_meta, frozenset())}
    assert len(german) == 6  # the model's output depends on its input, so a mix-up would show
    manifest = json.loads((out / "manifest.json").read_text())
    n_sources = 7  # English captions of the samples without German; the one with German is counted as kept
    assert manifest["translation"]["model"] == str(models["m2m100"])
    assert manifest["translation"]["family"] == "m2m100"
    assert manifest["translation"]["per_language"]["de"] == {
        "sentences": n_sources - 1, "translated": n_sources - 1, "empty_output": 0, "truncated": 0, "has_target": 1,
        "capped_output": n_sources - 1,  # a random model never ends a sentence
    }  # fmt: skip
    assert manifest["translation"]["per_language"]["fr"]["translated"] == n_sources
    assert manifest["skipped"] == {"no_source_caption": 1}
    assert (
        manifest["samples"] == len(CAPTIONS)
        and manifest["files"] == json.loads((shards / "manifest.json").read_text())["files"]
    )
    assert json.loads((out / "sizes.json").read_text()) == json.loads((shards / "sizes.json").read_text())
    assert (
        "de: 6 sentences, 6 translated" in report and "no_source_caption=1" in report and "tokens/s" in report
    )


def test_a_killed_run_resumes_skipping_finished_shards_with_the_same_output(
    models, shards, tmp_path, monkeypatch
):
    args = ["--shards", str(shards), "--model", str(models["marian"]), "--targets", "de"]
    assert translate(*args, "--out", str(tmp_path / "whole")) == 0

    real_write, written = output.write_shard, []

    def killed_while_writing_the_second(path, samples):
        if written:
            path.with_name(path.name + ".partial").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        real_write(path, samples)
        written.append(path.name)

    monkeypatch.setattr(output, "write_shard", killed_while_writing_the_second)
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        translate(*args, "--out", str(resumed))
    assert written == ["shard-000000.tar"] and not (resumed / "manifest.json").exists()
    monkeypatch.setattr(output, "write_shard", real_write)

    calls = []
    real_translate = Translator.translate
    monkeypatch.setattr(
        Translator, "translate", lambda self, s, t: calls.append(len(s)) or real_translate(self, s, t)
    )
    assert translate(*args, "--out", str(resumed)) == 0
    assert sum(calls) == 3  # the English captions of shards 1 and 2 only: shard 0 was finished
    assert not list(resumed.glob("*.partial"))
    for name in json.loads((tmp_path / "whole" / "sizes.json").read_text()):
        assert (resumed / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    whole, again = (json.loads((d / "manifest.json").read_text()) for d in (tmp_path / "whole", resumed))
    assert whole["translation"] == again["translation"] and whole["skipped"] == again["skipped"]

    # A finished shard changed on disk is written again (its checksum no longer matches).
    (resumed / "shard-000001.tar").write_bytes(b"damaged")
    calls.clear()
    assert translate(*args, "--out", str(resumed)) == 0
    assert (
        sum(calls) == 2
        and (resumed / "shard-000001.tar").read_bytes()
        == (tmp_path / "whole" / "shard-000001.tar").read_bytes()
    )


def test_a_rerun_with_other_settings_or_into_a_foreign_folder_is_refused(models, shards, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert (
        translate("--shards", str(shards), "--out", out, "--model", str(models["marian"]), "--targets", "de")
        == 0
    )
    capsys.readouterr()
    assert (
        translate(
            "--shards",
            str(shards),
            "--out",
            out,
            "--model",
            str(models["marian"]),
            "--targets",
            "de",
            "--num-beams",
            "2",
        )
        == 2
    )
    assert "started with other settings (num_beams=1)" in capsys.readouterr().err
    assert (
        translate(
            "--shards", str(shards), "--out", str(shards), "--model", str(models["marian"]), "--targets", "de"
        )
        == 2
    )
    assert "is an input folder" in capsys.readouterr().err


def translated_to_german(shards: Path, out: Path, model: Path) -> dict:
    """``cclm prep translate`` of ``shards`` into German with ``model``: its manifest (the run must succeed)."""
    assert (
        translate("--shards", str(shards), "--out", str(out), "--model", str(model), "--targets", "de") == 0
    )
    return json.loads((out / "manifest.json").read_text())


def test_a_corrupt_input_shard_loses_only_its_damaged_samples_counted(models, shards, tmp_path, capsys):
    shard = shards / "shard-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])  # a truncated download: the first sample survives
    out = tmp_path / "out"
    manifest = translated_to_german(shards, out, models["marian"])
    assert manifest["skipped"]["corrupt_shard"] == 2 and manifest["samples"] == len(CAPTIONS) - 2
    assert [s["__key__"] for s in iter_tar_samples(str(out / "shard-000001.tar"))] == ["s003"]
    assert "corrupt_shard=2" in capsys.readouterr().out


def test_a_lone_surrogate_in_a_caption_is_a_counted_skip_and_the_sample_is_copied(
    models, tmp_path, capsys, caplog
):
    """Half an emoji (a scraper cut it, JSON escaped it) is no Unicode text: neither a tokenizer nor a UTF-8 writer
    takes it, in a source caption or any other. The sample is copied as it is and counted, as a training reader
    skips it; so does ``cclm prep tokenizer`` reading the translated shards."""
    metas = [
        b'{"captions": {"en": "a dog runs along the beach"}}',
        b'{"captions": {"en": "a cat \\ud83d on a mat"}}',
        b'{"captions": {"en": "a red circle", "fr": "un cercle \\ud83d rouge"}}',
        b'{"captions": {"en": "a bird \\ud83d\\udc26 on a tree"}}',  # a whole emoji (a pair) is fine
    ]
    shards = tmp_path / "in"
    with ShardSink(shards, VIEW_IMAGE_CAPTION, max_samples=2, command="test") as sink:
        for i, meta in enumerate(metas):
            sink.write(f"s{i:03d}", {"jpg": _jpeg(i), "json": meta}, ["en"])
        sink.close()
    out = tmp_path / "out"
    manifest = translated_to_german(shards, out, models["marian"])
    assert manifest["skipped"] == {"bad_json": 2} and manifest["samples"] == 4
    assert manifest["translation"]["per_language"]["de"]["translated"] == 2
    written = {s["__key__"]: s["json"] for s in read(out)}
    assert written["s001"] == metas[1] and written["s002"] == metas[2]  # copied unchanged
    assert "de" in json.loads(written["s003"])["captions"]
    assert "shard-000000.tar: s001.json: a lone UTF-16 surrogate" in caplog.text
    assert "shard-000001.tar: s002.json: a lone UTF-16 surrogate" in caplog.text

    tokenizer = [
        "prep",
        "tokenizer",
        "--shards",
        str(out),
        "--out",
        str(tmp_path / "tok"),
        "--vocab-size",
        "60",
    ]
    assert cclm_main(tokenizer) == 0
    assert "on 4 sentences, skipped bad_json=2" in capsys.readouterr().out
    assert f"{out / 'shard-000000.tar'}: sample s001: a lone UTF-16 surrogate" in caplog.text


def test_empty_translations_are_counted_and_not_written(models, shards, tmp_path):
    from transformers import MarianMTModel

    folder = tmp_path / "opus-mt-en-de"
    build_marian(folder)
    model = MarianMTModel.from_pretrained(folder)
    model.final_logits_bias[0, model.config.eos_token_id] = 1e4  # writes </s> at once
    model.save_pretrained(folder)
    out = tmp_path / "out"
    assert (
        translate("--shards", str(shards), "--out", str(out), "--model", str(folder), "--targets", "de") == 0
    )
    counts = json.loads((out / "manifest.json").read_text())["translation"]["per_language"]["de"]
    assert counts["empty_output"] == counts["sentences"] == 6 and counts["translated"] == 0
    assert counts["capped_output"] == 0  # it ended every output
    assert all("machine_translated" not in json.loads(s["json"]) for s in read(out))


def test_outputs_cut_at_their_length_cap_are_counted_and_kept(
    models, shards, tmp_path, capsys, caplog, monkeypatch
):
    out = tmp_path / "out"  # a random model never writes </s>: every output runs to its cap
    assert (
        translate(
            "--shards", str(shards), "--out", str(out), "--model", str(models["marian"]), "--targets", "de"
        )
        == 0
    )
    counts = json.loads((out / "manifest.json").read_text())["translation"]["per_language"]["de"]
    assert counts["capped_output"] == counts["translated"] == counts["sentences"] == 6
    assert "6 outputs cut at the length cap" in capsys.readouterr().out
    assert "6 translations reached their length cap" in caplog.text and "(de=6)" in caplog.text

    # An output is capped when </s> is not within its cap, not when it ends right at its cap.
    translator = Translator(
        str(models["marian"]),
        "en",
        ["de"],
        "cpu",
        settings=GenerationSettings(batch_size=1, max_new_tokens=4),
    )
    config = translator.model.config
    word = translator.tokenizer("a dog")["input_ids"][0]
    outputs = iter([[word, config.eos_token_id], [word] * 4 + [config.eos_token_id], [word] * 6])

    def generate(input_ids, attention_mask, max_new_tokens, **kwargs):
        row = [config.decoder_start_token_id, *next(outputs)]
        return torch.tensor([row + [config.pad_token_id] * (1 + max_new_tokens - len(row))])

    monkeypatch.setattr(translator.model, "generate", generate)
    result = translator.translate(["a dog"] * 3, "de")
    assert result.capped == [False, False, True]
    assert result.texts[1] == result.texts[2] != result.texts[0]  # the cap keeps 4 tokens either way


def test_a_text_corpus_becomes_parallel_shards(models, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(
        b"a red circle\n\ntwo small green triangles\nbad \xff line\na dog runs\na red circle\n"
    )
    out = tmp_path / "out"
    rc = translate(
        "--text",
        str(corpus),
        "--out",
        str(out),
        "--model",
        str(models["marian_multi"]),
        "--targets",
        "fr,es",
        "--shard-samples",
        "4",
    )
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["view"] == "parallel_text" and manifest["files"] == [
        "shard-000000.tar",
        "shard-000001.tar",
    ]
    assert manifest["skipped"] == {"bad_utf8": 1, "empty_text": 1}
    samples = [json.loads(s["json"]) for s in read(out)]
    lines = {1: "a red circle", 3: "two small green triangles", 5: "a dog runs", 6: "a red circle"}
    assert [s["__key__"] for s in read(out)] == [f"l{n:09d}_{t}" for n in lines for t in ("es", "fr")]
    assert [s["src"] for s in samples] == [text for text in lines.values() for _ in "ab"]
    assert {(s["src_lang"], s["tgt_lang"], s["translation_model"]) for s in samples} == {
        ("en", t, str(models["marian_multi"])) for t in ("fr", "es")
    }
    assert samples[0]["tgt"] == samples[-2]["tgt"] and all(
        s["tgt"] for s in samples
    )  # same line, same output
    # the pairs a pretraining run's language filter is checked against (en-fr alone keeps none of [fr])
    assert manifest["language_pairs"] == {"en": {"es": 4, "fr": 4}}


def test_language_codes_per_model_family(models):
    nllb = set(["deu_Latn", "zho_Hans", "zho_Hant", "arb_Arab", "srp_Cyrl"])
    assert codes.nllb_code("de", nllb, "m") == "deu_Latn"
    assert codes.nllb_code("zh-TW", nllb, "m") == codes.nllb_code("zh-Hant", nllb, "m") == "zho_Hant"
    assert codes.nllb_code("ar", nllb, "m") == "arb_Arab"
    with pytest.raises(codes.UnsupportedLanguage, match="srp_Latn.*it has srp_Cyrl"):
        codes.nllb_code("sr-Latn", nllb, "m")
    assert codes.m2m100_code("de", {"de", "zh"}, "m") == "de"
    with pytest.raises(codes.UnsupportedLanguage, match="'kl' is not a language of M2M100"):
        codes.m2m100_code("kl", {"de", "zh"}, "m")
    assert codes.marian_pair("Helsinki-NLP/opus-mt-tc-big-en-fr", None, None) == ("en", "fr")
    assert codes.marian_pair("Helsinki-NLP/opus-mt-en-ROMANCE", None, None) == ("en", None)
    assert codes.marian_pair("/models/my-marian", "eng", "deu") == ("en", "de")
    assert codes.marian_target_token("pt-BR", [">>por<<", ">>spa<<"], "m") == ">>por<<"
    with pytest.raises(codes.UnsupportedLanguage, match="not an ISO 639"):
        codes.cclm_code("xx")

    nllb_translator = Translator(str(models["nllb"]), "en", ["de", "zh-Hant"], "cpu")
    tokens = {
        t: nllb_translator.tokenizer.convert_ids_to_tokens(s.forced_bos)
        for t, s in nllb_translator.targets.items()
    }
    assert tokens == {"de": "deu_Latn", "zh-Hant": "zho_Hant"} and nllb_translator.family == "nllb"
    assert len(nllb_translator.translate(["a red circle", "a dog"], "zh-Hant").texts) == 2
    m2m = Translator(str(models["m2m100"]), "en", ["de"], "cpu")
    assert m2m.tokenizer.convert_ids_to_tokens(m2m.targets["de"].forced_bos) == "__de__"
    multi = Translator(str(models["marian_multi"]), "en", ["fr"], "cpu")
    assert multi.targets["fr"].prefix == ">>fra<< "


def test_marian_target_tokens_name_the_macrolanguage_or_mandarin_as_opus_mt_models_do():
    """opus-mt-en-zh writes Mandarin (``>>cmn_Hans<<``), opus-mt-en-ar the Arabic macrolanguage (``>>ara<<``),
    where NLLB has ``zho_Hans`` and ``arb_Arab``; a script asked for is never swapped for another."""
    en_zh = [">>cmn<<", ">>cmn_Hans<<", ">>cmn_Hant<<", ">>yue_Hans<<", ">>yue_Hant<<", ">>wuu<<"]
    assert codes.marian_target_token("zh", en_zh, "m") == codes.marian_target_token("zh-Hans", en_zh, "m")
    assert codes.marian_target_token("zh", en_zh, "m") == ">>cmn_Hans<<"
    assert codes.marian_target_token("zh-TW", en_zh, "m") == codes.marian_target_token("zh-Hant", en_zh, "m")
    assert codes.marian_target_token("zh-Hant", en_zh, "m") == ">>cmn_Hant<<"
    assert codes.marian_target_token("zh-Hant", [">>cmn<<", ">>zho_Hans<<"], "m") == ">>cmn<<"
    assert (
        codes.marian_target_token("ar", [">>ara<<", ">>ara_Latn<<", ">>arz<<", ">>ary<<"], "m") == ">>ara<<"
    )
    assert codes.marian_target_token("fa", [">>fas<<", ">>pus<<"], "m") == ">>fas<<"
    assert codes.marian_target_token("sr-Latn", [">>srp_Cyrl<<", ">>srp_Latn<<"], "m") == ">>srp_Latn<<"
    with pytest.raises(codes.UnsupportedLanguage, match="'sr-Latn' is not a target"):
        codes.marian_target_token("sr-Latn", [">>srp_Cyrl<<"], "m")
    assert codes.marian_pair("/models/my-marian", "eng", "cmn") == ("en", "zh")
    assert codes.marian_pair("/models/my-marian", "eng", "ara") == ("en", "ar")


@pytest.mark.parametrize(
    ("model", "targets", "message"),
    [
        ("marian", "fr", "translates into 'de' only"),
        ("marian_multi", "de", "'de' is not a target of Marian model"),
        ("m2m100", "kl", "'kl' is not a language of M2M100"),
        ("m2m100", "xx", "'xx' is not an ISO 639"),
        ("nllb", "en", "en is the source language"),
    ],
)
def test_a_target_the_model_cannot_write_is_a_clear_error(
    models, shards, tmp_path, capsys, model, targets, message
):
    rc = translate(
        "--shards",
        str(shards),
        "--out",
        str(tmp_path / "o"),
        "--model",
        str(models[model]),
        "--targets",
        targets,
    )
    assert rc == 2 and message in capsys.readouterr().err
    assert not list((tmp_path / "o").glob("*.tar"))


def test_half_precision_on_cpu_and_a_missing_model_are_refused(shards, tmp_path, capsys):
    assert (
        translate(
            "--shards",
            str(shards),
            "--out",
            str(tmp_path / "o"),
            "--model",
            str(tmp_path / "none"),
            "--targets",
            "de",
        )
        == 2
    )
    assert "cannot load translation model" in capsys.readouterr().err
    assert (
        translate(
            "--shards",
            str(shards),
            "--out",
            str(tmp_path / "o"),
            "--model",
            "x",
            "--targets",
            "de",
            "--device",
            "cpu",
            "--dtype",
            "float16",
        )
        == 2
    )
    assert "--dtype float16 is for GPUs" in capsys.readouterr().err


def test_a_jsonl_corpus_reads_its_text_field_and_counts_bad_lines(models, tmp_path, caplog):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        '{"text": "a red circle"}\nnot json\n{"caption": "no text field"}\n\n{"text": "a dog runs"}\n'
        # half an emoji (a scraper cut it): the text is no Unicode text; in another field it does no harm
        '{"text": "a cat \\ud83d on a mat"}\n{"text": "a bird", "url": "x\\ud83d"}\n'
    )
    out = tmp_path / "out"
    assert (
        translate(
            "--text", str(corpus), "--out", str(out), "--model", str(models["marian"]), "--targets", "de"
        )
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == {"bad_json": 2, "empty_text": 1}
    assert [(s["__key__"], json.loads(s["json"])["src"]) for s in read(out)] == [
        ("l000000001_de", "a red circle"),
        ("l000000005_de", "a dog runs"),
        ("l000000007_de", "a bird"),
    ]
    assert f"{corpus}:6: a lone UTF-16 surrogate" in caplog.text


def test_the_benchmark_compares_batched_with_the_naive_loop(tmp_path):
    """``make bench-translate``'s measurement on a few sentences: both ways give the same translations."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_translate.py"
    spec = importlib.util.spec_from_file_location("bench_translate", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.bench_model("tiny", tmp_path / "opus-mt-en-de", n=12, batch_size=4)
    assert result["same_output_as_naive"] and result["runs"]["naive"]["sentences"] == 12
    assert result["runs"]["batched"]["sentences"] == result["runs"]["batched_unsorted"]["sentences"] == 12
