"""Object tags (cclm.recipes.object_tags): the easy-VQA detector names what the questions' answers say is in each
image, and the tags reach the text input as the second segment, in English for the teacher and translated for the
student."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from cclm.config import ModelConfig, ObjectTagsConfig, load_config
from cclm.data.tokenize import train_tokenizer
from cclm.model.cross_view import CrossViewModel
from cclm.recipes.cvil import ParallelCollator, align_parallel
from cclm.recipes.cvil_vqa import TaggedCollator, TaggedDataset, TaggedParallelDataset, TargetPair
from cclm.recipes.object_tags import (
    AnnotationTags,
    ImageTags,
    TagError,
    TagTranslator,
    build_image_tags,
    detect_easy_vqa_object,
)
from cclm.tasks import easy_vqa_languages as grammar
from cclm.tasks.batching import TaskCollator
from cclm.tasks.images import ImageRef
from cclm.tasks.task_model import TaskModel

easy_vqa = pytest.importorskip("easy_vqa")
REPO = Path(__file__).resolve().parent.parent


def answered_objects(split: str) -> dict[int, dict[str, str]]:
    """What the questions' answers say each image shows: {image id: {"color": .., "shape": ..}}."""
    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    truth: dict[int, dict[str, str]] = defaultdict(dict)
    for question, answer, image in zip(questions, answers, image_ids):
        form = grammar.parse(question)
        if form.template in ("what_color", "color_of"):
            truth[image]["color"] = answer
        elif form.template in ("shape_of_color", "shape_contained", "shape_in_image", "shape_present"):
            truth[image]["shape"] = answer
    return truth


def test_the_easy_vqa_detector_agrees_with_every_answer_on_the_test_images():
    paths = easy_vqa.get_test_image_paths()
    truth = answered_objects("test")
    checked = {"color": 0, "shape": 0}
    for image, known in truth.items():
        colour, shape = detect_easy_vqa_object(paths[image])
        detected = {"color": colour, "shape": shape}
        for key, value in known.items():
            assert detected[key] == value, (paths[image], key)
            checked[key] += 1
    assert checked["color"] > 700 and checked["shape"] > 700


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    english = grammar.vocabulary("en") + [" ".join(grammar.COLORS + grammar.SHAPES)]
    target = [q for lang in ("ja", "hi") for q in grammar.vocabulary(lang)]
    target += [
        " ".join(grammar.translate_word(w, lang) for w in grammar.COLORS + grammar.SHAPES)
        for lang in ("ja", "hi")
    ]
    en = train_tokenizer(english, folder / "en", vocab_size=200)
    tgt = train_tokenizer(target, folder / "tgt", vocab_size=300, split_cjk=True)
    return en, tgt


def tiny_task_model(vocab: int) -> TaskModel:
    cfg = load_config(ModelConfig, REPO / "configs/model/tiny.yaml", [f"text.encoder.vocab_size={vocab}"])
    return TaskModel(CrossViewModel(cfg), "easy_vqa", "single", sorted(easy_vqa.get_answers()))


def test_tags_reach_each_side_of_the_distillation_batch_in_its_language(tokenizers):
    from cclm.tasks import easy_vqa as task

    en_tok, tgt_tok = tokenizers
    tags = build_image_tags(ObjectTagsConfig(enabled=True), {})
    english, japanese = task.read("train", max_examples=6), task.read("train:ja", max_examples=6)
    pairs = [
        TargetPair(p.uid, p.images, p.english, p.target, "ja")
        for p in align_parallel(english, japanese, "ja")
    ]
    items = [TaggedParallelDataset(pairs, {}, 32, tags)[i] for i in range(len(pairs))]
    teacher, student = tiny_task_model(len(en_tok)), tiny_task_model(len(tgt_tok))
    batch = ParallelCollator(teacher, en_tok, student, tgt_tok)(items)
    truth = answered_objects("train")
    for i, pair in enumerate(pairs):
        image_id = int(Path(pair.images[0].path).stem)
        colour, shape = detect_easy_vqa_object(pair.images[0].path)
        assert truth[image_id].get("color", colour) == colour and truth[image_id].get("shape", shape) == shape
        assert items[i]["en_tags"] == f"{colour} {shape}"
        assert items[i]["tgt_tags"] == f"{grammar.WORDS['ja'][colour]} {grammar.WORDS['ja'][shape]}"
        # <s> question </s></s> tags </s>: the tokenizer's own sentence-pair encoding, in each side's language
        for side, tokenizer, text, tag in (
            ("teacher", en_tok, pair.english, items[i]["en_tags"]),
            ("student", tgt_tok, pair.target, items[i]["tgt_tags"]),
        ):
            ids = batch[f"{side}_ids"][i][batch[f"{side}_mask"][i].bool()].tolist()
            assert ids == tokenizer(text, tag)["input_ids"]
            second = ids[ids.index(tokenizer.eos_token_id) + 2 : -1]
            assert tokenizer.decode(second).replace(" ", "") == tag.replace(" ", "")
    # Without tags the same items give the questions alone.
    plain = [TaggedParallelDataset(pairs, {}, 32, None)[i] for i in range(2)]
    assert "en_tags" not in plain[0]
    batch = ParallelCollator(teacher, en_tok, student, tgt_tok)(plain)
    assert (
        batch["student_ids"][0][batch["student_mask"][0].bool()].tolist()
        == tgt_tok(pairs[0].target)["input_ids"]
    )


