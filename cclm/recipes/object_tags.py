"""Object tags as anchors between image and text (OSCAR / OSCAR+): the labels of the objects in an image are added
to the text input as a second segment, ``<s> question </s></s> tags </s>`` (the tokenizer's sentence-pair form,
XLM-R's ``question [SEP] tags``). The tags are words, so they sit in the same space as the question's words, while
they name what is in the image: the fusion layers can align the two through them.

Tags come from a :class:`TagSource` (English labels for an image):

- :class:`EasyVQADetector`: easy-VQA images show one shape in one of 8 known colours on a light background. The
  colour is the palette entry (easy-VQA's own RGB values) that most pixels are close to; the shape follows from how
  much of its bounding box the shape fills (rectangle ~1, circle ~pi/4, triangle ~1/2). On the 5,000 easy-VQA
  images it agrees with every colour and shape the questions' answers reveal.
- :class:`AnnotationTags`: a JSONL file, one line per image: ``{"image": "<path as the annotations name it, or
  its file name>", "tags": ["red", "circle"]}`` (a detector's output, or annotations).

The teacher reads the tags in English; the student reads them translated (:class:`TagTranslator`: easy-VQA's
grammar, or a lexicon file ``{"<lang>": {"<English tag>": "<translation>"}}``). A tag without a translation is an
error: silently leaving it in English would give the student an anchor the teacher never had in that language.
"""

from __future__ import annotations

import functools
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cclm.errors import DataError, UserError
from cclm.tasks import easy_vqa_languages
from cclm.tasks.images import ImageRef

log = logging.getLogger("cclm.recipes")

# easy-VQA's palette (its generator's RGB values, gen_data/color.py).
EASY_VQA_PALETTE = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
}
# RGB distance within which a pixel is of a palette colour (anti-aliased edges are not)
PALETTE_DISTANCE = 40.0
RECTANGLE_FILL, CIRCLE_FILL = 0.95, 0.70  # fill of the bounding box: >= rectangle, >= circle, else triangle


class TagError(UserError):
    """Object tags that cannot be used: a bad tags file, a tag without a translation, an unknown source."""


class TagSource(ABC):
    """English object tags of an image."""

    @abstractmethod
    def __call__(self, image: ImageRef, path: Path) -> list[str]: ...


class EasyVQADetector(TagSource):
    """``[colour, shape]`` of an easy-VQA image, read from its pixels (no labels are looked at)."""

    def __call__(self, image: ImageRef, path: Path) -> list[str]:
        return list(detect_easy_vqa_object(str(path)))


@functools.cache
def detect_easy_vqa_object(path: str) -> tuple[str, str]:
    try:
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    except OSError as err:
        raise DataError(f"object tags: cannot read image {path}: {err}") from None
    names = list(EASY_VQA_PALETTE)
    palette = np.asarray([EASY_VQA_PALETTE[n] for n in names], dtype=np.float32)
    distance = np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1)  # [H, W, colours]
    nearest, close = distance.argmin(-1), distance.min(-1) < PALETTE_DISTANCE
    counts = np.bincount(nearest[close], minlength=len(names))
    if counts.sum() == 0:
        raise DataError(f"object tags: no easy-VQA colour in image {path} (is it an easy-VQA image?)")
    colour = int(counts.argmax())
    ys, xs = np.nonzero(close & (nearest == colour))
    fill = len(ys) / float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "rectangle" if fill >= RECTANGLE_FILL else "circle" if fill >= CIRCLE_FILL else "triangle"
    return names[colour], shape


class AnnotationTags(TagSource):
    """Tags from a JSONL file (``{"image": ..., "tags": [...]}`` per line). An image with no line gets no tags; the
    number of such images is logged once per image."""

    def __init__(self, file: str | Path):
        self.file = Path(file)
        if not self.file.is_file():
            raise TagError(f"object_tags.file: {self.file} does not exist")
        self.tags: dict[str, list[str]] = {}
        with open(self.file, "rb") as f:  # lines as bytes: one that is not UTF-8 is named with its number
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    raise TagError(
                        f"object_tags.file: {self.file}:{number}: not UTF-8 (byte 0x{raw[err.start]:02x})"
                    ) from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    image, tags = str(record["image"]), record["tags"]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise TagError(
                        f'{self.file}:{number}: expected {{"image": ..., "tags": [...]}} ({err})'
                    ) from None
                if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                    raise TagError(f"{self.file}:{number}: 'tags' must be a list of strings, got {tags!r}")
                self.tags[image] = tags
        self.untagged: set[str] = set()

    def __call__(self, image: ImageRef, path: Path) -> list[str]:
        for key in (image.path, Path(image.path).name):
            if key in self.tags:
                return self.tags[key]
        if image.path not in self.untagged:
            self.untagged.add(image.path)
            log.warning(
                "%s has no tags for image %s (%d untagged so far)", self.file, image.path, len(self.untagged)
            )
        return []


