"""What every converter shares: output options, the deterministic train/val split, de-duplication, skip counts,
reading input lines, and the closing summary. (Worker processes with a progress bar: :mod:`data_prep.workers`.)

One policy for bad records in large inputs: a line that is not UTF-8 (and, in a ``cclm-jsonl`` dump, a line that
is not a JSON object) is skipped, counted in the summary and ``manifest.json``, and warned about naming
``file:line`` (rate-limited). Output is published only when a converter succeeds (:class:`SplitWriter` is a
context manager that discards its shards otherwise)."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import re
import shlex
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from cclm.data.languages import language_allowed, normalize_language
from cclm.data.shards import ShardSink, safe_key
from cclm.data.skips import SkipCounter
from cclm.jsonl import read_jsonl
from data_prep.skip_reasons import SKIP_REASONS

BAD_UTF8 = "bad_utf8"
log = logging.getLogger("cclm.data")


def add_output_options(parser: argparse.ArgumentParser, images: bool = False) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", required=True, help="output folder (must not hold shards yet)")
    group.add_argument("--prefix", default="shard", help="shard file prefix (default: shard)")
    group.add_argument("--shard-samples", type=int, default=10000, help="max samples per shard")
    group.add_argument("--shard-bytes", type=float, default=1e9, help="max bytes per shard (default 1e9)")
    group.add_argument("--languages", default="", help="comma-separated language filter (default: all)")
    group.add_argument("--dedup", action="store_true", help="drop exact duplicate samples")
    group.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="fraction of samples for OUT/val (deterministic by content); the rest go to OUT/train",
    )
    group.add_argument(
        "--num-workers", type=int, default=0, help="processes for reading/encoding (0 = inline)"
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    if images:
        group.add_argument(
            "--max-side",
            type=int,
            default=0,
            help="re-encode images whose longer side exceeds this (0 = keep JPEGs as they are)",
        )
        group.add_argument("--jpeg-quality", type=int, default=90, help="quality of re-encoded JPEGs")


def language_filter(text: str) -> frozenset[str]:
    langs = [c for c in (p.strip() for p in text.split(",")) if c]
    bad = [c for c in langs if normalize_language(c) is None]
    if bad:
        raise ValueError(f"--languages: unknown language code(s) {bad}")
    return frozenset(normalize_language(c) for c in langs)  # type: ignore[misc]


def require_file(path: str | Path, what: str = "input") -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} file {path} is empty")
    return path


def content_hash(*parts) -> str:
    h = hashlib.sha1()
    for part in parts:
        h.update(
            part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, ensure_ascii=False).encode()
        )
        h.update(b"\0")
    return h.hexdigest()


# Shards are USTAR tars (cclm.data.shards), whose member names hold at most 100 characters: a key leaves room
# for "." and the longest extension the converters write (jpg, json).
MAX_KEY_CHARS = 100 - len(".json")


class SampleKeys:
    """Unique sample keys. A key is a readable name made safe (:func:`cclm.data.shards.safe_key`); where that loses
    characters (``Ä.jpg`` and ``Ö.jpg`` both give ``_``, or a name past :data:`MAX_KEY_CHARS` is cut short) or the
    key is taken already (``x.jpg`` and ``x.png``, or two input shards both named ``shard-000000``), it ends in a
    hash of the sample's full ``identity`` instead, so no two inputs share a key (a shard sink refuses a second
    one). No key starts with ``__`` (WebDataset readers take such members for metadata and skip them)."""

    _LOSSLESS = re.compile(r"[A-Za-z0-9_\-./ ]*")

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, readable: str, identity: str | None = None) -> str:
        safe = safe_key(readable)
        key = safe[:MAX_KEY_CHARS]
        if key != safe or key in self.used or key.startswith("__") or not self._LOSSLESS.fullmatch(readable):
            digest = hashlib.sha1((identity if identity is not None else readable).encode()).hexdigest()
            key = _hashed_key(safe, digest[:10])
            n = 1
            while key in self.used:  # the same identity twice: keep both, in input order
                n += 1
                key = _hashed_key(safe, f"{digest[:10]}_{n}")
        self.used.add(key)
        return key


def _hashed_key(safe: str, tail: str) -> str:
    """``safe`` ending in ``_tail``, cut short to fit :data:`MAX_KEY_CHARS`, without leading underscores."""
    return f"{safe.lstrip('_')[: MAX_KEY_CHARS - len(tail) - 1]}_{tail}".lstrip("_")


class SplitWriter:
    """Routes samples to ``OUT`` (or ``OUT/train`` and ``OUT/val``), de-duplicates, counts skips. Use it as a
    context manager: leaving the block without :meth:`close` (an error, Ctrl-C) deletes every shard written."""

    def __init__(self, args: argparse.Namespace, view: str):
        out = Path(args.out)
        command = "cclm prep " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:]))
        kw = dict(
            view=view,
            prefix=args.prefix,
            max_samples=args.shard_samples,
            max_bytes=int(args.shard_bytes),
            command=command,
        )
        if not 0 <= args.val_fraction < 1:
            raise ValueError("--val-fraction must be in [0, 1)")
        self.val_fraction = args.val_fraction
        if self.val_fraction > 0:
            self.sinks = {"train": ShardSink(out / "train", **kw), "val": ShardSink(out / "val", **kw)}
        else:
            self.sinks = {"train": ShardSink(out, **kw)}
        self.out, self.dedup, self.seen = out, args.dedup, set()
        self.allowed = language_filter(args.languages)
        self.skips = SkipCounter(where=f"cclm prep {getattr(args, 'subcommand', view)}")
        self._lock = threading.Lock()

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(self, *exc) -> None:
        for sink in self.sinks.values():
            sink.abort()  # a no-op for a published sink

    @property
    def skipped(self) -> Counter[str]:
        return self.skips.counts

    def allowed_language(self, lang: str) -> bool:
        return language_allowed(lang, self.allowed)

    def skip(self, reason: str, n: int = 1, detail: str = "") -> None:
        """Count ``n`` dropped inputs; with a ``detail`` (where and why) also warn, rate-limited. ``reason`` must be
        one of :data:`data_prep.skip_reasons.SKIP_REASONS` (what docs/data.md lists): a new name is a bug."""
        if reason not in SKIP_REASONS:
            raise KeyError(f"skip reason {reason!r} is not in data_prep/skip_reasons.py (nor docs/data.md)")
        with self._lock:  # image converters count from their reading thread too (image_caption._write_all)
            self.skips.add(reason, detail, n, warn=bool(detail))

    def write(self, key: str, members: dict[str, bytes], languages: list[str], content_id: str) -> bool:
        if self.dedup:
            if content_id in self.seen:
                self.skip("duplicate")
                return False
            self.seen.add(content_id)
        split = "train"
        if self.val_fraction > 0 and int(content_id[:8], 16) / 16**8 < self.val_fraction:
            split = "val"
        self.sinks[split].write(key, members, languages)
        return True

    def close(self) -> dict:
        manifests = {}
        for split, sink in self.sinks.items():
            for reason, n in self.skipped.items():
                sink.skip(reason, n if split == "train" else 0)
            manifests[split] = sink.close()
        return manifests

    def summary(self, manifests: dict) -> str:
        parts = [
            f"{split}: {m['samples']} samples in {m['shards']} shards ({self.sinks[split].out_dir})"
            for split, m in manifests.items()
        ]
        langs = Counter()
        for m in manifests.values():
            langs.update(m["languages"])
        skipped = ", ".join(f"{r}={n}" for r, n in sorted(self.skipped.items())) or "none"
        return f"wrote {'; '.join(parts)}\nlanguages: {dict(sorted(langs.items()))}\nskipped: {skipped}"


# ----------------------------------------------------------------------------------------------- reading input
def decode_text(raw: bytes, where: str, writer: SplitWriter) -> str | None:
    """``raw`` decoded as UTF-8, or None after counting it as ``bad_utf8`` with a warning naming ``where``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        writer.skip(
            BAD_UTF8, detail=f"{where}: not UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start + 1})"
        )
        return None


