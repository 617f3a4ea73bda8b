"""Parallel-text corpora as released, into parallel-text shards (``parallel_text.write_pairs`` underneath):

* ``wikimatrix``: LASER's WikiMatrix, ``WikiMatrix.{l1}-{l2}.tsv.gz`` (``l1 < l2``), one mined pair a line as
  ``margin score<TAB>l1 sentence<TAB>l2 sentence``, sorted by decreasing score. Pairs under ``--min-score``
  (default 1.04, the threshold WikiMatrix's authors recommend) are dropped, and ``--max-pairs`` caps each
  language pair, keeping its highest-scoring pairs.
* ``opus``: Moses-format files as OPUS and statmt.org release them, ``{corpus}.{l1}-{l2}.{l1}`` beside
  ``{corpus}.{l1}-{l2}.{l2}`` (``Europarl.de-en.de``, ``europarl-v7.de-en.en``), in folders or in OPUS's
  ``{l1}-{l2}.txt.zip`` downloads (read without unpacking; a damaged or truncated zip stops the run naming it).

With ``--pivot en`` (the default) the English side of a pair is ``src``, as CCLM's en-X pairs are.
"""

from __future__ import annotations

import argparse
import heapq
import math
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

from cclm.data.languages import normalize_language
from cclm.data.shards import VIEW_PARALLEL
from cclm.errors import DataError
from data_prep.common import SplitWriter, add_output_options, require_file
from data_prep.corpora.files import DAMAGED, decoded_lines, unreadable
from data_prep.parallel_text import aligned_pairs, write_pairs

WIKIMATRIX_FILE = re.compile(r"^WikiMatrix\.(?P<a>[A-Za-z_]+)-(?P<b>[A-Za-z_]+)\.tsv(\.gz)?$")
MOSES_FILE = re.compile(r"^(?P<corpus>.+)\.(?P<a>[A-Za-z_]+)-(?P<b>[A-Za-z_]+)\.(?P<side>[A-Za-z_]+)$")
WIKIMATRIX_MIN_SCORE = 1.04


def _language(code: str, where: str) -> str:
    lang = normalize_language(code.replace("_", "-"))
    if lang is None:
        raise DataError(f"{where}: unknown language code {code!r}")
    return lang


def oriented(a: str, b: str, a_lang: str, b_lang: str, pivot: str) -> tuple[str, str, str, str]:
    """The pair with the ``pivot`` language's side first (when it has one)."""
    if pivot and b_lang == pivot and a_lang != pivot:
        return b, a, b_lang, a_lang
    return a, b, a_lang, b_lang


# -------------------------------------------------------------------------------------------------- WikiMatrix
def pair_caps(specs: list[str]) -> tuple[int | None, dict[frozenset, int]]:
    """``--max-pairs`` values: ``N`` (every language pair) and ``l1-l2=N`` (that pair): (default, per pair); None
    is no cap, and a cap of 0 keeps none of the pair."""
    default, caps = None, {}
    for spec in specs:
        pair, _, number = spec.rpartition("=")
        try:
            cap = int(number)
        except ValueError:
            cap = -1
        if cap < 0:
            raise ValueError(f"--max-pairs {spec!r}: expected N or l1-l2=N with N >= 0")
        if not pair:
            default = cap
            continue
        langs = pair.split("-")
        if len(langs) != 2:
            raise ValueError(f"--max-pairs {spec!r}: the pair must be written l1-l2 (e.g. de-en=500000)")
        caps[frozenset(_language(c, f"--max-pairs {spec}") for c in langs)] = cap
    return default, caps


def wikimatrix_languages(path: Path) -> tuple[str, str]:
    match = WIKIMATRIX_FILE.match(path.name)
    if not match:
        raise DataError(
            f"{path}: not a WikiMatrix file name; expected WikiMatrix.<l1>-<l2>.tsv.gz (e.g. WikiMatrix.de-en.tsv.gz), "
            "which says which language each column is"
        )
    return _language(match["a"], str(path)), _language(match["b"], str(path))