class TagTranslator:
    """English tags -> ``lang``: a lexicon ``{lang: {english: word}}``, else easy-VQA's grammar's words."""

    def __init__(
        self, lexicon: Mapping[str, Mapping[str, str]] | None = None, where: str = "object_tags.lexicon"
    ):
        """``where``: what an error about the lexicon's shape names (the file it was read from)."""
        self.lexicon = _checked_lexicon({} if lexicon is None else lexicon, where)

    @classmethod
    def from_file(cls, file: str | Path | None) -> TagTranslator:
        """The lexicon of a JSON file ``{"<lang>": {"<English tag>": "<word>"}}``, checked here (at load time,
        before any training): an error names the file, and the line of a byte that is not UTF-8."""
        if not file:
            return cls()
        where = f"object_tags.lexicon: {file}"
        try:
            raw = Path(file).read_bytes()
        except OSError as err:
            raise TagError(f"object_tags.lexicon: cannot read {file}: {err}") from None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            line = raw[: err.start].count(b"\n") + 1
            raise TagError(f"{where}:{line}: not UTF-8 (byte 0x{raw[err.start]:02x})") from None
        try:
            lexicon = json.loads(text)
        except json.JSONDecodeError as err:
            raise TagError(f"object_tags.lexicon: cannot read {file}: {err}") from None
        return cls(lexicon, where)

    def __call__(self, tags: Sequence[str], lang: str) -> list[str]:
        if lang == "en":
            return list(tags)
        words = self.lexicon.get(lang)
        if words is None:
            try:
                return [easy_vqa_languages.translate_word(tag, lang) for tag in tags]
            except UserError as err:
                raise TagError(
                    f"object tags: no {lang} translation ({err}); give object_tags.lexicon"
                ) from None
        missing = sorted({tag for tag in tags if tag not in words})
        if missing:
            raise TagError(f"object_tags.lexicon has no {lang} translation of {missing}")
        return [words[tag] for tag in tags]


def _checked_lexicon(lexicon, where: str) -> dict[str, dict[str, str]]:
    """``lexicon`` as ``{lang: {English tag: word}}``, or a :class:`TagError` naming ``where`` and what is wrong."""
    expected = '{"<lang>": {"<English tag>": "<word>"}}'
    if not isinstance(lexicon, Mapping):
        raise TagError(f"{where}: expected {expected}, got {_kind(lexicon)}")
    checked = {}
    for lang, words in lexicon.items():
        if not isinstance(words, Mapping):
            raise TagError(f"{where}: language {lang!r} maps to {_kind(words)}; expected {expected}")
        for tag, word in words.items():
            if not isinstance(tag, str) or not isinstance(word, str) or not word.strip():
                raise TagError(
                    f"{where}: {lang!r}: {tag!r} maps to {word!r}; expected a word (a non-empty string), as in "
                    f"{expected}"
                )
        checked[str(lang)] = dict(words)
    return checked


def _kind(value) -> str:
    """A JSON value's kind, for messages: 'a JSON list', 'a number'..."""
    if isinstance(value, list):
        return "a JSON list"
    if isinstance(value, bool):
        return f"{str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    return "null" if value is None else type(value).__name__


class ImageTags:
    """The tag text (words joined by spaces) of an image in a language: a source, a translator, the image roots."""

    def __init__(self, source: TagSource, translate: TagTranslator, roots: Mapping[str, str]):
        self.source, self.translate, self.roots = source, translate, dict(roots)

    def __call__(self, images: Sequence[ImageRef], lang: str) -> str:
        tags = [tag for image in images for tag in self.source(image, image.resolve(self.roots))]
        return " ".join(self.translate(tags, lang))


def build_image_tags(cfg, roots: Mapping[str, str]) -> ImageTags | None:
    """The configured tags (``object_tags``: enabled, source, file, lexicon), or None when disabled."""
    if not cfg.enabled:
        return None
    source = str(cfg.source)
    if source == "easy_vqa_detector":
        tag_source: TagSource = EasyVQADetector()
    elif source == "annotations":
        if not cfg.file:
            raise TagError("object_tags.source=annotations needs object_tags.file (a JSONL of image tags)")
        tag_source = AnnotationTags(cfg.file)
    else:
        raise TagError(f"object_tags.source: unknown source '{source}' (easy_vqa_detector, annotations)")
    return ImageTags(tag_source, TagTranslator.from_file(cfg.lexicon), roots)


def encode_with_tags(collator, texts: Sequence[str], tags: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """Tokenise ``texts`` as ``collator`` (a :class:`~cclm.tasks.batching.TaskCollator`: its normaliser, tokenizer and
    max length) does, with ``tags`` (one string per text) as the second segment; ``tags`` None: the texts alone.
    Truncation takes from the longer segment first; inputs that reach the maximum length are counted in a
    warning (a truncated question or tag list is information lost)."""
    if tags is None:
        encoded = collator.tokenize(list(texts))
    else:
        normalize: Callable[[str], str] = collator.normalize or (lambda t: t)
        pair = collator.tokenizer(
            [normalize(t) for t in texts],
            [normalize(t) for t in tags],
            padding=True,
            truncation="longest_first",
            max_length=collator.max_length,
            return_tensors="pt",
        )
        encoded = {"text_ids": pair["input_ids"], "text_mask": pair["attention_mask"]}
    full = int((encoded["text_mask"].sum(1) >= collator.max_length).sum())
    if full:
        _count_truncated(full, collator.max_length)
    return encoded


_truncated = {"inputs": 0}


def _count_truncated(count: int, max_length: int) -> None:
    first = _truncated["inputs"] == 0
    _truncated["inputs"] += count
    if first or _truncated["inputs"] % 1000 < count:
        log.warning(
            "%d text input(s) so far reached the maximum length %d and may be truncated (a longer "
            "model.text.max_length, or a tokenizer with larger pieces)",
            _truncated["inputs"],
            max_length,
        )