def test_scored_examples_carry_tags_in_the_example_language(tokenizers):
    from cclm.tasks import easy_vqa as task

    _, tgt_tok = tokenizers
    tags = build_image_tags(ObjectTagsConfig(enabled=True), {})
    hindi = task.read("test:hi", max_examples=3)
    items = [TaggedDataset(hindi.examples, {}, 32, tags)[i] for i in range(3)]
    for example, item in zip(hindi.examples, items):
        colour, shape = detect_easy_vqa_object(example.images[0].path)
        assert item["tags"] == f"{grammar.WORDS['hi'][colour]} {grammar.WORDS['hi'][shape]}"
    batch = TaggedCollator(TaskCollator(tgt_tok, 32))(items)
    assert batch["labels"].tolist() == [e.label for e in hindi.examples]
    assert batch["text_ids"].shape[0] == 3 and torch.equal(
        batch["text_ids"][0][batch["text_mask"][0].bool()],
        torch.tensor(tgt_tok(items[0]["text"], items[0]["tags"])["input_ids"]),
    )


def test_annotation_tags_and_lexicon(tmp_path, caplog):
    file = tmp_path / "tags.jsonl"
    file.write_text(
        json.dumps({"image": "a.jpg", "tags": ["dog", "ball"]})
        + "\n\n"
        + json.dumps({"image": "b.jpg", "tags": []})
        + "\n"
    )
    lexicon = tmp_path / "lexicon.json"
    lexicon.write_text(json.dumps({"de": {"dog": "Hund", "ball": "Ball"}}))
    cfg = ObjectTagsConfig(enabled=True, source="annotations", file=str(file), lexicon=str(lexicon))
    tags = build_image_tags(cfg, {"imgs": str(tmp_path)})
    assert tags([ImageRef("imgs", "a.jpg")], "en") == "dog ball"
    assert tags([ImageRef("imgs", "sub/a.jpg")], "de") == "Hund Ball"  # matched by file name
    with caplog.at_level(logging.WARNING, logger="cclm.recipes"):
        assert tags([ImageRef("imgs", "c.jpg")], "de") == ""
    assert "no tags for image c.jpg (1 untagged" in caplog.text
    with pytest.raises(TagError, match=r"no fr translation of \['ball', 'dog'\]|no fr"):
        ImageTags(AnnotationTags(file), TagTranslator({"fr": {}}), {})([ImageRef(None, "a.jpg")], "fr")
    # The built-in translator is easy-VQA's grammar; a word it does not know is an error, not English left in.
    assert TagTranslator()(["teal", "triangle"], "hi") == ["फ़िरोज़ी", "त्रिभुज"]
    with pytest.raises(TagError, match="no ja translation"):
        TagTranslator()(["dog"], "ja")
    assert build_image_tags(ObjectTagsConfig(enabled=False), {}) is None


def test_bad_tag_files_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.jpg", "tags": ["x"]}\n{"image": "b.jpg"}\n')
    with pytest.raises(TagError, match=r"bad.jsonl:2: expected"):
        AnnotationTags(bad)
    bad.write_text('{"image": "a.jpg", "tags": "dog"}\n')
    with pytest.raises(TagError, match="must be a list of strings"):
        AnnotationTags(bad)
    with pytest.raises(TagError, match="does not exist"):
        AnnotationTags(tmp_path / "missing.jsonl")
    with pytest.raises(TagError, match="needs object_tags.file"):
        build_image_tags(ObjectTagsConfig(enabled=True, source="annotations"), {})