def scored_lines(path: Path, min_score: float, writer: SplitWriter) -> Iterator[tuple[float, int, str, str]]:
    """(score, line number, l1 text, l2 text) of the lines at or above ``min_score``; the others are counted. A
    first line not in the ``score<TAB>l1<TAB>l2`` layout refuses the file."""
    first = True
    for number, text in decoded_lines(path, writer):
        if not text.strip():
            continue
        cols = text.split("\t")
        score = _score(cols[0]) if len(cols) == 3 else None
        if first and score is None:
            raise DataError(
                f"{path}:{number}: expected WikiMatrix's score<TAB>l1 sentence<TAB>l2 sentence, got {text[:80]!r}"
            )
        first = False
        if len(cols) != 3:
            writer.skip("bad_columns", detail=f"{path}:{number}: {len(cols)} columns, expected 3")
        elif score is None:
            writer.skip("bad_score", detail=f"{path}:{number}: score {cols[0][:20]!r} is not a number")
        elif score < min_score:
            writer.skip("below_min_score")
        else:
            yield score, number, cols[1], cols[2]


def _score(text: str) -> float | None:
    try:
        score = float(text)
    except ValueError:
        return None
    return score if math.isfinite(score) else None


def capped(lines: Iterator[tuple[float, int, str, str]], cap: int, writer: SplitWriter) -> list:
    """The ``cap`` highest-scoring lines (ties: the earlier line), in file order; the rest are counted."""
    best: list = []
    seen = 0
    for score, number, a, b in lines:
        seen += 1
        item = (score, -number, a, b)
        if len(best) < cap:
            heapq.heappush(best, item)
        elif best and item > best[0]:
            heapq.heapreplace(best, item)
    if seen > len(best):
        writer.skip("over_pair_cap", n=seen - len(best))
    return [(score, -neg, a, b) for score, neg, a, b in sorted(best, key=lambda item: -item[1])]


def wikimatrix_pairs(paths: list[Path], args, writer: SplitWriter) -> Iterator[tuple]:
    default, caps = pair_caps(args.max_pairs)
    for path in paths:
        a_lang, b_lang = wikimatrix_languages(path)
        pair = frozenset((a_lang, b_lang))
        lines = scored_lines(path, args.min_score, writer)
        cap = caps.get(pair, default)
        for _, _, a, b in lines if cap is None else capped(lines, cap, writer):
            yield oriented(a, b, a_lang, b_lang, args.pivot)


def run_wikimatrix(args) -> int:
    paths = [require_file(p, "--input") for p in args.input]
    pair_caps(args.max_pairs)
    seen: dict[frozenset, Path] = {}
    for path in paths:  # every name checked before any output
        pair = frozenset(wikimatrix_languages(path))
        if pair in seen:
            raise DataError(f"{path} and {seen[pair]} are the same language pair; give each pair once")
        seen[pair] = path
    with SplitWriter(args, VIEW_PARALLEL) as writer:
        return write_pairs(wikimatrix_pairs(paths, args, writer), writer, args, "wikimatrix")


# -------------------------------------------------------------------------------------------------------- OPUS
class MosesPair:
    """One corpus of one language pair: where its two sides are (files, or members of a zip)."""

    def __init__(self, corpus: str, a: str, b: str, where: str):
        self.corpus, self.a, self.b, self.where = corpus, a, b, where
        self.sides: dict[str, tuple[Path, str | None]] = {}  # code -> (file or zip, member)

    @property
    def name(self) -> str:
        return f"{self.corpus}.{self.a}-{self.b}"

    def lines(self, code: str) -> Iterator[bytes]:
        """One side's lines; a damaged zip member stops the run naming it and the last line read."""
        path, member = self.sides[code]
        if member is None:
            with open(path, "rb") as handle:
                yield from handle
            return
        number = 0
        try:
            with zipfile.ZipFile(path) as archive, archive.open(member) as handle:
                for raw in handle:
                    number += 1
                    yield raw
        except DAMAGED as err:
            raise DataError(unreadable(self.label(code), "zip member", err, number)) from None

    def label(self, code: str) -> str:
        return self.place(*self.sides[code])

    @staticmethod
    def place(path: Path, member: str | None) -> str:
        """A file, or a zip member as ``zip:member``."""
        return f"{path}:{member}" if member else str(path)


