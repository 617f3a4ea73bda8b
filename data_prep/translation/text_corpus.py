"""A text corpus in (one sentence per line, or jsonl with a text field), parallel-text shards out: one sample
per sentence and target language, ``{"src", "tgt", "src_lang", "tgt_lang", "translation_model"}``, keyed by
the input line number (``l000000042_de``), so ``cclm prep`` output of a corpus trains text-text views directly.

The corpus is cut into units of ``--shard-samples`` input lines (one output shard each, ``PREFIX-000000.tar``);
a unit's digest is the sha256 of its raw lines, so a resumed run redoes a chunk whose lines changed. Lines that
are empty, not UTF-8 or (jsonl) not an object with a string text field, or whose text holds a lone UTF-16
surrogate (half a character), are counted skips with a warning naming ``file:line``."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from cclm.data.shards import safe_key
from cclm.jsonl import lone_surrogate
from data_prep.translation.output import Samples, Unit
from data_prep.translation.tally import Tally
from data_prep.translation.translator import Translator


def text_units(path: Path, fmt: str, text_field: str, lines_per_shard: int, prefix: str) -> list[Unit]:
    """One unit per ``lines_per_shard`` lines: (byte offset, line count) found in one pass over the file."""
    if fmt == "auto":
        fmt = "jsonl" if path.suffix.lower() in (".jsonl", ".json") else "txt"
    units, offset = [], 0
    with open(path, "rb") as handle:
        while True:
            digest, count, start = hashlib.sha256(), 0, offset
            for raw in handle:
                digest.update(raw)
                count += 1
                offset += len(raw)
                if count == lines_per_shard:
                    break
            if count == 0:
                break
            first_line = len(units) * lines_per_shard + 1
            read = functools.partial(translate_lines, path, start, count, first_line, fmt, text_field)
            units.append(
                Unit(f"{prefix}-{len(units):06d}.tar", functools.partial(str, digest.hexdigest()), read)
            )
    if not units:
        raise ValueError(f"{path} is empty")
    return units


def _sentence(raw: bytes, where: str, fmt: str, text_field: str, tally: Tally) -> str | None:
    try:
        line = raw.decode("utf-8-sig")  # a byte-order mark (first line) is no text
    except UnicodeDecodeError:
        tally.skip("bad_utf8", f"{where}: not UTF-8")
        return None
    if fmt == "jsonl":
        if not line.strip():
            return None  # blank lines separate nothing in jsonl
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            tally.skip("bad_json", f"{where}: not a JSON object")
            return None
        text = record.get(text_field)
        if not isinstance(text, str):
            tally.skip("empty_text", f"{where}: no string {text_field!r} field")
            return None
        if surrogate := lone_surrogate(line, text):
            tally.skip("bad_json", f"{where}: {surrogate}")
            return None
        line = text
    if not line.strip():
        tally.skip("empty_text", f"{where}: empty line" if fmt == "txt" else "")
        return None
    return line.strip()


def translate_lines(
    path: Path,
    offset: int,
    count: int,
    first_line: int,
    fmt: str,
    text_field: str,
    translator: Translator,
    tally: Tally,
) -> Samples:
    with open(path, "rb") as handle:
        handle.seek(offset)
        raws = [handle.readline() for _ in range(count)]
    numbered = []
    for number, raw in enumerate(raws, first_line):
        text = _sentence(raw, f"{path}:{number}", fmt, text_field, tally)
        if text is not None:
            numbered.append((number, text))
    unique = list(dict.fromkeys(text for _, text in numbered))
    out: Samples = []
    for target in translator.targets:
        result = translator.translate(unique, target)
        table = dict(zip(unique, zip(result.texts, result.truncated, result.capped)))
        for number, text in numbered:
            translation, truncated, capped = table[text]
            tally.count(target, "sentences")
            tally.count(target, "truncated", int(truncated))
            tally.count(target, "capped_output", int(capped))
            if not translation:
                tally.count(target, "empty_output")
                continue
            tally.count(target, "translated")
            sample = {
                "src": text,
                "tgt": translation,
                "src_lang": translator.source_lang,
                "tgt_lang": target,
                "translation_model": translator.name,
            }
            out.append(
                (
                    safe_key(f"l{number:09d}_{target}"),
                    {"json": json.dumps(sample, ensure_ascii=False).encode()},
                )
            )
            tally.languages.update([translator.source_lang, target])
            tally.pairs[(translator.source_lang, target)] += 1
            tally.samples += 1
    out.sort(key=lambda item: item[0])  # line order, then language
    return out