UTF8_BOM = b"\xef\xbb\xbf"


def first_line_bytes(raw: bytes, where) -> bytes:
    """The first line of a text file without a UTF-8 byte-order mark (spreadsheet exports write one, which would
    otherwise hide the first column's name). A UTF-16 or UTF-32 file fails here, naming it: read line by line as
    UTF-8 its ASCII characters decode, each next to a NUL byte, so it would be converted into garbage."""
    nuls = raw.count(b"\x00")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or (nuls >= 2 and nuls * 4 >= len(raw.rstrip(b"\r\n"))):
        raise ValueError(
            f"{where}: the file is UTF-16 or UTF-32, not UTF-8; convert it first "
            "(e.g. iconv -f UTF-16 -t UTF-8 IN > OUT)"
        )
    return raw.removeprefix(UTF8_BOM)


def text_lines(path: Path, writer: SplitWriter) -> Iterator[tuple[int, str]]:
    """(line number, line with its newline) of a UTF-8 file; lines that are not UTF-8 are counted skips. Lines
    are decoded one by one so that a bad one is named by its own number. See :func:`first_line_bytes`."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if number == 1:
                raw = first_line_bytes(raw, path)
            text = decode_text(raw, f"{path}:{number}", writer)
            if text is not None:
                yield number, text


def csv_rows(
    numbered: Iterator[tuple[int, str]], where, delimiter: str = ","
) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of csv lines (``numbered``: from :func:`text_lines`), read strictly (RFC 4180
    quoting): a line csv cannot parse (a stray quote, a lone carriage return, a field past the size limit) stops
    the run naming ``file:line`` instead of a bare ``_csv.Error``, and a row over several lines (a quoted field
    with line breaks, or an unbalanced quote that swallowed the rows after it) is warned about with its lines."""
    at, consumed = [0], [0]

    def lines() -> Iterator[str]:
        for number, line in numbered:
            at[0], consumed[0] = number, consumed[0] + 1
            yield line

    reader = csv.reader(lines(), delimiter=delimiter, strict=True)
    while True:
        before = consumed[0]
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise ValueError(f"{where}:{at[0]}: not a valid csv line ({err}); check its quotes") from None
        if consumed[0] - before > 1:
            log.warning(
                "%s:%d: one csv row over %d lines, up to here (a quoted field with line breaks, or an "
                "unbalanced quote)",
                where,
                at[0],
                consumed[0] - before,
            )
        yield at[0], row


def jsonl_records(path: Path, writer: SplitWriter) -> Iterator[tuple[int, dict]]:
    """(line number, object) of a JSON-lines table, with :func:`cclm.jsonl.read_jsonl`'s policy (a malformed or
    non-object line stops the run, naming ``file:line``) except that a line that is not UTF-8 is a counted
    skip."""

    def skip(path: Path, number: int, raw: bytes, err: UnicodeDecodeError) -> None:
        decode_text(raw, f"{path}:{number}", writer)  # counts it as bad_utf8, with a warning

    return read_jsonl(path, on_undecodable=skip)