def moses_pairs_in(inputs: list[str]) -> list[MosesPair]:
    """Every complete Moses pair in the given folders and zip files, or an error naming what is missing."""
    found: dict[tuple, MosesPair] = {}
    given: set[Path] = set()
    for text in inputs:
        path = Path(text)
        if path.exists() and path.resolve() in given:
            raise DataError(f"--input {path} is given twice")
        given.add(path.resolve())
        if path.is_dir():
            entries = [(p.name, p, None) for p in sorted(path.iterdir()) if p.is_file()]
        elif path.is_file() and (zipfile.is_zipfile(path) or path.suffix == ".zip"):
            try:
                with zipfile.ZipFile(path) as archive:
                    names = archive.namelist()
            except DAMAGED as err:
                raise DataError(unreadable(path, "zip file", err)) from None
            entries = [(Path(m).name, path, m) for m in sorted(names) if not m.endswith("/")]
        elif path.exists():
            raise DataError(f"{path}: expected a folder of Moses files or OPUS's <l1>-<l2>.txt.zip")
        else:
            raise FileNotFoundError(f"--input {path} does not exist")
        for name, file, member in entries:
            match = MOSES_FILE.match(name)
            if not match or match["side"] not in (match["a"], match["b"]) or match["a"] == match["b"]:
                continue
            key = (match["corpus"], match["a"], match["b"])
            pair = found.setdefault(key, MosesPair(*key, where=str(path)))
            side = match["side"]
            # two versions of a corpus, or a folder and its zip: one would silently replace the other
            if side in pair.sides:
                raise DataError(
                    f"{pair.label(side)} and {MosesPair.place(file, member)} are both {name}: give each corpus "
                    "once"
                )
            pair.sides[side] = (file, member)
    if not found:
        raise DataError(
            f"no Moses files in {', '.join(inputs)}: expected <corpus>.<l1>-<l2>.<l1> and <corpus>.<l1>-<l2>.<l2> "
            "(e.g. Europarl.de-en.de + Europarl.de-en.en), in a folder or OPUS's <l1>-<l2>.txt.zip"
        )
    for pair in found.values():
        missing = [c for c in (pair.a, pair.b) if c not in pair.sides]
        if missing:
            raise DataError(f"{pair.where}: {pair.name}.{missing[0]} is missing (its other side is there)")
    return sorted(found.values(), key=lambda p: p.name)


def opus_pairs(pairs: list[MosesPair], pivot: str, writer: SplitWriter) -> Iterator[tuple]:
    for pair in pairs:
        a_lang, b_lang = _language(pair.a, pair.label(pair.a)), _language(pair.b, pair.label(pair.b))
        lines = aligned_pairs(
            pair.lines(pair.a),
            pair.lines(pair.b),
            pair.label(pair.a),
            pair.label(pair.b),
            a_lang,
            b_lang,
            writer,
        )
        for a, b, _, _ in lines:
            yield oriented(a, b, a_lang, b_lang, pivot)


def run_opus(args) -> int:
    pairs = moses_pairs_in(args.input)
    for pair in pairs:  # every language code checked before any output
        for code in (pair.a, pair.b):
            _language(code, pair.label(code))
    print("moses pairs: " + ", ".join(pair.name for pair in pairs))
    with SplitWriter(args, VIEW_PARALLEL) as writer:
        return write_pairs(opus_pairs(pairs, args.pivot, writer), writer, args, "opus")


# ------------------------------------------------------------------------------------------------- parsers
def _pivot(text: str) -> str:
    lang = normalize_language(text) if text else ""
    if lang is None:
        raise argparse.ArgumentTypeError(f"unknown language code {text!r}")
    return lang


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "wikimatrix", help="parallel-text shards from WikiMatrix.<l1>-<l2>.tsv[.gz] files"
    )
    p.add_argument("--input", nargs="+", required=True, help="WikiMatrix.<l1>-<l2>.tsv.gz file(s)")
    p.add_argument(
        "--min-score",
        type=float,
        default=WIKIMATRIX_MIN_SCORE,
        help=f"drop pairs with a lower margin score (default {WIKIMATRIX_MIN_SCORE}, as WikiMatrix recommends)",
    )
    p.add_argument(
        "--max-pairs",
        action="append",
        default=[],
        metavar="N|L1-L2=N",
        help="keep at most N pairs per language pair (the highest scores; 0: none), or for one pair; "
        "repeatable",
    )
    p.add_argument(
        "--pivot", type=_pivot, default="en", help="this language's side is src (default en; '' = as filed)"
    )
    add_output_options(p)
    p.set_defaults(run=run_wikimatrix)

    p = subparsers.add_parser(
        "opus", help="parallel-text shards from OPUS / Europarl Moses files (folders or zips)"
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="folder(s) of <corpus>.<l1>-<l2>.<lang> files or OPUS .txt.zip",
    )
    p.add_argument(
        "--pivot", type=_pivot, default="en", help="this language's side is src (default en; '' = as filed)"
    )
    add_output_options(p)
    p.set_defaults(run=run_opus)
