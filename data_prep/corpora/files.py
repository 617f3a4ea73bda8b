"""Reading publishers' text files: plain or gzipped, decoded line by line (a line that is not UTF-8 is a counted
``bad_utf8`` skip naming ``file:line``, as in every converter)."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from data_prep.common import SplitWriter, decode_text


def open_binary(path: Path) -> BinaryIO:
    """``path`` for reading bytes, decompressed when it ends in ``.gz``."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def decoded_lines(path: Path, writer: SplitWriter) -> Iterator[tuple[int, str]]:
    """(line number, text without its line break) of a plain or gzipped UTF-8 file."""
    try:
        with open_binary(path) as handle:
            for number, raw in enumerate(handle, 1):
                text = decode_text(raw, f"{path}:{number}", writer)
                if text is not None:
                    yield number, text.rstrip("\r\n")
    except (gzip.BadGzipFile, EOFError) as err:
        raise ValueError(f"{path}: not a readable gzip file ({err})") from None
