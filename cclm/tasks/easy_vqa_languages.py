"""easy-VQA's questions in Japanese and Hindi, by a template grammar (exact, not machine translation).

easy-VQA generates its 107 distinct questions from 14 templates over 8 colours and 3 shapes. Each template here
has a hand-written Japanese and Hindi form, and each slot (the colour, the shape, "a red shape") its rendering in
each language, with Hindi gender agreement (आकृति "shape" is feminine: काली आकृति, but काला as a tag). The
grammar enumerates every question it can say; rendering is a lookup in that enumeration, and so is translating
back (``to_english``): two English questions never share a translation (checked when the tables are built), so a
question survives the round trip en -> ja -> en unchanged.

    render("is there not a red shape in the image?", "ja")  # '画像に赤の図形はないですか？'
    to_english("क्या चित्र में लाल आकृति नहीं है?", "hi")      # 'is there not a red shape in the image?'

``translate_word`` renders one colour or shape name (an object tag) in citation form.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from cclm.errors import UserError

LANGUAGES = ("en", "ja", "hi")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
SHAPES = ("circle", "rectangle", "triangle")

# Colour and shape names: citation forms (object tags, Japanese slots).
WORDS = {
    "ja": {
        "black": "黒", "blue": "青", "brown": "茶色", "gray": "灰色", "green": "緑", "red": "赤", "teal": "青緑",
        "yellow": "黄色", "circle": "円", "rectangle": "長方形", "triangle": "三角形",
    },
    "hi": {
        "black": "काला", "blue": "नीला", "brown": "भूरा", "gray": "स्लेटी", "green": "हरा", "red": "लाल",
        "teal": "फ़िरोज़ी", "yellow": "पीला", "circle": "वृत्त", "rectangle": "आयत", "triangle": "त्रिभुज",
    },
}  # fmt: skip
HINDI_FEMININE = {"काला": "काली", "नीला": "नीली", "भूरा": "भूरी", "हरा": "हरी", "पीला": "पीली"}  # -आ -> -ई
GENERIC_SHAPE = {"en": "shape", "ja": "図形", "hi": "आकृति"}  # the noun "shape" (an object, not a form)

# Slots: {thing} an object without article ("red shape", "circle"), {a_thing} with one; {target} the shape asked
# about or the generic noun; {color}; {of} Hindi's का/की agreeing with {target}.
YES_NO, COLOR_OF, SHAPE_OF_COLOR, SHAPE = "yes_no", "color_of", "shape_of_color", "shape"
TEMPLATES: dict[str, tuple[str, dict[str, str]]] = {
    "contains": (YES_NO, {
        "en": "does the image contain {a_thing}?", "ja": "画像には{thing}が含まれていますか？",
        "hi": "क्या चित्र में {thing} शामिल है?"}),
    "not_contains": (YES_NO, {
        "en": "does the image not contain {a_thing}?", "ja": "画像には{thing}が含まれていませんか？",
        "hi": "क्या चित्र में {thing} शामिल नहीं है?"}),
    "present": (YES_NO, {
        "en": "is {a_thing} present?", "ja": "{thing}が存在しますか？", "hi": "क्या {thing} मौजूद है?"}),
    "none_present": (YES_NO, {
        "en": "is no {thing} present?", "ja": "{thing}は一つも存在しませんか？",
        "hi": "क्या कोई भी {thing} मौजूद नहीं है?"}),
    "there_in_image": (YES_NO, {
        "en": "is there {a_thing} in the image?", "ja": "画像に{thing}はありますか？", "hi": "क्या चित्र में {thing} है?"}),
    "there": (YES_NO, {"en": "is there {a_thing}?", "ja": "{thing}はありますか？", "hi": "क्या {thing} है?"}),
    "not_there_in_image": (YES_NO, {
        "en": "is there not {a_thing} in the image?", "ja": "画像に{thing}はないですか？",
        "hi": "क्या चित्र में {thing} नहीं है?"}),
    "not_there": (YES_NO, {
        "en": "is there not {a_thing}?", "ja": "{thing}はないですか？", "hi": "क्या {thing} नहीं है?"}),
    "what_color": (COLOR_OF, {
        "en": "what color is the {target}?", "ja": "{target}は何色ですか？", "hi": "{target} किस रंग {of} है?"}),
    "color_of": (COLOR_OF, {
        "en": "what is the color of the {target}?", "ja": "{target}の色は何ですか？", "hi": "{target} का रंग क्या है?"}),
    "shape_of_color": (SHAPE_OF_COLOR, {
        "en": "what is the {color} shape?", "ja": "{color}の図形はどんな形ですか？", "hi": "{thing} किस आकार की है?"}),
    "shape_contained": (SHAPE, {
        "en": "what shape does the image contain?", "ja": "画像にはどんな形が含まれていますか？",
        "hi": "चित्र में कौन-सा आकार शामिल है?"}),
    "shape_in_image": (SHAPE, {
        "en": "what shape is in the image?", "ja": "画像にある形は何ですか？", "hi": "चित्र में कौन-सा आकार है?"}),
    "shape_present": (SHAPE, {
        "en": "what shape is present?", "ja": "どんな形が存在しますか？", "hi": "कौन-सा आकार मौजूद है?"}),
}  # fmt: skip


class UnknownQuestion(UserError):
    """A question the grammar cannot say (not an easy-VQA question), or a language it does not speak."""


@dataclass(frozen=True)
class QuestionForm:
    """One question: a template and its slot values (a colour and/or a shape, as the template needs)."""

    template: str
    color: str | None = None
    shape: str | None = None


def forms() -> list[QuestionForm]:
    """Every question the grammar can say: yes/no over each colour and each shape, 'what colour' over each shape
    and the shape in general, 'what is the <colour> shape' over each colour, and the three shape questions."""
    out = []
    for name, (kind, _) in TEMPLATES.items():
        if kind == YES_NO:
            out += [QuestionForm(name, color=c) for c in COLORS] + [
                QuestionForm(name, shape=s) for s in SHAPES
            ]
        elif kind == COLOR_OF:
            out += [QuestionForm(name)] + [QuestionForm(name, shape=s) for s in SHAPES]
        elif kind == SHAPE_OF_COLOR:
            out += [QuestionForm(name, color=c) for c in COLORS]
        else:
            out.append(QuestionForm(name))
    return out


def translate_word(word: str, lang: str) -> str:
    """A colour or shape name in ``lang`` (citation form)."""
    _check_language(lang)
    if lang == "en":
        return word
    try:
        return WORDS[lang][word]
    except KeyError:
        raise UnknownQuestion(
            f"easy-VQA grammar: no {lang} word for '{word}' (knows {sorted(WORDS[lang])})"
        ) from None


def _slots(form: QuestionForm, lang: str) -> dict[str, str]:
    color = translate_word(form.color, lang) if form.color else None
    shape = translate_word(form.shape, lang) if form.shape else None
    generic = GENERIC_SHAPE[lang]
    if lang == "en":
        thing = f"{color} shape" if color else shape
    elif lang == "ja":
        thing = f"{color}の図形" if color else shape
    else:  # Hindi: the adjective agrees with the feminine आकृति
        thing = f"{HINDI_FEMININE.get(color, color)} {generic}" if color else shape
    return {
        "thing": thing or "",
        "a_thing": f"a {thing}" if thing else "",
        "target": shape or generic,
        "color": color or "",
        "of": "का" if shape else "की",  # Hindi: shapes are masculine, आकृति feminine
    }


def _say(form: QuestionForm, lang: str) -> str:
    return TEMPLATES[form.template][1][lang].format(**_slots(form, lang))


@functools.cache
def _tables() -> tuple[dict[str, dict[str, QuestionForm]], dict[str, dict[QuestionForm, str]]]:
    """(lang -> question -> form, lang -> form -> question); an ambiguous rendering is a bug in the tables."""
    parse, say = {}, {}
    for lang in LANGUAGES:
        said = {form: _say(form, lang) for form in forms()}
        inverse = {text: form for form, text in said.items()}
        if len(inverse) != len(said):
            raise AssertionError(f"easy-VQA grammar: two questions share a {lang} rendering")
        parse[lang], say[lang] = inverse, said
    return parse, say


def _check_language(lang: str) -> None:
    if lang not in LANGUAGES:
        raise UnknownQuestion(f"easy-VQA grammar: unknown language '{lang}' (speaks {list(LANGUAGES)})")


def parse(question: str, lang: str = "en") -> QuestionForm:
    _check_language(lang)
    form = _tables()[0][lang].get(question.strip())
    if form is None:
        raise UnknownQuestion(f"easy-VQA grammar: '{question}' is not an easy-VQA question in {lang}")
    return form


def render(question: str, lang: str) -> str:
    """The English easy-VQA ``question`` said in ``lang``."""
    _check_language(lang)
    return _tables()[1][lang][parse(question, "en")]


def to_english(question: str, lang: str) -> str:
    """A question in ``lang`` translated back to English (the inverse of :func:`render`)."""
    return _tables()[1]["en"][parse(question, lang)]


def vocabulary(lang: str) -> list[str]:
    """Every question the grammar says in ``lang`` (e.g. a tokenizer's training text)."""
    _check_language(lang)
    return list(_tables()[1][lang].values())
