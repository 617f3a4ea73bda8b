"""Parallel-text converters: ``parallel-tsv`` (``src<TAB>tgt``), ``parallel-moses`` (two aligned files, OPUS /
WikiMatrix style ``corpus.en`` + ``corpus.de``) and ``parallel-jsonl`` (``source_text``, ``target_text``, optional
``source_lang``/``target_lang``). Output samples: ``{key}.json`` = ``{"src", "tgt", "src_lang", "tgt_lang"}``.
A line that is not UTF-8 (in Moses files: on either side) skips its pair, counted as ``bad_utf8``; a tsv line with
more than two columns (a stray tab) is counted as ``bad_columns``, since which two are the pair is unknown."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from itertools import zip_longest
from pathlib import Path

from tqdm import tqdm

from cclm.data.examples import visible_text
from cclm.data.languages import normalize_language
from cclm.data.shards import VIEW_PARALLEL
from data_prep.common import (
    SplitWriter,
    add_output_options,
    content_hash,
    decode_text,
    first_line_bytes,
    jsonl_records,
    require_file,
    text_lines,
)


def _language(code: str | None, what: str) -> str:
    lang = normalize_language(code) if code else None
    if lang is None:
        raise ValueError(f"{what}: unknown or missing language code {code!r}")
    return lang


def tsv_pairs(
    path: Path, src_lang: str, tgt_lang: str, writer: SplitWriter
) -> Iterator[tuple[str | None, str | None, str, str]]:
    for number, line in text_lines(path, writer):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        cols = line.split("\t")
        while len(cols) > 2 and not cols[-1].strip():
            cols.pop()  # trailing tabs add no column
        if len(cols) > 2:
            writer.skip("bad_columns", detail=f"{path}:{number}: {len(cols)} columns, expected src<TAB>tgt")
            continue
        yield (cols[0], cols[1] if len(cols) > 1 else None, src_lang, tgt_lang)


def moses_pairs(src: Path, tgt: Path, src_lang: str, tgt_lang: str, writer: SplitWriter) -> Iterator[tuple]:
    with open(src, "rb") as fs, open(tgt, "rb") as ft:
        yield from aligned_pairs(fs, ft, str(src), str(tgt), src_lang, tgt_lang, writer)


def aligned_pairs(
    fs: Iterable[bytes],
    ft: Iterable[bytes],
    src: str,
    tgt: str,
    src_lang: str,
    tgt_lang: str,
    writer: SplitWriter,
) -> Iterator[tuple]:
    """Pairs of two streams of byte lines aligned line by line (``src``/``tgt`` name them in messages)."""
    for number, (a, b) in enumerate(zip_longest(fs, ft), 1):
        if a is None or b is None:
            raise ValueError(f"{src} and {tgt} are not aligned: line counts differ (at line {number})")
        if number == 1:
            a, b = first_line_bytes(a, src), first_line_bytes(b, tgt)
        a_text = decode_text(a, f"{src}:{number}", writer)
        b_text = decode_text(b, f"{tgt}:{number}", writer) if a_text is not None else None
        if b_text is not None:  # one skip per pair, even with both sides undecodable
            yield (a_text.rstrip("\r\n"), b_text.rstrip("\r\n"), src_lang, tgt_lang)


def jsonl_pairs(
    path: Path, src_lang: str | None, tgt_lang: str | None, writer: SplitWriter
) -> Iterator[tuple]:
    for _, obj in jsonl_records(path, writer):
        yield (
            obj.get("source_text"),
            obj.get("target_text"),
            obj.get("source_lang") or src_lang,
            obj.get("target_lang") or tgt_lang,
        )


def write_pairs(pairs: Iterator[tuple], writer: SplitWriter, args, desc: str) -> int:
    rows = 0
    for index, (src, tgt, src_lang, tgt_lang) in enumerate(
        tqdm(pairs, desc=desc, unit="pair", disable=args.no_progress, file=sys.stderr)
    ):
        rows += 1
        if not visible_text(src) or not visible_text(tgt):
            writer.skip("empty_text")
            continue
        langs = [normalize_language(src_lang or ""), normalize_language(tgt_lang or "")]
        if None in langs:
            writer.skip("unknown_language")
            continue
        if not all(writer.allowed_language(lang) for lang in langs):
            writer.skip("filtered_language")
            continue
        pair = {"src": src.strip(), "tgt": tgt.strip(), "src_lang": langs[0], "tgt_lang": langs[1]}
        writer.write(
            f"{args.prefix}{index:010d}",
            {"json": json.dumps(pair, ensure_ascii=False).encode()},
            langs,
            content_hash(pair),
        )
    if rows == 0 and not writer.skipped:
        raise ValueError("the input has no rows")
    print(writer.summary(writer.close()))
    return 0


def run_tsv(args) -> int:
    path = require_file(args.input)
    src_lang, tgt_lang = _language(args.src_lang, "--src-lang"), _language(args.tgt_lang, "--tgt-lang")
    with SplitWriter(args, VIEW_PARALLEL) as writer:
        return write_pairs(tsv_pairs(path, src_lang, tgt_lang, writer), writer, args, "parallel-tsv")


def run_moses(args) -> int:
    src, tgt = require_file(args.src, "--src"), require_file(args.tgt, "--tgt")
    src_lang = _language(args.src_lang or src.suffix.lstrip("."), "--src-lang (or the --src file extension)")
    tgt_lang = _language(args.tgt_lang or tgt.suffix.lstrip("."), "--tgt-lang (or the --tgt file extension)")
    with SplitWriter(args, VIEW_PARALLEL) as writer:
        return write_pairs(moses_pairs(src, tgt, src_lang, tgt_lang, writer), writer, args, "parallel-moses")


def run_jsonl(args) -> int:
    path = require_file(args.input)
    with SplitWriter(args, VIEW_PARALLEL) as writer:
        return write_pairs(
            jsonl_pairs(path, args.src_lang, args.tgt_lang, writer), writer, args, "parallel-jsonl"
        )


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("parallel-tsv", help="parallel-text shards from a src<TAB>tgt file")
    p.add_argument("--input", required=True)
    p.add_argument("--src-lang", required=True)
    p.add_argument("--tgt-lang", required=True)
    add_output_options(p)
    p.set_defaults(run=run_tsv)

    p = subparsers.add_parser(
        "parallel-moses", help="parallel-text shards from two aligned files (corpus.en/.de)"
    )
    p.add_argument("--src", required=True, help="source side, one sentence per line (e.g. corpus.en)")
    p.add_argument("--tgt", required=True, help="target side, aligned line by line (e.g. corpus.de)")
    p.add_argument("--src-lang", default="", help="default: the --src file extension")
    p.add_argument("--tgt-lang", default="", help="default: the --tgt file extension")
    add_output_options(p)
    p.set_defaults(run=run_moses)

    p = subparsers.add_parser(
        "parallel-jsonl", help="parallel-text shards from jsonl (source_text, target_text)"
    )
    p.add_argument("--input", required=True)
    p.add_argument("--src-lang", default=None, help="language of source_text when lines have no source_lang")
    p.add_argument("--tgt-lang", default=None, help="language of target_text when lines have no target_lang")
    add_output_options(p)
    p.set_defaults(run=run_jsonl)
