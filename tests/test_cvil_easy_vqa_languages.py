"""easy-VQA's questions in Japanese and Hindi (cclm.tasks.easy_vqa_languages): the grammar says exactly the
dataset's questions, every template is used, each translation is distinct and comes back to its English question,
and the ``<split>:<lang>`` files are the English ones, question by question, in the other language."""

from __future__ import annotations

import re

import pytest

from cclm.tasks import easy_vqa_languages as grammar
from cclm.tasks.annotations import AnnotationError

easy_vqa = pytest.importorskip("easy_vqa")
TARGETS = ("ja", "hi")


@pytest.fixture(scope="module")
def dataset_questions() -> set[str]:
    train, _, _ = easy_vqa.get_train_questions()
    test, _, _ = easy_vqa.get_test_questions()
    return set(train) | set(test)


def test_the_grammar_says_exactly_the_dataset_questions_and_uses_every_template(dataset_questions):
    said = grammar.vocabulary("en")
    assert len(said) == len(set(said)) == len(dataset_questions) == 107
    assert set(said) == dataset_questions
    used = {grammar.parse(q).template for q in dataset_questions}
    assert used == set(grammar.TEMPLATES) and len(used) == 14


@pytest.mark.parametrize("lang", TARGETS)
def test_every_question_round_trips_through_each_language(dataset_questions, lang):
    rendered = {q: grammar.render(q, lang) for q in dataset_questions}
    assert len(set(rendered.values())) == len(dataset_questions)  # no two questions share a translation
    for english, translated in rendered.items():
        assert translated != english
        assert grammar.to_english(translated, lang) == english
    script = r"[\u3040-\u30ff\u4e00-\u9fff]" if lang == "ja" else r"[\u0900-\u097f]"
    assert all(re.search(script, t) and not re.search("[a-z]", t) for t in rendered.values())


def test_hindi_agreement_and_known_renderings():
    assert grammar.render("what color is the shape?", "hi") == "आकृति किस रंग की है?"  # आकृति is feminine
    assert grammar.render("what color is the circle?", "hi") == "वृत्त किस रंग का है?"
    assert grammar.render("is there a black shape?", "hi") == "क्या काली आकृति है?"
    assert grammar.translate_word("black", "hi") == "काला"  # a tag is the citation form
    assert grammar.render("is there not a red shape in the image?", "ja") == "画像に赤の図形はないですか？"
    assert grammar.render("what is the teal shape?", "ja") == "青緑の図形はどんな形ですか？"


def test_unknown_questions_and_languages_are_clear_errors():
    with pytest.raises(grammar.UnknownQuestion, match="not an easy-VQA question"):
        grammar.render("is there a star?", "ja")
    with pytest.raises(grammar.UnknownQuestion, match="unknown language 'de'"):
        grammar.render("is there a circle?", "de")
    with pytest.raises(grammar.UnknownQuestion, match="not an easy-VQA question in hi"):
        grammar.to_english("is there a circle?", "hi")


def test_translated_splits_are_the_english_split_in_another_language():
    from cclm.tasks import easy_vqa

    english = easy_vqa.read("test", max_examples=300)
    for lang in TARGETS:
        other = easy_vqa.read(f"test:{lang}", max_examples=300)
        assert other.languages == {lang} and len(other.examples) == len(english.examples) == 300
        for e, o in zip(english.examples, other.examples):
            assert (o.uid, o.images, o.label, o.language) == (e.uid, e.images, e.label, lang)
            assert o.text == grammar.render(e.text, lang)
    with pytest.raises(AnnotationError, match="no questions in language 'fr'"):
        easy_vqa.read("test:fr")
    with pytest.raises(AnnotationError, match="unknown split 'val'"):
        easy_vqa.read("val:ja")
