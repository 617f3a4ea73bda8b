"""The text normaliser saved with a model (``model.text.normalize``): ``pre_caption`` gives the CCLM reference's
outputs (``dataset/utils.py``; the expected strings below are worked out by hand from its code), and a model
saved with it reads "A Dog, Running!" exactly as "a dog running" through every path that tokenises its text --
the inference API, the evaluation, fine-tuning batches and cViL -- while a model saved with ``none`` does not. A
converted reference checkpoint carries ``pre_caption`` with the reference's 40 words."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import cclm
from cclm.cli import main as cclm_main
from cclm.config import TextNormalize
from cclm.data.normalize import normalizer_for, pre_caption
from cclm.evaluation.datasets import RetrievalSet
from cclm.evaluation.retrieval import tokenize_for_model, tokenize_texts
from cclm.evaluation.run import run_retrieval
from cclm.inference import convert_reference as cr
from cclm.model import CrossViewModel
from cclm.recipes.cvil import ParallelCollator
from cclm.tasks.batching import TaskCollator
from cclm.tasks.protocols import TaskSuite
from cclm.tasks.task_model import TaskModel
from tests.test_convert_reference import TEXT, TINY_SWIN, reference_checkpoint

CASED = ["A Dog, Running!", "A Red Circle -- above a Blue Square."]
PLAIN = ["a dog running", "a red circle above a blue square"]


# ------------------------------------------------------------------------------------------------ pre_caption
@pytest.mark.parametrize(
    "text, expected",
    [
        ("A Dog, Running!", "a dog running"),
        # every character of the reference's set , . ' ! ? " ( ) * # : ; ~ and - / becomes a space
        ("a,b.c'd!e?f\"g(h)i*j#k:l;m~n-o/p", "a b c d e f g h i j k l m n o p"),
        ("well-known e-mail/web", "well known e mail web"),
        ("(hello)", "hello"),
        # anything else stays, lower-cased
        ("A & B $5 [x] {y} @z <b> 50% +1 =2 |", "a & b $5 [x] {y} @z <b> 50% +1 =2 |"),
        ("<person> rides a bike", "person rides a bike"),
        ("A <PERSON>, smiling", "a person smiling"),
        # runs of two or more whitespace characters become one space; a single tab or newline stays
        ("a  dog \t\n cat", "a dog cat"),
        ("a\tdog", "a\tdog"),
        ("a dog.\n", "a dog"),
        ("a dog\n", "a dog"),
        ("  a dog  ", "a dog"),
        ("\ta dog", "\ta dog"),  # only spaces (and a final newline) are stripped
        # Python's lower() of non-ASCII letters
        ("Ein Großer HUND über DEM Fluss", "ein großer hund über dem fluss"),
        ("ÉCOLE À PARIS", "école à paris"),
        ("ΣΟΦΙΑ", "σοφια"),
        ("МАЛЕНЬКАЯ СОБАКА", "маленькая собака"),
        # CJK: only the ASCII punctuation changes; full-width punctuation is not in the set
        ("青い四角の上に赤い丸", "青い四角の上に赤い丸"),
        ("青い四角、赤い丸！", "青い四角、赤い丸！"),
        ("蓝色正方形(红色)!", "蓝色正方形 红色"),
        ("赤い丸。", "赤い丸。"),
        # nothing left
        ("?!...", ""),
        ("", ""),
        ("   ", ""),
        ("-/-", ""),
    ],
)
def test_pre_caption_matches_the_reference(text, expected):
    assert pre_caption(text) == expected
    assert pre_caption(text, max_words=40) == expected


@pytest.mark.parametrize(
    "text, max_words, expected",
    [
        ("one two three four five", 3, "one two three"),
        ("one two three", 3, "one two three"),
        ("one two three", 5, "one two three"),
        ("one two three four five", 0, "one two three four five"),  # 0 keeps every word
        ("a , b , c , d", 2, "a b"),  # words are counted after the punctuation is gone
        ("One,Two;Three", 2, "one two"),
        ("a\tb c d", 2, "a\tb c"),  # the reference splits on spaces only
        ("青い四角の上に赤い丸", 1, "青い四角の上に赤い丸"),  # no spaces: one word
    ],
)
def test_pre_caption_keeps_max_words(text, max_words, expected):
    assert pre_caption(text, max_words) == expected


def test_normalizer_for_reads_the_text_config(tiny_model_cfg):
    text_cfg = tiny_model_cfg.text
    assert text_cfg.normalize == TextNormalize.none
    assert normalizer_for(text_cfg)("A Dog, Running!") == "A Dog, Running!"
    text_cfg.normalize, text_cfg.max_words = TextNormalize.pre_caption, 2
    assert normalizer_for(text_cfg)("A Dog, Running!") == "a dog"


# ------------------------------------------------------------------------------------- saved with the model
def _save(cfg, tokenizer, out, normalize: TextNormalize, max_words: int = 40):
    cfg.text.normalize, cfg.text.max_words = normalize, max_words
    torch.manual_seed(0)
    CrossViewModel(cfg, load_pretrained=False).save_pretrained(out)
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture
def model_dirs(tmp_path, tiny_model_cfg, tiny_tokenizer):
    """The same random tiny model saved with normalize=pre_caption and with normalize=none."""
    return {
        mode: _save(tiny_model_cfg, tiny_tokenizer, tmp_path / mode.value, mode)
        for mode in (TextNormalize.pre_caption, TextNormalize.none)
    }


def test_the_normaliser_is_saved_with_the_model(model_dirs):
    config = json.loads((model_dirs[TextNormalize.pre_caption] / "config.json").read_text())
    assert (
        config["model"]["text"]["normalize"] == "pre_caption" and config["model"]["text"]["max_words"] == 40
    )
    loaded = CrossViewModel.from_pretrained(model_dirs[TextNormalize.pre_caption])
    assert loaded.cfg.text.normalize == TextNormalize.pre_caption and loaded.cfg.text.max_words == 40
    assert CrossViewModel.from_pretrained(model_dirs[TextNormalize.none]).cfg.text.normalize == "none"
    card = (model_dirs[TextNormalize.pre_caption] / "README.md").read_text()
    assert "| text normaliser | `pre_caption`" in card and "first 40 words kept" in card
    assert "| text normaliser | `none`" in (model_dirs[TextNormalize.none] / "README.md").read_text()


def test_inference_api_applies_the_saved_normaliser(model_dirs):
    engine = cclm.load(model_dirs[TextNormalize.pre_caption], device="cpu")
    torch.testing.assert_close(engine.encode_texts(CASED), engine.encode_texts(PLAIN), atol=0, rtol=0)
    ids_cased, _ = engine.tokenize(CASED)
    ids_plain, _ = engine.tokenize(PLAIN)
    assert torch.equal(ids_cased, ids_plain)
    images = [Image.new("RGB", (40, 40), colour) for colour in ("red", "blue", "white")]
    torch.testing.assert_close(
        engine.match(images[:1], CASED), engine.match(images[:1], PLAIN), atol=0, rtol=0
    )
    # re-ranking tokenises on its own path (evaluation's token ids)
    candidates = torch.tensor([[0, 1, 2], [2, 1, 0]])
    cased = engine.rerank(CASED, images, candidates)
    plain = engine.rerank(PLAIN, images, candidates)
    assert torch.equal(cased.indices, plain.indices)
    torch.testing.assert_close(cased.scores, plain.scores, atol=0, rtol=0)
    # image -> text retrieval over a text gallery
    assert torch.equal(
        engine.retrieve(images, CASED, k=2).indices, engine.retrieve(images, PLAIN, k=2).indices
    )

    untouched = cclm.load(model_dirs[TextNormalize.none], device="cpu")
    assert not torch.allclose(untouched.encode_texts(CASED), untouched.encode_texts(PLAIN))
    assert not torch.allclose(untouched.match(images[:1], CASED), untouched.match(images[:1], PLAIN))
    # the two folders hold the same weights: only the normaliser differs
    torch.testing.assert_close(untouched.encode_texts(PLAIN), engine.encode_texts(PLAIN), atol=0, rtol=0)


def _token_ids_seen_by(model, retrieval_set, tokenizer):
    """The token ids (unpadded, sorted) that evaluation feeds to ``model.encode_text``, and its output."""
    seen: list[list[int]] = []
    encode_text = model.encode_text

    def spy(ids, mask):
        seen.extend(row[m.bool()].tolist() for row, m in zip(ids, mask))
        return encode_text(ids, mask)

    model.encode_text = spy
    try:
        out = run_retrieval(model, retrieval_set, tokenizer, 32, batch_size=8, rerank=True, k_test=3)
    finally:
        del model.encode_text
    return sorted(seen), out


def test_evaluation_applies_the_saved_normaliser(model_dirs, tiny_tokenizer):
    images = [Image.new("RGB", (40, 40), colour) for colour in ("red", "blue")]

    def retrieval_set(texts):
        return RetrievalSet("toy", "en", images, list(texts), [0, 1], [[0], [1]])

    model = CrossViewModel.from_pretrained(model_dirs[TextNormalize.pre_caption]).eval()
    assert tokenize_for_model(model, tiny_tokenizer, CASED) == tokenize_for_model(
        model, tiny_tokenizer, PLAIN
    )
    assert tokenize_for_model(model, tiny_tokenizer, CASED) == tokenize_texts(tiny_tokenizer, PLAIN, 32)
    seen_cased, out_cased = _token_ids_seen_by(model, retrieval_set(CASED), tiny_tokenizer)
    seen_plain, out_plain = _token_ids_seen_by(model, retrieval_set(PLAIN), tiny_tokenizer)
    assert seen_cased == seen_plain and seen_cased
    assert out_cased.metrics == out_plain.metrics
    assert torch.equal(out_cased.t2i_ranks, out_plain.t2i_ranks)

    untouched = CrossViewModel.from_pretrained(model_dirs[TextNormalize.none]).eval()
    assert tokenize_for_model(untouched, tiny_tokenizer, CASED) == tokenize_texts(tiny_tokenizer, CASED, 32)
    seen_cased, _ = _token_ids_seen_by(untouched, retrieval_set(CASED), tiny_tokenizer)
    seen_plain, _ = _token_ids_seen_by(untouched, retrieval_set(PLAIN), tiny_tokenizer)
    assert seen_cased != seen_plain


def test_fine_tuning_batches_apply_the_saved_normaliser(model_dirs, tiny_tokenizer, tmp_path):
    labels = ["entailment", "neutral", "contradiction"]
    backbone = CrossViewModel.from_pretrained(model_dirs[TextNormalize.pre_caption])
    TaskModel(backbone, "xvnli", "single", labels).save(tmp_path / "task", tiny_tokenizer)
    task_model = TaskModel.load(tmp_path / "task").eval()  # a fine-tuned folder keeps the normaliser
    assert task_model.backbone.cfg.text.normalize == TextNormalize.pre_caption
    # what fine-tuning and scoring batch with (a suite whose task sets no token cap of its own)
    suite = SimpleNamespace(data_cfg=SimpleNamespace(max_length=0))
    collator = TaskSuite.collator(suite, task_model, tiny_tokenizer)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)

    def batch(texts, collate):
        return collate([{"images": im, "text": t, "label": 0} for im, t in zip(images, texts)])

    cased, plain = batch(CASED, collator), batch(PLAIN, collator)
    assert torch.equal(cased["text_ids"], plain["text_ids"])
    with torch.no_grad():
        torch.testing.assert_close(task_model.logits(cased), task_model.logits(plain), atol=0, rtol=0)

    untouched = TaskModel(
        CrossViewModel.from_pretrained(model_dirs[TextNormalize.none]), "xvnli", "single", labels
    )
    collator = TaskCollator.for_model(untouched.backbone, tiny_tokenizer)
    assert batch(CASED, collator)["text_ids"].tolist() != batch(PLAIN, collator)["text_ids"].tolist()

    # cViL: the English side as the teacher reads it, the translation as the student does
    parallel = ParallelCollator(untouched, tiny_tokenizer, task_model, tiny_tokenizer)
    out = parallel([{"images": im, "en": t, "tgt": t} for im, t in zip(images, CASED)])
    as_given, normalised = (
        tiny_tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")["input_ids"]
        for texts in (CASED, PLAIN)
    )
    assert torch.equal(out["teacher_ids"], as_given) and torch.equal(out["student_ids"], normalised)


# ------------------------------------------------------------------------------------------ convert-reference
@pytest.fixture
def reference_files(tmp_path, tiny_tokenizer):
    config = tmp_path / "tiny_swin.yaml"
    config.write_text(
        f"vision:\n  tower: {{timm_model_name: {TINY_SWIN}, image_size: 32}}\n  image_size: 32\n"
        f"text:\n  encoder: {{num_attention_heads: {TEXT['heads']}}}\n  max_length: 32\n"
    )
    tokenizer = tmp_path / "tokenizer"
    tiny_tokenizer.save_pretrained(str(tokenizer))
    checkpoint = tmp_path / "cclm_base.th"
    torch.save({"model": reference_checkpoint(len(tiny_tokenizer))}, checkpoint)
    return checkpoint, config, tokenizer


def test_converted_reference_checkpoint_carries_pre_caption(reference_files, tmp_path, capsys):
    checkpoint, config, tokenizer = reference_files
    out = tmp_path / "converted"
    args = [
        "convert-reference",
        str(checkpoint),
        str(out),
        "--config",
        str(config),
        "--tokenizer",
        str(tokenizer),
    ]
    assert cclm_main(args) == 0
    assert "text normaliser: pre_caption (max_words 40)" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())["model"]["text"]
    assert saved["normalize"] == "pre_caption" and saved["max_words"] == cr.REFERENCE_MAX_WORDS == 40
    # the layer split is the checkpoint's: layers before the first with cross-attention, then the rest
    assert saved["text_layers"] == [0, 1] and saved["fusion_layers"] == [2, 3]
    assert "`pre_caption` (the CCLM reference's)" in (out / "README.md").read_text()
    engine = cclm.load(out, device="cpu")
    assert engine.model.cfg.text.normalize == TextNormalize.pre_caption
    torch.testing.assert_close(engine.encode_texts(CASED), engine.encode_texts(PLAIN), atol=0, rtol=0)
    long_text = " ".join(["dog"] * 45)
    assert engine.normalize(long_text) == " ".join(["dog"] * 40)

    other = tmp_path / "converted_all_words"
    assert cclm_main([*args[:2], str(other), *args[3:], "--max-words", "0"]) == 0
    assert CrossViewModel.from_pretrained(other).cfg.text.max_words == 0
    plain = tmp_path / "converted_none"
    assert cclm_main([*args[:2], str(plain), *args[3:], "--normalize", "none"]) == 0
    assert CrossViewModel.from_pretrained(plain).cfg.text.normalize == TextNormalize.none
    assert cclm_main([*args[:2], str(tmp_path / "bad"), *args[3:], "--max-words", "-1"]) == 2
    assert "max_words must be >= 0" in capsys.readouterr().err
