"""Raw shard samples -> training examples, one function per view. Any problem raises :class:`SkipSample` with a
reason, which the stream counts (``missing_image``, ``bad_image``, ``missing_caption``, ``empty_caption``,
``unknown_language``, ``filtered_language``, ``bad_json``, ``corrupt_shard``, ``truncated_shard``, ...)."""

from __future__ import annotations

import json
import random
import unicodedata
from collections.abc import Callable

from PIL import Image

from cclm.data.languages import language_allowed, normalize_language
from cclm.data.shards import IMAGE_EXTENSIONS, SKIP_KEY
from cclm.data.skips import SkipSample
from cclm.jsonl import lone_surrogate

# what a text made only of is empty: controls, format characters (zero-width spaces and joiners, the byte-order
# mark, bidirectional marks) and separators, none of which ``str.strip`` removes all of
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def visible_text(text) -> str:
    """``text`` without surrounding whitespace, or "" when it is not a string or shows nothing (a caption of
    zero-width characters would tokenise to nothing or to <unk> and train on noise)."""
    if not isinstance(text, str):
        return ""
    text = text.strip()
    return text if any(unicodedata.category(char) not in _INVISIBLE_CATEGORIES for char in text) else ""


def _check_tombstone(sample: dict) -> None:
    if SKIP_KEY in sample:
        raise SkipSample(sample[SKIP_KEY], sample.get("detail", ""))


def _load_json(sample: dict, missing_reason: str) -> dict:
    raw = sample.get("json")
    if raw is None:
        raise SkipSample(missing_reason, f"{sample['__key__']} has no .json")
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SkipSample("bad_json", f"{sample['__key__']}: {err}") from None
    if not isinstance(meta, dict):
        raise SkipSample("bad_json", f"{sample['__key__']}: not an object")
    surrogate = lone_surrogate(raw, meta)
    if surrogate:
        raise SkipSample("bad_json", f"{sample['__key__']}: {surrogate}")
    return meta


def caption_choices(
    meta: dict, allowed: frozenset[str], normalizer: Callable[[str], str] | None = None
) -> list[tuple[str, str]]:
    """All usable ``(lang, caption)`` pairs of an image-caption sample; raises SkipSample when there is none. With
    a ``normalizer`` (the model's), a caption it turns into nothing is not usable: skipped as
    ``empty_after_normalize`` only when no other caption is left."""
    captions = meta.get("captions")
    if not isinstance(captions, dict) or not captions:
        raise SkipSample("missing_caption", "no 'captions' mapping")
    choices, reasons = [], []
    for code, texts in captions.items():
        lang = normalize_language(code)
        if lang is None:
            reasons.append("unknown_language")
            continue
        if not language_allowed(lang, allowed):
            reasons.append("filtered_language")
            continue
        for text in [texts] if isinstance(texts, str) else (texts if isinstance(texts, list) else []):
            shown = visible_text(text)
            if shown:
                choices.append((lang, shown))
            else:
                reasons.append("empty_caption")
        if not isinstance(texts, (str, list)) or (isinstance(texts, list) and not texts):
            reasons.append("empty_caption")
    if not choices:
        reason = next(
            (r for r in ("unknown_language", "empty_caption", "filtered_language") if r in reasons),
            "missing_caption",
        )
        raise SkipSample(reason, f"captions: {json.dumps(captions, ensure_ascii=False)[:80]}")
    if normalizer is None:
        return choices
    kept = [(lang, text) for lang, text in choices if normalizer(text)]
    if not kept:
        raise SkipSample(
            "empty_after_normalize", f"captions: {json.dumps(captions, ensure_ascii=False)[:80]}"
        )
    return kept


def image_bytes(sample: dict) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise SkipSample("missing_image", f"{sample['__key__']} has no image member")


def image_caption_example(
    sample: dict,
    transform,
    allowed: frozenset[str],
    rng: random.Random,
    normalizer: Callable[[str], str] | None = None,
) -> dict:
    _check_tombstone(sample)
    meta = _load_json(sample, "missing_caption")
    choices = caption_choices(meta, allowed, normalizer)
    lang, text = choices[rng.randrange(len(choices))] if len(choices) > 1 else choices[0]
    data = image_bytes(sample)
    try:
        pixels = transform(data, text, lang, rng)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise SkipSample("bad_image", f"{sample['__key__']}: {type(err).__name__}: {err}") from None
    return {"image": pixels, "text": text, "lang": lang, "key": sample["__key__"]}


def parallel_example(sample: dict, allowed: frozenset[str], swap: bool, rng: random.Random) -> dict:
    _check_tombstone(sample)
    meta = _load_json(sample, "missing_text")
    sides = []
    for text_key, lang_key in (("src", "src_lang"), ("tgt", "tgt_lang")):
        text, code = visible_text(meta.get(text_key)), meta.get(lang_key)
        if not text:
            raise SkipSample("empty_text", f"{sample['__key__']}: empty '{text_key}'")
        lang = normalize_language(code) if isinstance(code, str) else None
        if lang is None:
            raise SkipSample("unknown_language", f"{sample['__key__']}: {lang_key}={code!r}")
        if not language_allowed(lang, allowed):
            raise SkipSample("filtered_language", f"{sample['__key__']}: {lang}")
        sides.append((text, lang))
    if swap and rng.random() < 0.5:
        sides.reverse()
    (text, lang), (other, other_lang) = sides
    return {"text": text, "lang": lang, "other": other, "other_lang": other_lang, "key": sample["__key__"]}
