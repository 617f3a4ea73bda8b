"""Image-caption shards in, the same shards out with translated captions added.

Every sample keeps its key and its members byte for byte (image, any others, in their order) except
``{key}.json``, where each target language's caption joins the originals and ``machine_translated`` says how it
was made::

    {"captions": {"en": "a dog on a beach", "de": "ein Hund an einem Strand"},
     "machine_translated": {"de": {"model": "facebook/nllb-200-distilled-600M", "from": "en"}}}

A list of source captions gives a list of translations in the same order, index by index: ``""`` where a source
entry is blank (or no text) or its translation came out empty. A sample that already has a non-blank caption in a
target language keeps it (counted as ``has_target``); a blank one (``"de": ""``) is no caption and is replaced.
Samples that cannot be translated are copied unchanged and counted (``missing_caption``, ``no_source_caption``,
``bad_json``: also a json holding a lone UTF-16 surrogate, half a character); samples lost to a damaged input
shard are counted (``corrupt_shard``, ``truncated_shard``) with a warning."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from cclm.data.languages import base_language, normalize_language
from cclm.data.shards import SKIP_KEY, expand_shards, is_remote, iter_tar_samples, read_sizes
from cclm.jsonl import lone_surrogate
from data_prep.translation.output import Unit, sha256
from data_prep.translation.tally import Tally
from data_prep.translation.translator import Translator

MT_KEY = "machine_translated"


def caption_units(spec: str) -> list[Unit]:
    """One unit per input shard, named like it; a local shard's sha256 is what a resumed run checks."""
    urls = expand_shards(spec)
    sizes = read_sizes(urls)
    units = []
    for url in urls:
        digest = (lambda: None) if is_remote(url) else functools.partial(sha256, Path(url))
        name = url.rstrip("/").rsplit("/", 1)[-1]
        units.append(Unit(name, digest, functools.partial(translate_caption_shard, url, sizes[url])))
    return units


def matches(code: str, lang: str) -> bool:
    """Whether caption key ``code`` is in language ``lang`` (``en-US`` is ``en``; ``zh-Hant`` is not ``zh-Hans``)."""
    normalized = normalize_language(code) if isinstance(code, str) else None
    if normalized is None:
        return False
    return normalized == lang or (lang == base_language(lang) and base_language(normalized) == lang)


def _entries(value) -> list[str | None]:
    """A caption value's entries in order, stripped; None for one that is blank or no text."""
    values = value if isinstance(value, list) else [value]
    return [v.strip() if isinstance(v, str) and v.strip() else None for v in values]


def _source_captions(captions: dict, lang: str) -> list[str | None]:
    """Every entry of the captions in ``lang``, in order (None where blank or no text: it keeps its index, so that
    translation i is that of caption i)."""
    return [text for code, value in captions.items() if matches(code, lang) for text in _entries(value)]


def _has_caption(captions: dict, lang: str) -> bool:
    """Whether the captions hold a non-blank text in ``lang`` (``"de": ""`` is no German caption)."""
    return any(
        matches(code, lang) and any(t is not None for t in _entries(value))
        for code, value in captions.items()
    )


def _meta(sample: dict, tally: Tally) -> dict | None:
    """The sample's json object, or None after counting why it cannot be read."""
    if "json" not in sample:
        tally.skip("missing_caption", f"{sample['__url__']}: {sample['__key__']} has no .json")
        return None
    try:
        meta = json.loads(sample["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        meta, why = None, str(err)
    else:
        why = "not an object with a 'captions' mapping"
    if isinstance(meta, dict) and isinstance(meta.get("captions"), dict):
        why = lone_surrogate(sample["json"], meta)  # half an emoji: no tokenizer or UTF-8 writer takes it
        if why is None:
            return meta
    tally.skip("bad_json", f"{sample['__url__']}: {sample['__key__']}.json: {why}")
    return None


def translate_caption_shard(
    url: str, expected: int | None, translator: Translator, tally: Tally
) -> list[tuple[str, dict[str, bytes]]]:
    """The shard's samples with translations added, in input order."""
    source = translator.source_lang
    kept: list[tuple[dict, dict | None, list[str], list[str]]] = []  # (sample, meta, sources, targets to add)
    wanted: dict[str, dict[str, None]] = {t: {} for t in translator.targets}  # target -> unique sources
    for sample in iter_tar_samples(url, expected):
        if SKIP_KEY in sample:
            tally.skip(sample[SKIP_KEY], sample.get("detail", ""))
            continue
        meta = _meta(sample, tally)
        sources = _source_captions(meta["captions"], source) if meta is not None else []
        texts = [t for t in sources if t is not None]
        if meta is not None and not texts:
            tally.skip("no_source_caption", f"{sample['__key__']} has no {source} caption")
        todo = []
        for target in translator.targets if texts else ():
            if _has_caption(meta["captions"], target):
                tally.count(target, "has_target")
                continue
            tally.count(target, "sentences", len(texts))
            wanted[target].update(dict.fromkeys(texts))
            todo.append(target)
        kept.append((sample, meta, sources, todo))

    done = {}
    for target, texts in wanted.items():
        result = translator.translate(list(texts), target)
        done[target] = dict(zip(texts, zip(result.texts, result.truncated, result.capped)))

    out = []
    for sample, meta, sources, todo in kept:
        members = {ext: data for ext, data in sample.items() if not ext.startswith("__")}
        if todo:
            _add_translations(meta, sources, {t: done[t] for t in todo}, translator, tally)
            members["json"] = json.dumps(meta, ensure_ascii=False).encode()
        if meta is not None:
            tally.languages.update({lang for code in meta["captions"] if (lang := normalize_language(code))})
        tally.samples += 1
        out.append((sample["__key__"], members))
    return out


def _add_translations(
    meta: dict, sources: list[str | None], done: dict, translator: Translator, tally: Tally
) -> None:
    """Translation i is that of source entry i: "" where the entry is blank or its translation came out empty."""
    for target, table in done.items():
        texts = []
        for text in sources:
            translation, truncated, capped = table[text] if text is not None else ("", False, False)
            tally.count(target, "truncated", int(truncated))
            tally.count(target, "capped_output", int(capped))
            if text is not None and not translation:
                tally.count(target, "empty_output")
            texts.append(translation)
        written = sum(1 for t in texts if t)
        tally.count(target, "translated", written)
        if written:
            meta["captions"][target] = texts[0] if len(texts) == 1 else texts
            meta.setdefault(MT_KEY, {})[target] = {"model": translator.name, "from": translator.source_lang}
