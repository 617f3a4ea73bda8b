"""Reading publishers' text files: plain or gzipped, decoded line by line (a line that is not UTF-8 is a counted
``bad_utf8`` skip naming ``file:line``, as in every converter). A compressed file that does not decompress stops
the run with one line naming it (see :func:`unreadable`)."""

from __future__ import annotations

import gzip
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from data_prep.common import SplitWriter, decode_text, first_line_bytes

# what gzip and zipfile raise reading a damaged or truncated file
DAMAGED = (gzip.BadGzipFile, zipfile.BadZipFile, zlib.error, EOFError)


def unreadable(where, what: str, err: Exception, lines: int = 0) -> str:
    """The message for a damaged or truncated ``what`` (gzip file, zip member), with how far it was read."""
    reached = f"; read up to line {lines}" if lines else ""
    return f"{where}: not a readable {what}, damaged or truncated ({err}{reached})"


def open_binary(path: Path) -> BinaryIO:
    """``path`` for reading bytes, decompressed when it ends in ``.gz``."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def decoded_lines(path: Path, writer: SplitWriter) -> Iterator[tuple[int, str]]:
    """(line number, text without its line break) of a plain or gzipped UTF-8 file."""
    number = 0
    try:
        with open_binary(path) as handle:
            for number, raw in enumerate(handle, 1):
                if number == 1:
                    raw = first_line_bytes(raw, path)
                text = decode_text(raw, f"{path}:{number}", writer)
                if text is not None:
                    yield number, text.rstrip("\r\n")
    except DAMAGED as err:
        raise ValueError(unreadable(path, "gzip file", err, number)) from None
